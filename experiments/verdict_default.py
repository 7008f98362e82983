"""GRPO vs SDPO on the README's main job (default task, embedded model, the library's defaults),
three seeds each, greedy and sampled (mean@4) eval before and after; then a mean ± standard-error
table (issue 11, item 7).

    python experiments/verdict_default.py run      # the runs not yet finished, one after another
    python experiments/verdict_default.py run 2    # only seed 2's (two drivers on disjoint seeds run in parallel)
    python experiments/verdict_default.py table    # the table from the finished runs (markdown)

Each run is exactly the README's main job (``denser train --objective sdpo``, or ``grpo``) with
``--seed S --eval-samples 4`` added (and ``--log-teacher-entropy`` for sdpo, which only logs); its
``metrics.jsonl`` and ``config.yaml`` are copied to ``experiments/results/verdict_default/<name>/``
when it finishes (checkpoints are not kept), and a finished run is not run again. One thread per run
(``OMP_NUM_THREADS=1``, set here unless given), so a rerun reproduces a run's numbers exactly on CPU.

A variant of the runs (other flags, kept apart from the recorded ones) comes from the environment:

    VERDICT_TAG=bf16 VERDICT_FLAGS="--mixed-precision bf16" VERDICT_OBJECTIVES=sdpo \
        python experiments/verdict_default.py run          # -> experiments/results/verdict_default-bf16/

``VERDICT_FLAGS`` are added to every run's command, ``VERDICT_TAG`` names its results and run
directories (``verdict_default-<tag>``), ``VERDICT_OBJECTIVES`` (comma-separated) limits the objectives.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TAG = os.environ.get("VERDICT_TAG", "")
RESULTS = ROOT / "experiments" / "results" / ("verdict_default" + (f"-{_TAG}" if _TAG else ""))
WORK = ROOT / "runs" / ("verdict_default" + (f"-{_TAG}" if _TAG else ""))
SEEDS = (0, 1, 2)
OBJECTIVES = tuple(os.environ.get("VERDICT_OBJECTIVES", "grpo,sdpo").split(","))
FLAGS = shlex.split(os.environ.get("VERDICT_FLAGS", ""))


def command(objective: str, seed: int) -> list[str]:
    extra = ["--log-teacher-entropy"] if objective == "sdpo" else []
    return [sys.executable, "-m", "denser", "train", "--objective", objective, "--seed", str(seed),
            "--eval-samples", "4", *extra, *FLAGS, "--no-progress", "--overwrite",
            "--output-dir", str(WORK / f"{objective}-s{seed}")]


def run(seeds: tuple[int, ...] = SEEDS) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    for seed in seeds:
        for objective in OBJECTIVES:
            name = f"{objective}-s{seed}"
            if (RESULTS / name / "metrics.jsonl").is_file():
                continue
            cmd = command(objective, seed)
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(cmd)}", flush=True)
            (WORK).mkdir(parents=True, exist_ok=True)
            t0, cpu0 = time.time(), _children_cpu()
            with open(WORK / f"{name}.log", "w") as out:
                rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            minutes, cpu_minutes = (time.time() - t0) / 60, (_children_cpu() - cpu0) / 60
            print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {rc} after {minutes:.1f} min", flush=True)
            if rc != 0:
                return rc
            dst = RESULTS / name
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy2(WORK / name / "config.yaml", dst / "config.yaml")
            (dst / "command.txt").write_text(shlex.join(["denser", *cmd[3:-2]]) + "\n")
            (dst / "wall_minutes.txt").write_text(f"{minutes:.1f}\n")
            (dst / "cpu_minutes.txt").write_text(f"{cpu_minutes:.1f}\n")
            shutil.copy2(WORK / name / "metrics.jsonl", dst / "metrics.jsonl")  # last: it marks the run finished
    return 0


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes: a run's own cost, which the wall
    time on a shared machine is not."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _mean_se(xs: list[float], digits: int = 3) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return f"{m:.{digits}f} (1 seed)"
    se = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    return f"{m:.{digits}f} ± {se:.{digits}f}"


def table() -> int:
    rows = []
    for objective in OBJECTIVES:
        cols: dict[str, list[float]] = {k: [] for k in ("g0", "g1", "s0", "s1", "dg", "ds", "trunc", "te", "se", "min", "cpu")}
        seeds = []
        for seed in SEEDS:
            path = RESULTS / f"{objective}-s{seed}" / "metrics.jsonl"
            if not path.is_file():
                continue
            recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            evals = [r for r in recs if "eval_accuracy" in r]
            steps = [r for r in recs if "reward_mean" in r]
            first, last = evals[0], evals[-1]
            seeds.append(seed)
            cols["g0"].append(first["eval_accuracy"])
            cols["g1"].append(last["eval_accuracy"])
            cols["dg"].append(last["eval_accuracy"] - first["eval_accuracy"])
            if "eval_mean_at_n" in first:
                cols["s0"].append(first["eval_mean_at_n"])
                cols["s1"].append(last["eval_mean_at_n"])
                cols["ds"].append(last["eval_mean_at_n"] - first["eval_mean_at_n"])
            if steps and "truncated_frac" in steps[-1]:
                cols["trunc"].append(steps[-1]["truncated_frac"])
            ent = [r for r in recs if "teacher_entropy" in r]
            if ent:
                cols["te"].append(sum(r["teacher_entropy"] for r in ent) / len(ent))
                cols["se"].append(sum(r["student_entropy"] for r in ent) / len(ent))
            wall = RESULTS / f"{objective}-s{seed}" / "wall_minutes.txt"
            if wall.is_file():
                cols["min"].append(float(wall.read_text()))
            cpu = RESULTS / f"{objective}-s{seed}" / "cpu_minutes.txt"
            if cpu.is_file():
                cols["cpu"].append(float(cpu.read_text()))
        rows.append((objective, seeds, cols))
    print("| objective | seeds | greedy before | greedy after | greedy change | mean@4 before | mean@4 after "
          "| mean@4 change | truncated (last step) | CPU minutes per run | wall minutes per run |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for objective, seeds, c in rows:
        print(f"| {objective} | {','.join(map(str, seeds)) or '-'} | {_mean_se(c['g0'])} | {_mean_se(c['g1'])} "
              f"| {_mean_se(c['dg'])} | {_mean_se(c['s0'])} | {_mean_se(c['s1'])} | {_mean_se(c['ds'])} "
              f"| {_mean_se(c['trunc'])} | {_mean_se(c['cpu'], 1)} | {_mean_se(c['min'], 1)} |")
    for objective, _, c in rows:
        if c["te"]:
            print(f"\n{objective}: mean teacher entropy on distilled tokens {_mean_se(c['te'])}, "
                  f"student {_mean_se(c['se'])} (nats, mean over steps, then over seeds)")
    return 0


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("run", "table"):
        sys.exit(__doc__)
    if what == "table":
        sys.exit(table())
    sys.exit(run(tuple(int(a) for a in sys.argv[2:]) or SEEDS))
