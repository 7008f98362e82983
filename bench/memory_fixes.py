"""Issue 13's memory fixes, each measured against the run without it, in one sweep: peak RSS of
`denser train` at the short workload (the embedded SmolLM2-135M-Instruct, 1 prompt x 8 completions x
<= 32 tokens, fp32, CPU, 3 steps; eval on 4 prompts), each variant in its own process.

    PYTHONPATH=. OMP_NUM_THREADS=1 python -m bench.memory_fixes                     # grpo and sdpo, all variants
    PYTHONPATH=. OMP_NUM_THREADS=1 python -m bench.memory_fixes --objectives sdpo --variants before,after

Variants (``--variants``):
  before       none of the fixes: glibc keeps the freed heap, foreach AdamW, the EMA teacher's
               state_dict cloned at every checkpoint (what main did before issue 13's fixes)
  trim         + malloc_trim(0) after the rollout and after every optimiser update (``trim_heap``)
  fused        + AdamW(fused=True)
  noclone      + the EMA teacher's state_dict without a copy
  after        all three: what `denser train` does now
  after-mmap1m after + mallopt(M_MMAP_THRESHOLD, 1 MiB) at start (opt-in: MALLOC_MMAP_THRESHOLD_=1048576)
  after-ckpt   after + --gradient-checkpointing (TRL's default; off by default in denser)
  trl          TRL's GRPOTrainer (grpo only) on the same model, prompts, reward and batch, its defaults
               (gradient checkpointing on, adamw_torch_fused), 3 steps, no eval
  trl-nockpt   trl with gradient_checkpointing=False

Per run: the process's peak RSS (``ru_maxrss``), the peak during the final checkpoint save (high-water
mark reset just before it), the RSS after training, and seconds (seconds are only comparable on a quiet
machine). Results: ``bench/results/memory-fixes-<workload>-<tag>-<date>.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "before": set(),
    "trim": {"trim"},
    "fused": {"fused"},
    "noclone": {"noclone"},
    "after": {"trim", "fused", "noclone"},
    "after-mmap1m": {"trim", "fused", "noclone", "mmap1m"},
    "after-ckpt": {"trim", "fused", "noclone", "ckpt"},
    "trl": {"trl", "ckpt"},
    "trl-nockpt": {"trl"},
}
MARK = "MEMORY_FIXES_RESULT "


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024
    return float("nan")


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


WORKLOADS = {  # `denser train` flags besides --objective
    "short": ["--prompts-per-step", "1", "--num-generations", "8", "--max-new-tokens", "32", "--steps", "3"],
    # the README's main job (4 prompts x 4 completions, the task's 32 tokens), 3 of its 12 steps
    "main": ["--prompts-per-step", "4", "--num-generations", "4", "--steps", "3"],
}


def child(objective: str, variant: str, out_dir: str, workload: str = "short") -> dict:
    """One `denser train` run in this process with the fixes of ``variant`` and without the others."""
    import torch

    from denser.cli.flags import parse_train_args
    from denser.trainers import loop, memory, teacher
    from denser.trainers.loop import Trainer

    fixes = VARIANTS[variant]
    if "trl" in fixes:
        return trl_child(objective, variant, out_dir, workload)
    if "mmap1m" in fixes:
        memory.set_mmap_threshold(1 << 20)
    if "trim" not in fixes:
        loop.trim_heap = lambda: False
    if "fused" not in fixes:
        loop.adamw = lambda params, fused=True, **kw: torch.optim.AdamW(list(params), **kw)
    if "noclone" not in fixes:
        teacher.TeacherWeights.state_dict = lambda self: (
            {k: v.detach().clone() for k, v in self.model.state_dict().items()} if self.mode == "ema" else None)
    save_peak = {}
    real_save = Trainer.save

    def save(self, step, **kw):
        save_peak["before"] = _maxrss_mb()  # the run's peak so far: the reset below forgets it
        start = _rss_mb()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        try:
            return real_save(self, step, **kw)
        finally:
            save_peak["save"] = _maxrss_mb() - start

    Trainer.save = save
    cfg, obj = parse_train_args(["--objective", objective, "--model", "default", *WORKLOADS[workload], "--cpu",
                                 "--no-progress", "--eval-size", "4", "--output-dir", out_dir, "--overwrite",
                                 *(["--gradient-checkpointing"] if "ckpt" in fixes else [])])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, obj, log=lambda *a: None)
    trainer.train()
    seconds = time.perf_counter() - t0
    peak = max(save_peak.get("before", 0.0), _maxrss_mb())
    return {"objective": objective, "variant": variant, "workload": workload, "peak_rss_mb": peak, "save_rss_rise_mb": save_peak.get("save"),
            "rss_end_mb": _rss_mb(), "seconds": seconds,
            "optimizer": "fused" if trainer.optimizer.optimizer.defaults.get("fused") else "foreach"}


def trl_child(objective: str, variant: str, out_dir: str, workload: str) -> dict:
    """TRL's GRPOTrainer at the same workload: the embedded model's safetensors directory, denser's tokenizer
    fix-ups (chat template, pad), the default task's first 64 train prompts and its reward."""
    if objective != "grpo":
        raise ValueError("the TRL variants run grpo only (TRL's SDPOTrainer needs its own dataset of teacher contexts)")
    from trl import GRPOConfig, GRPOTrainer

    from bench.trl_workload import trl_workload

    flags = dict(zip(WORKLOADS[workload][::2], WORKLOADS[workload][1::2]))
    prompts, group = int(flags["--prompts-per-step"]), int(flags["--num-generations"])
    steps, max_new = int(flags["--steps"]), int(flags.get("--max-new-tokens", 32))
    work = trl_workload("addition")

    args = GRPOConfig(output_dir=out_dir, report_to=[], use_cpu=True, bf16=False, max_steps=steps,
                      per_device_train_batch_size=prompts * group, num_generations=group,
                      max_completion_length=max_new, logging_steps=1, save_strategy="no", disable_tqdm=True,
                      gradient_checkpointing="ckpt" in VARIANTS[variant])
    trainer = GRPOTrainer(model=work.model(), reward_funcs=work.reward, args=args, train_dataset=work.dataset,
                          processing_class=work.tokenizer)
    t0 = time.perf_counter()
    trainer.train()
    return {"objective": objective, "variant": variant, "workload": workload, "peak_rss_mb": _maxrss_mb(),
            "save_rss_rise_mb": None, "rss_end_mb": _rss_mb(), "seconds": time.perf_counter() - t0,
            "optimizer": getattr(args.optim, "value", str(args.optim))}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        print(MARK + json.dumps(child(*argv[1:5])), flush=True)
        return 0
    if argv[:1] == ["--merge"]:  # --merge OUT_STEM PART.json...
        merge(Path(argv[1]), [Path(x) for x in argv[2:]])
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.memory_fixes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="grpo,sdpo")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--workload", default="short", choices=sorted(WORKLOADS),
                   help="short: 1 prompt x 8 completions x <= 32 tokens, 3 steps (issue 13); main: the README's main "
                        "job's batch (4 prompts x 4 completions), 3 steps")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tag", default=f"cpu-{os.cpu_count()}core")
    a = p.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    date = _dt.date.today().isoformat()
    stem = Path(a.out_dir) / f"memory-fixes-{a.workload}-{a.tag}-{date}"
    meta = {"date": date, "command": "python -m bench.memory_fixes " + " ".join(argv),
            "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
            "load_average_at_start": [round(x, 1) for x in os.getloadavg()],
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "workload": a.workload,
            "flags": WORKLOADS[a.workload]}
    rows = []
    for objective in a.objectives.split(","):
        for variant in variants:
            out = f"/tmp/denser-memory-fixes-{os.getpid()}-{objective}-{variant}"
            proc = subprocess.run([sys.executable, "-m", "bench.memory_fixes", "--child", objective, variant, out,
                                   a.workload],
                                  capture_output=True, text=True, check=False)
            got = [json.loads(x[len(MARK):]) for x in proc.stdout.splitlines() if x.startswith(MARK)]
            row = got[0] if got else {"objective": objective, "variant": variant, "error": proc.stderr[-800:]}
            subprocess.run(["rm", "-rf", out], check=False)
            rows.append(row)
            print(json.dumps(row), flush=True)
            stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
            _write_md(stem.with_suffix(".md"), meta, rows)
    return 0


