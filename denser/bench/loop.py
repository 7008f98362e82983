"""Loop benchmark: seconds per step and tokens per second of `denser train`, split into
generation, signals (scoring, teacher/reference forwards) and the policy update.

    denser bench loop                                # grpo and sdpo on the tiny model
    denser bench loop --model default --steps 3      # the embedded SmolLM2-135M-Instruct
    denser bench loop --objectives grpo --steps 2 --max-new-tokens 8   # other flags go to `denser train`
    denser bench loop --model default --objectives sdpo --engine hf,vllm   # the engines side by side

With several engines (``--engine hf,vllm``) each objective runs once per engine; ``sync s`` is the
weight sync of an engine with its own copy of the weights (vllm), ``gen tokens/s`` the completion
tokens per second of generation alone.

Each objective runs `python -m denser train` in a subprocess (into a temporary run directory), as
a user runs it; the per-step times come from its metrics.jsonl. The first step is a warm-up and
is left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# The run's own evaluations (before and after training) are not part of a step: keep them small.
TRAIN_DEFAULTS = ["--no-progress", "--eval-size", "1"]


def run(objective: str, model: str, steps: int, extra: list[str], engine: str | None = None) -> dict:
    """Train ``objective`` for ``steps`` steps and return the medians of its per-step timings."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "denser", "train", "--objective", objective, "--model", model,
               "--steps", str(steps), "--output-dir", out, *TRAIN_DEFAULTS, *extra,
               *(["--engine", engine] if engine else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise RuntimeError(f"denser train --objective {objective}{f' --engine {engine}' if engine else ''} "
                               f"failed: {last}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        cfg = yaml.safe_load((Path(out) / "config.yaml").read_text())
    steps_rows = [r for r in rows if "step_time_s" in r]  # eval rows hold only eval_accuracy
    timed = steps_rows[1:] or steps_rows
    med = lambda k: statistics.median(r.get(k, 0.0) for r in timed)  # noqa: E731
    tokens = med("response_length") * cfg["prompts_per_step"] * cfg["num_generations"]
    return {"objective": objective, "model": model, "engine": cfg["engine"], "s_per_step": med("step_time_s"),
            "tokens_per_s": med("tokens_per_s"), "generate_s": med("time_generate_s"),
            "signals_s": med("time_signals_s"), "update_s": med("time_update_s"), "sync_s": med("time_sync_s"),
            "generate_tokens_per_s": tokens / max(med("time_generate_s"), 1e-9), "completion_tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="denser bench loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="tiny (random-init), default (the embedded SmolLM2-135M-Instruct) or a local model dir")
    p.add_argument("--objectives", default="grpo,sdpo", help="comma-separated objectives, one run each")
    p.add_argument("--steps", type=int, default=4, help="training steps per run (the first is a warm-up)")
    p.add_argument("--engine", default=None, help="comma-separated rollout engines, one run each (hf,vllm); "
                   "default: the run's (hf)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a, extra = p.parse_known_args(argv)
    engines = [e.strip() for e in a.engine.split(",") if e.strip()] if a.engine else [None]
    try:
        rows = [run(o, a.model, a.steps, extra, e) for o in a.objectives.split(",") for e in engines]
    except RuntimeError as e:
        print(f"denser bench loop: error: {e}", file=sys.stderr)
        return 2
    print(f"loop, model={a.model}, {os.cpu_count()} CPU threads, {platform.machine()}, extra flags: {' '.join(extra) or '-'}\n")
    print("| objective | engine | s/step | tokens/s | generate s | gen tokens/s | sync s | signals s | update s "
          "| completion tokens/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['objective']} | {r['engine']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['generate_s']:.2f} | {r['generate_tokens_per_s']:.1f} | {r['sync_s']:.2f} | {r['signals_s']:.2f} | "
              f"{r['update_s']:.2f} | {r['completion_tokens']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
