"""LoRA benchmark: peak RSS and seconds per step of `denser train`, full fine-tuning against LoRA.

    denser bench lora                                    # grpo and sdpo (EMA teacher), full and --lora-r 16
    denser bench lora --steps 3 --lora-r 8 --cases full-grpo,lora-grpo
    denser bench lora --out-dir bench/results            # also write lora-<date>.json and .md there

Each case runs ``python -m denser train`` in a child process on the embedded model (``--model
default``, SmolLM2-135M-Instruct, fp32) as a user runs it. ``train_peak_rss_mb`` is the child's
peak resident memory from the start of training (the models loaded; the high-water mark reset
there, ``/proc/self/clear_refs``) to its end: the model, and for full fine-tuning its gradients,
the two AdamW moments and the EMA teacher's copy; for LoRA one base model and the adapter's share
of those. ``peak_rss_mb`` is the peak over the child's whole life, model loading included;
``setup_rss_mb`` the RSS when training starts. ``s_per_step`` the median of its metrics.jsonl ``step_time_s`` with the
first step left out as a warm-up, and ``update_s`` the policy-update part of it. Seconds are
comparable only between cases of one run on an otherwise idle machine: the results record the load
average.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

import yaml

from denser.bench.step_case import _reset_peak, _status_kb
from denser.bench.step_report import _cpu_name, _versions

#: case -> the `denser train` flags it adds (the LoRA cases get --lora-r from the command line)
CASES: dict[str, list[str]] = {
    "full-grpo": ["--objective", "grpo"],
    "lora-grpo": ["--objective", "grpo"],
    "full-sdpo": ["--objective", "sdpo", "--teacher", "ema"],
    "lora-sdpo": ["--objective", "sdpo", "--teacher", "ema"],
}
# the run's own evaluations (before and after training) are not part of a step: keep them small
TRAIN_DEFAULTS = ["--no-progress", "--eval-size", "1", "--cpu"]
MARK = "LORA_BENCH_RSS "
# the child reports its own peaks (ru_maxrss of a reaped child would be the maximum over every child
# this process ever waited for)
# (the command line is a layer above the benchmarks: the child's own code imports it)
CHILD = "import sys; from denser.bench.lora import child; from denser.cli import main; sys.exit(child(main, sys.argv[1:]))"


def child(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """In the child process: ``main(argv)`` (``denser``'s command line: ``train ...``), the
    high-water mark reset when training starts; prints ``MARK`` and the RSS figures as JSON."""
    # lazy: the loop imports transformers and accelerate; `denser bench --help` should not wait for them
    from denser.trainers import loop

    marks: dict[str, float | bool | None] = {}
    real_train = loop.Trainer.train

    def train(self):
        marks["setup_rss_kb"] = _status_kb("VmRSS")
        marks["reset"] = _reset_peak()
        return real_train(self)

    loop.Trainer.train = train
    rc = main(argv)
    marks["train_hwm_kb"] = _status_kb("VmHWM") if marks.get("reset") else None
    marks["maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(MARK + json.dumps(marks), flush=True)
    return rc


def run_case(case: str, model: str, steps: int, lora_r: int, extra: list[str], threads: int) -> dict:
    """Train one case in a child process; its peak RSS and per-step timings."""
    flags = [*CASES[case], *(["--lora-r", str(lora_r)] if case.startswith("lora") else []), *extra]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {})}
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", CHILD, "train", "--model", model, "--steps", str(steps), "--output-dir", out,
               *TRAIN_DEFAULTS, *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            return {"case": case, "status": "error", "message": last}
        marks = [json.loads(line[len(MARK):]) for line in proc.stdout.splitlines() if line.startswith(MARK)]
        rss = marks[-1] if marks else {}
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        cfg = yaml.safe_load((Path(out) / "config.yaml").read_text())
    timed = [r for r in rows if "step_time_s" in r]
    timed = timed[1:] or timed  # the first step is a warm-up

    def med(key: str) -> float:
        return statistics.median(r[key] for r in timed)

    def mb(key: str) -> float | None:
        return rss[key] / 1024 if rss.get(key) is not None else None

    return {"case": case, "status": "ok", "flags": flags, "train_peak_rss_mb": mb("train_hwm_kb"),
            "peak_rss_mb": mb("maxrss_kb"), "setup_rss_mb": mb("setup_rss_kb"),
            "s_per_step": med("step_time_s"), "update_s": med("time_update_s"), "generate_s": med("time_generate_s"),
            "signals_s": med("time_signals_s"), "steps_timed": len(timed),
            "completion_tokens": med("response_length") * cfg["prompts_per_step"] * cfg["num_generations"]}


def _peft_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("peft")
    except PackageNotFoundError:
        return None


def _gib(mb: float | None) -> str:
    return "-" if mb is None else f"{mb / 1024:.2f} GiB"


def _ratio(rows: dict[str, dict], key: str, objective: str) -> str:
    full, lora = rows.get(f"full-{objective}"), rows.get(f"lora-{objective}")
    if not (full and lora and full.get(key) and lora.get(key)):
        return "-"
    return f"x{lora[key] / full[key]:.2f}"


def markdown(result: dict) -> str:
    m, rows = result["machine"], {r["case"]: r for r in result["rows"]}
    lines = [f"# LoRA benchmark ({m['cpus']}-core {m['machine']} CPU, {result['date']})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs; load average when it started: {m['load_average_at_start']} "
             "(a loaded machine: other jobs shared the cores, so seconds are noisy; the LoRA/full ratios come from "
             "cases of this one run); versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
             "", f"`denser train --model {result['model']}` for {result['steps']} steps (the first a warm-up, left "
             f"out of the seconds), LoRA rank {result['lora_r']} on every linear layer of the blocks, fp32"
             + (f", extra flags `{' '.join(result['extra_flags'])}`" if result.get("extra_flags") else "") + ". "
             "Training peak: the peak RSS from the start of training (models loaded) to its end (model, gradients, "
             "AdamW state, EMA teacher, activations); lifetime peak: model loading included; at start: the RSS when "
             "training starts.", "",
             "| case | training peak RSS | lifetime peak RSS | RSS at start | s/step | update s | generate s | signals s "
             "| completion tokens/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['status']}: {r.get('message', '')} | | | | | |")
            continue
        lines.append(f"| {r['case']} | {_gib(r.get('train_peak_rss_mb'))} | {_gib(r.get('peak_rss_mb'))} | "
                     f"{_gib(r.get('setup_rss_mb'))} | {r['s_per_step']:.1f} | {r['update_s']:.1f} "
                     f"| {r['generate_s']:.1f} | {r['signals_s']:.1f} | {r['completion_tokens']:.0f} |")
    lines += ["", "LoRA / full:", ""]
    for objective in ("grpo", "sdpo"):
        if f"full-{objective}" in rows or f"lora-{objective}" in rows:
            lines.append(f"- {objective}: training peak RSS {_ratio(rows, 'train_peak_rss_mb', objective)}, lifetime "
                         f"peak RSS {_ratio(rows, 'peak_rss_mb', objective)}, s/step "
                         f"{_ratio(rows, 's_per_step', objective)}, update s {_ratio(rows, 'update_s', objective)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="denser bench lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="default (the embedded SmolLM2-135M-Instruct), tiny or a model dir")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=3, help="training steps per case (the first is a warm-up)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the lora-* cases")
    p.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of each child (0: torch's default)")
    p.add_argument("--out-dir", default=None, help="write lora-<machine>-<date>.json and .md here")
    a, extra = p.parse_known_args(argv)
    cases = [c for c in a.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown or a.steps < 1 or a.lora_r < 1:
        problem = f"unknown case(s) {', '.join(unknown)}" if unknown else "--steps and --lora-r must be >= 1"
        print(f"denser bench lora: error: {problem}; cases: {', '.join(CASES)}", file=sys.stderr)
        return 2
    load = [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    result = {"date": _dt.date.today().isoformat(), "command": "denser bench lora " + " ".join(argv or sys.argv[1:]),
              "model": a.model, "steps": a.steps, "lora_r": a.lora_r, "extra_flags": extra,
              "machine": {"cpu": _cpu_name(), "cpus": os.cpu_count(), "machine": platform.machine(),
                          "load_average_at_start": load},
              "versions": {**_versions(), "peft": _peft_version()}, "rows": []}
    for case in cases:
        row = run_case(case, a.model, a.steps, a.lora_r, extra, a.threads)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if a.out_dir:  # rewritten after every case: an interrupted run keeps what it measured
            out = Path(a.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem = out / f"lora-cpu-{os.cpu_count()}core-{result['date']}"
            stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
            stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