def merge(out_stem: Path, parts: list[Path]) -> None:
    """One table from several sweeps' JSON files (a sweep cut into parts on a machine too loaded to run it
    whole): rows in order, the parts' commands and load averages listed."""
    metas, rows = [], []
    for part in parts:
        d = json.loads(part.read_text())
        metas.append({k: v for k, v in d.items() if k != "rows"})
        rows += [{"workload": d.get("workload", "short"), **r} for r in d["rows"] if "peak_rss_mb" in r]
    rows.sort(key=lambda r: (r["objective"], list(VARIANTS).index(r["variant"])))
    meta = {**metas[-1], "command": " ; ".join(m["command"] for m in metas),
            "load_average_at_start": [m["load_average_at_start"] for m in metas], "parts": metas}
    out_stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    _write_md(out_stem.with_suffix(".md"), meta, rows)


def _write_md(path: Path, meta: dict, rows: list[dict]) -> None:
    commands = meta["command"].split(" ; ")
    lines = [f"# Memory fixes, each against the run without it ({meta['machine']}, {meta['date']})", "",
             *[f"    PYTHONPATH=. OMP_NUM_THREADS={meta['omp_num_threads']} {c}" for c in commands], "",
             f"`denser train --objective OBJ --model default {' '.join(meta['flags'])} --cpu --eval-size 4` (the "
             f"{meta['workload']} workload; fp32, gradient checkpointing only where the variant says), each variant in "
             "its own process; the `trl` variants are TRL's GRPOTrainer on the same prompts, reward and batch (no "
             "eval, no checkpoint). The machine "
             f"was loaded (load average {meta['load_average_at_start']} at the start: other jobs ran throughout), so "
             "seconds are not comparable; memory is. Peak = the process's ru_maxrss; save = RSS rise during the final "
             "checkpoint; end = RSS after training.", "",
             "| objective | variant | peak RSS MB | vs before | save +MB | end RSS MB | seconds | optimizer |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    base = {r["objective"]: r["peak_rss_mb"] for r in rows if r.get("variant") == "before" and "peak_rss_mb" in r}
    for r in rows:
        if "peak_rss_mb" not in r:
            lines.append(f"| {r['objective']} | {r['variant']} | error | | | | | |")
            continue
        b = base.get(r["objective"])
        rel = f"{r['peak_rss_mb'] - b:+.0f}" if b else "-"
        save = "-" if r["save_rss_rise_mb"] is None else f"{r['save_rss_rise_mb']:.0f}"
        lines.append(f"| {r['objective']} | {r['variant']} | {r['peak_rss_mb']:.0f} | {rel} | {save} | "
                     f"{r['rss_end_mb']:.0f} | {r['seconds']:.0f} | {r['optimizer']} |")
    lines += ["", "Variants: " + "; ".join(f"`{k}` = {', '.join(sorted(v)) or 'no fix'}" for k, v in VARIANTS.items())]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
