"""FSDP memory benchmark: peak resident memory of each process, one process against N sharded ones.

    denser bench fsdp                                   # grpo and sdpo (EMA teacher): 1 process, 1 and 2 FSDP processes
    denser bench fsdp --model default --steps 2         # the embedded SmolLM2-135M-Instruct
    denser bench fsdp --processes 1,2,4 --objectives sdpo --max-new-tokens 8
    denser bench fsdp --teacher-head --model default    # what handing a sharded teacher's lm_head to the core costs
    denser bench fsdp --load --model default            # each process's load peak: whole vs sharded loading

Every configuration is ``torchrun --standalone --nproc_per_node N -m denser.bench.fsdp_worker train``
running ``denser train --fsdp`` with the same global batch (``--prompts-per-step`` is divided
among the processes); each process records its resident-memory high-water mark (VmHWM, what the
kernel counted: loading, sharding, every step) before the final checkpoint and after it (the
checkpoint gathers whole tensors on process 0, as much as one unsharded process holds).

``--teacher-head`` times, on 2 processes, the ways a sharded teacher's lm_head weight can reach the
loss core (which runs inside the policy's forward, after the teacher's forward has resharded):
a copy taken inside the teacher's forward, where the weight is gathered anyway (what denser does),
against ``full_tensor()`` after it (one more all-gather).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

OBJECTIVES = {"grpo": ("grpo", {}), "sdpo": ("sdpo", {"teacher": "ema"})}
NUM_GENERATIONS = 4


def teacher_head(model: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "head.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "denser.bench.fsdp_worker", "head", model, out]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError((proc.stderr.strip().splitlines() or ["failed"])[-1])
        r = json.loads(Path(out).read_text())
    return "\n".join([
        f"teacher lm_head under FSDP, model={model}, 2 processes, weight {r['shape']} ({r['head_mib']:.0f} MiB), "
        "median ms per micro-batch", "",
        "| teacher forward alone | + copy inside the forward (denser) | + full_tensor() after it |", "|---:|---:|---:|",
        f"| {r['forward_ms']:.1f} | {r['copy_inside_ms']:.1f} | {r['full_tensor_after_ms']:.1f} |"])


def load_peaks(model: str, counts: list[int], dtypes: tuple[str, ...] = ("float32", "bfloat16")) -> str:
    """Each process's memory while an FSDP run loads and shards ``model``: loaded whole by every
    process (then sharded) against sharded loading (built empty, each process reads its rows)."""
    rows = []
    for dtype, mode, n in [(d, m, n) for d in dtypes for m in ("whole", "sharded") for n in counts]:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "load")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                   "-m", "denser.bench.fsdp_worker", "load", model, mode, dtype, out]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"load {mode} on {n}: {proc.stderr[-3000:]}")
            reports = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(n)]
        print(json.dumps({"dtype": dtype, "mode": mode, "processes": n, "reports": reports}), file=sys.stderr,
              flush=True)

        def cells(key: str, base: str, reports: list[dict] = reports) -> str:
            return ", ".join(f"{r[key] - r[base]:.0f}" for r in reports)

        shards = ", ".join(f"{r['shard_mib']:.0f}" for r in reports)
        rows.append(f"| {dtype} | {mode} | {n} | {shards} | "
                    f"{cells('peak_anon_mib', 'base_anon_mib')} | {cells('hwm_mib', 'base_hwm_mib')} | "
                    f"{max(r['seconds'] for r in reports):.1f} |")
    return "\n".join([
        f"FSDP load peak per process, model={model} (stored in float32), loaded and sharded as a run's policy, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; memory above each process's baseline after imports (MiB)", "",
        "| dtype | loading | processes | its shard | peak anonymous memory | peak resident (VmHWM, with mapped file "
        "pages) | seconds |", "|---|---|---:|---|---|---|---:|", *rows])


def run(objective: str, processes: int, model: str, steps: int, prompts: int, max_new_tokens: int, *,
        fsdp: bool = True) -> dict:
    """Peak RSS of each of ``processes`` FSDP processes (``fsdp=False``: unsharded) training
    ``objective`` on ``prompts`` prompts per step in all."""
    if prompts % processes:
        raise ValueError(f"--prompts {prompts} does not divide among {processes} processes")
    name, args = OBJECTIVES[objective]
    with tempfile.TemporaryDirectory() as tmp:
        report = str(Path(tmp) / "rss")
        config = dict(model=model, steps=steps, prompts_per_step=prompts // processes, fsdp=fsdp,
                      output_dir=str(Path(tmp) / "run"), progress=False, eval_size=2,
                      num_generations=NUM_GENERATIONS, max_new_tokens=max_new_tokens)
        settings = json.dumps({"objective": name, "objective_args": args, "config": config})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "denser.bench.fsdp_worker", "train", report, settings]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            errors = [x for x in proc.stderr.splitlines() if "Error" in x or "error:" in x]
            raise RuntimeError(f"{processes} process(es), {objective}: "
                               f"{(errors or [f'exit code {proc.returncode}'])[-1]}\n{proc.stderr[-3000:]}")
        reports = [json.loads(Path(f"{report}.{r}.json").read_text()) for r in range(processes)]
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "loss" in r]
    return {"objective": objective, "processes": f"{processes}" if fsdp else f"{processes}, no FSDP",
            "peak_rss_mib": [r["peak_rss_mib"] for r in reports],
            "training_rss_mib": [r.get("before_last_save_mib", r["peak_rss_mib"]) for r in reports],
            "s_per_step": sum(r["step_time_s"] for r in steps_rows) / max(1, len(steps_rows))}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="denser bench fsdp", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="model to train (default: tiny; 'default' is SmolLM2-135M-Instruct)")
    p.add_argument("--objectives", default="grpo,sdpo", help="comma-separated: grpo, sdpo (EMA teacher)")
    p.add_argument("--processes", default="plain,1,2",
                   help="comma-separated process counts; 'plain': one process without FSDP")
    p.add_argument("--steps", type=int, default=2, help="training steps per run")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step over all processes")
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation budget per completion")
    p.add_argument("--output", default="", help="also write the table (markdown) to this file")
    p.add_argument("--load", action="store_true", help="measure each process's memory while loading and sharding "
                   "the model, loaded whole against sharded loading, instead (--processes: the counts, 'plain' ignored)")
    p.add_argument("--teacher-head", action="store_true", help="time the ways a sharded teacher's lm_head reaches "
                   "the loss core instead")
    args = p.parse_args(argv)
    if args.load or args.teacher_head:
        text = (load_peaks(args.model, [int(n) for n in args.processes.split(",") if n != "plain"]) if args.load
                else teacher_head(args.model))
        print(text)
        if args.output:
            Path(args.output).write_text(text + "\n")
        return 0
    counts = args.processes.split(",")
    results = []
    for o in args.objectives.split(","):
        for n in counts:
            plain = n == "plain"
            results.append(run(o, 1 if plain else int(n), args.model, args.steps, args.prompts, args.max_new_tokens,
                               fsdp=not plain))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    lines = [f"FSDP peak RSS per process, model={args.model}, {args.steps} steps, {args.prompts} prompts x "
             f"{NUM_GENERATIONS} completions x {args.max_new_tokens} new tokens per step in all, OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', '1')}, MALLOC_MMAP_THRESHOLD_="
             f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', '-')}, {platform.machine()}, {os.cpu_count()} CPUs", "",
             "| objective | processes | peak RSS per process before the final checkpoint (MiB) | "
             "peak RSS per process, whole run (MiB) | s/step |", "|---|---:|---|---|---:|"]
    for r in results:
        training = ", ".join(f"{x:.0f}" for x in r["training_rss_mib"])
        peaks = ", ".join(f"{x:.0f}" for x in r["peak_rss_mib"])
        lines.append(f"| {r['objective']} | {r['processes']} | {training} | {peaks} | {r['s_per_step']:.1f} |")
    text = "\n".join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
