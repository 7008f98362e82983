"""Continual post-training at a scale that separates the objectives: GRPO (SDPO's baseline settings),
SDPO with an EMA teacher, SDPO with a frozen teacher and the loss-blend hybrid at lam 0.5, three seeds
each, plus the density frontier (hybrid at lam 0, 0.25, 0.75, 1 with seed 0, lam 0.25 and 0.75 with
seed 1; lam 0.5 is the grid's run), on the embedded SmolLM2-135M-Instruct, on CPU.

    python experiments/continual_grid.py run        # every run not yet finished, one after another
    python experiments/continual_grid.py run --jobs 2 --only seed0
    python experiments/continual_grid.py status     # which runs are finished, running, left
    python experiments/continual_grid.py report     # denser compare over the finished runs
    python experiments/continual_grid.py rerun sdpo_frozen-s0   # the same run again; compare the records
    python experiments/continual_grid.py diff hybrid_lam0-s0 sdpo_ema-s0   # two runs' records, field by field

The grid is a list of independent runs (``RUNS`` below). ``run`` skips every run whose
``continual.json`` is already under ``experiments/results/continual_grid/runs/<name>/`` (committed
results), and resumes an interrupted one after its last finished stage (``denser continual
--resume``); so a later session continues where this one stopped. A finished run's record, report,
plots and responses are copied to the results folder and its checkpoints are deleted (3 stages x
540 MB). ``run`` prints the exact ``denser continual`` command of each run, and
``results/continual_grid/runs/<name>/command.txt`` keeps it.

Sequence: ``larger`` -> ``subtract`` -> ``multiply`` (trained), ``smaller`` and ``units`` held out.
The pilot (8 steps of each task alone, the library defaults, 48 greedy prompts, 2026-11-29): the
initial model scores larger 0.56, subtract 0.33, multiply 0.48, smaller 0.52, units 0.42; 8 GRPO
steps moved larger to 0.94 and subtract to 0.46 while 8 SDPO steps took larger to 0.00, so 8 steps
per task move the first task measurably for both objectives. Evaluation: the first 48 eval prompts
of each task, greedy at every stage, mean@4 sampled (temperature 0.6, top-p 0.95) at the first and
last stage. Shared settings: 4 prompts x 4 completions a step, 32 new tokens, AdamW lr 2e-5
constant, weight decay 0.01, beta2 0.999, gradient clipping 1.0, the per-sequence token mean;
the optimizer is reset at every stage. GRPO uses SDPO's baseline loss (configs/grpo_sdpo_baseline.yaml:
clip 0.2/0.28, dual clip 3, advantages not divided by the std, 4 mini-batch updates per rollout
batch, no shuffling); SDPO uses SDPO's defaults (configs/sdpo.yaml: top-100 + tail, alpha 0.5,
IS clip 2, EMA rate 0.05); the hybrid uses both.

Runs are deterministic on CPU with one thread (``OMP_NUM_THREADS=1``, set here unless given):
``denser continual`` on ``--model tiny`` is bit-identical across runs and across a stop and resume
(tests/test_continual_preemption.py), and ``rerun sdpo_frozen-s0`` reproduced that run's whole record
(accuracy matrix, drift, every step's loss; ``results/continual_grid/rerun-sdpo_frozen-s0.md``), as
``hybrid_lam0-s0`` reproduced ``sdpo_ema-s0``'s (``diff``: hybrid at lam 0 is SDPO's loss). A run
took 32-55 minutes on one core (2026-11-29/30, one or two other runs sharing the 2 cores); the first
run of a seed also measures the initial model (about 11 minutes of that).
``report`` renders ``denser compare``: mean ± se over seeds, the claims table and the density frontier.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results" / "continual_grid"
WORK = ROOT / "runs" / "continual_grid"  # checkpoints and logs while a run is going (not committed)
RERUN = ROOT / "runs" / "continual_grid_rerun"  # `rerun NAME`: the same command again, to check determinism

TASKS, HELD_OUT = "larger,subtract,multiply", "smaller,units"
SEEDS = (0, 1, 2)
STEPS_PER_TASK = 8

COMMON = ["--model", "default", "--tasks", TASKS, "--eval-tasks", HELD_OUT,
          "--steps-per-task", str(STEPS_PER_TASK), "--prompts-per-step", "4", "--num-generations", "4",
          "--max-new-tokens", "32", "--micro-batch-size", "8",
          "--lr", "2e-5", "--lr-schedule", "constant", "--warmup-steps", "0", "--weight-decay", "0.01",
          "--adam-beta2", "0.999", "--max-grad-norm", "1.0", "--temperature", "1.0", "--top-p", "1.0",
          "--eval-size", "48", "--eval-samples", "4", "--sampled-eval-stages", "first-last",
          "--spectral-rank", "16", "--loss-agg-mode", "seq-mean-token-mean", "--no-progress"]
# SDPO's GRPO baseline (configs/grpo_sdpo_baseline.yaml), the loss part
GRPO = ["--clip-low", "0.2", "--clip-high", "0.28", "--clip-ratio-c", "3.0", "--kl-coef", "0.0",
        "--entropy-coef", "0.0", "--scale-rewards", "none"]
GRPO_UPDATES = ["--mini-batches", "4", "--no-shuffle-mini-batches"]
# SDPO's defaults (configs/sdpo.yaml), the loss and teacher part
SDPO = ["--alpha", "0.5", "--distill-mode", "topk", "--topk", "100", "--add-tail", "--is-clip", "2.0",
        "--teacher-update-rate", "0.05", "--success-threshold", "0.5", "--dont-reprompt-on-self-success",
        "--remove-thinking", "--no-include-feedback"]


def _runs() -> dict[str, dict]:
    """name -> {args, seed, label, group}; the order is the order ``run`` takes them in."""
    runs: dict[str, dict] = {}
    for seed in SEEDS:
        grid = {
            "grpo": ("grpo (SDPO baseline)", ["--objective", "grpo", *GRPO, *GRPO_UPDATES]),
            "sdpo_ema": ("sdpo (EMA teacher)", ["--objective", "sdpo", "--teacher", "ema", *SDPO]),
            "sdpo_frozen": ("sdpo (frozen teacher)", ["--objective", "sdpo", "--teacher", "frozen", *SDPO]),
            "hybrid": ("hybrid (lam 0.5)", ["--objective", "hybrid", "--lam", "0.5", "--teacher", "ema", *GRPO, *SDPO]),
        }
        for key, (label, args) in grid.items():
            runs[f"{key}-s{seed}"] = {"args": args, "seed": seed, "label": label, "group": f"seed{seed}"}
    # the frontier: lam 0.5 is the grid's hybrid; a second seed where seed 0 showed the threshold
    # (lam 0.25 lost the answer format, lam 0.75 did not)
    for lam, seed in [(0.0, 0), (0.25, 0), (0.75, 0), (1.0, 0), (0.25, 1), (0.75, 1)]:
        runs[f"hybrid_lam{lam:g}-s{seed}"] = {
            "args": ["--objective", "hybrid", "--lam", f"{lam:g}", "--teacher", "ema", *GRPO, *SDPO],
            "seed": seed, "label": f"hybrid (lam {lam:g})", "group": "frontier" if seed == 0 else "frontier-s1"}
    return runs


RUNS = _runs()
GROUPS = ", ".join(dict.fromkeys(s["group"] for s in RUNS.values()))  # seed0, seed1, seed2, frontier, frontier-s1


def command(name: str, work: Path = WORK) -> list[str]:
    spec = RUNS[name]
    cmd = [sys.executable, "-m", "denser", "continual", *spec["args"], *COMMON, "--seed", str(spec["seed"]),
           "--output-dir", str(work / name), "--resume"]
    first = _first_of_seed(spec["seed"])
    if name != first:  # stage 0 (the initial model, this seed) is measured once per seed
        cmd += ["--initial-eval-from", str(_stage0_source(first))]
    return cmd


def _first_of_seed(seed: int) -> str:
    """The run of ``seed`` that measures stage 0 (the initial model); the others reuse it."""
    return next(n for n, s in RUNS.items() if s["seed"] == seed)


def _stage0_source(name: str) -> Path:
    return RESULTS / "runs" / name if (RESULTS / "runs" / name / "continual.json").is_file() else WORK / name


def finished(name: str) -> bool:
    return (RESULTS / "runs" / name / "continual.json").is_file()


def _wait_for_stage0(name: str, log) -> None:
    spec = RUNS[name]
    first = _first_of_seed(spec["seed"])
    if name == first:
        return
    while True:
        src = _stage0_source(first) / "continual.json"
        if src.is_file() and json.loads(src.read_text()).get("stages"):
            return
        log(f"{name}: waiting for {first}'s stage 0")
        time.sleep(60)


def _publish(name: str) -> None:
    """Copy what is committed (no checkpoints), then free the disk."""
    src, dst = WORK / name, RESULTS / "runs" / name
    dst.mkdir(parents=True, exist_ok=True)
    for item in ("report.md", "plots", "responses"):
        if (src / item).is_dir():
            shutil.copytree(src / item, dst / item, dirs_exist_ok=True)
        elif (src / item).is_file():
            shutil.copy2(src / item, dst / item)
    text = shlex.join(["python", *command(name)[1:]]).replace(str(ROOT) + "/", "")
    (dst / "command.txt").write_text(f"# made by: python experiments/continual_grid.py run (OMP_NUM_THREADS=1)\n{text}\n")
    shutil.copy2(src / "continual.json", dst / "continual.json.tmp")
    os.replace(dst / "continual.json.tmp", dst / "continual.json")  # last: its presence means finished
    for ckpt in src.glob("**/checkpoints"):
        shutil.rmtree(ckpt, ignore_errors=True)


def _launch(name: str, work: Path, log) -> int:
    """Run ``name``'s command with its output directory under ``work``, appending to ``work/<name>.log``."""
    cmd = command(name, work)
    (work / name).mkdir(parents=True, exist_ok=True)
    log(f"{name}: {shlex.join(cmd)}")
    with open(work / f"{name}.log", "a") as out:
        return subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def run_one(name: str) -> int:
    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    _wait_for_stage0(name, log)
    t0 = time.time()
    rc = _launch(name, WORK, log)
    if rc == 0:
        _publish(name)
    log(f"{name}: exit {rc} after {(time.time() - t0) / 60:.1f} min (log {WORK / name}.log)")
    return rc


def record_differences(original: dict, rerun: dict, original_dir: str, rerun_dir: str) -> tuple[list[str], int]:
    """Where ``rerun``'s ``continual.json`` differs from ``original``'s, over the stages the rerun has
    finished: ``(paths of the differing fields, stages compared)``. Wall-clock times (keys ending in
    ``time_s``) and the run's own directory (``rerun_dir`` where ``original_dir`` stood) are not
    compared; a rerun still going is compared on its finished stages, and its unfinished summary
    fields (``status``, ``metrics``, ``in_progress``) are left out until it has finished."""
    done = len(rerun.get("stages", []))
    partial = rerun.get("status") != "complete"
    skip = {"status", "metrics", "in_progress", "elapsed_s"} if partial else {"elapsed_s"}
    diffs: list[str] = []

    def walk(a, b, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key.endswith("time_s") or (path == "" and key in skip):
                    continue
                walk(a.get(key), b.get(key), f"{path}.{key}")
        elif isinstance(a, list) and isinstance(b, list):
            if path in (".stages", ".accuracy_matrix") and partial:
                a = a[:done]
            if len(a) != len(b):
                diffs.append(f"{path} (length {len(a)} vs {len(b)})")
            for i, (u, v) in enumerate(zip(a, b)):
                walk(u, v, f"{path}[{i}]")
        elif isinstance(b, str) and isinstance(a, str):
            if b.replace(rerun_dir, original_dir) != a:
                diffs.append(path)
        elif a != b:
            diffs.append(path)

    walk(original, rerun, "")
    return diffs, done


def verify(name: str, rerun_dir: Path | None = None) -> int:
    """Compare the rerun of ``name`` with its committed record; write ``rerun-<name>.md``. 0: identical."""
    rerun_dir = rerun_dir or RERUN / name
    original_file, rerun_file = RESULTS / "runs" / name / "continual.json", rerun_dir / "continual.json"
    for f, what in ((original_file, "a finished run (its committed record)"), (rerun_file, "a rerun (run `rerun` first)")):
        if not f.is_file():
            print(f"verify {name}: no {f}; verify needs {what}", file=sys.stderr)
            return 2
    original, rerun = json.loads(original_file.read_text()), json.loads(rerun_file.read_text())
    original_dir = original["config"]["output_dir"]
    diffs, done = record_differences(original, rerun, original_dir, str(rerun_dir))
    total = len(original["stages"])
    same_matrix = not any(d.startswith(".accuracy_matrix") for d in diffs)
    lines = [f"# Rerun of `{name}`: {'identical' if not diffs else 'DIFFERENT'} "
             f"({done} of {total} stages{', the rerun still going' if done < total else ''})", "",
             "```", shlex.join(["python", *command(name, rerun_dir.parent)[1:]]).replace(str(ROOT) + "/", ""), "```", "",
             f"Compared with the committed `runs/{name}/continual.json`, stage by stage: every field of the "
             "record (accuracy matrix, per-task eval results and sampled accuracies, parameter and response "
             "drift, every training step's loss, rewards and lengths, the configuration) except wall-clock "
             "times and the run's own directory.", "",
             f"- accuracy matrix, stages 0-{done - 1}: {'identical' if same_matrix else 'different'}",
             f"- other fields that differ: {', '.join(d for d in diffs if not d.startswith('.accuracy_matrix')) or 'none'}"]
    if "--initial-eval-from" in command(name):
        lines.append("- stage 0 (the initial model) is measured once per seed and reused, as in the original run: "
                     "stages 1 onwards are the check")
    out = RESULTS / f"rerun-{name}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not diffs else 1


SETUP = (".command", ".config", ".objective", ".objective_args")  # what a run was told, not what it measured


def diff_runs(a: str, b: str, results: Path = RESULTS) -> int:
    """Compare two finished runs' records (e.g. ``hybrid_lam0-s0`` and ``sdpo_ema-s0``: hybrid at lam 0
    is SDPO's loss); write ``diff-<a>-<b>.md``. 0: every measured field is identical, only what the
    runs were told (command, configuration, objective and its arguments) differs."""
    records = {}
    for name in (a, b):
        f = results / "runs" / name / "continual.json"
        if not f.is_file():
            print(f"diff: no {f}; diff compares two finished runs", file=sys.stderr)
            return 2
        records[name] = json.loads(f.read_text())
    ra, rb = records[a], records[b]
    diffs, done = record_differences(ra, rb, ra["config"]["output_dir"], rb["config"]["output_dir"])
    setup = [d for d in diffs if d.startswith(SETUP)]
    measured = [d for d in diffs if not d.startswith(SETUP)]
    verdict = "the same measurements" if not measured else "DIFFERENT measurements"
    lines = [f"# `{a}` and `{b}`: {verdict} ({done} stages)", "",
             f"Every field of `runs/{a}/continual.json` against `runs/{b}/continual.json` (accuracy matrix, per-task "
             "eval results and sampled accuracies, parameter and response drift, every training step's loss, "
             "rewards and lengths), except wall-clock times and the runs' own directories.", "",
             f"- measured fields that differ: {', '.join(measured) or 'none'}",
             f"- what the runs were told that differs: {', '.join(setup) or 'nothing'}"]
    if RUNS[a]["seed"] == RUNS[b]["seed"]:
        lines.append("- both runs start from the same initial model, measured once per seed (stage 0): "
                     "stages 1 onwards are the check")
    lines += ["", f"`python experiments/continual_grid.py diff {a} {b}` wrote this file."]
    (results / f"diff-{a}-{b}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if not measured else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every unfinished run (or those of --only)")
    r.add_argument("--only", default="", help=f"comma-separated run names or groups ({GROUPS})")
    r.add_argument("--jobs", type=int, default=1, help="runs at once (each single-threaded)")
    sub.add_parser("status", help="finished / left")
    sub.add_parser("report", help="denser compare over the finished runs")
    sub.add_parser("commands", help="print every run's command")
    rr = sub.add_parser("rerun", help="run a finished run again (resumable) and compare its record with the committed one")
    rr.add_argument("name", choices=list(RUNS))
    v = sub.add_parser("verify", help="compare a rerun (finished or not) with the committed record")
    v.add_argument("name", choices=list(RUNS))
    v.add_argument("--dir", type=Path, default=None, help=f"the rerun's output directory (default {RERUN}/NAME)")
    d = sub.add_parser("diff", help="compare two finished runs' records: which measured fields differ")
    d.add_argument("a", choices=list(RUNS))
    d.add_argument("b", choices=list(RUNS))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    if args.cmd == "commands":
        for name in RUNS:
            print(shlex.join(command(name)))
        return 0
    if args.cmd == "status":
        for name, spec in RUNS.items():
            state = "finished" if finished(name) else ("started" if (WORK / name).exists() else "left")
            print(f"{name:22s} {spec['group']:12s} {state}")
        return 0
    if args.cmd == "report":
        return report()
    if args.cmd == "diff":
        return diff_runs(args.a, args.b)
    if args.cmd == "verify":
        return verify(args.name, args.dir.resolve() if args.dir else None)
    if args.cmd == "rerun":
        if not finished(args.name):
            p.error(f"rerun: {args.name} has no committed record yet; `run --only {args.name}` first")
        return _launch(args.name, RERUN, lambda msg: print(msg, flush=True)) or verify(args.name)
    wanted = {w for w in args.only.split(",") if w}
    unknown = wanted - set(RUNS) - {s["group"] for s in RUNS.values()}
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; names: {', '.join(RUNS)}; groups: {GROUPS}")
    todo = [n for n, s in RUNS.items() if not finished(n) and (not wanted or n in wanted or s["group"] in wanted)]
    print(f"{len(todo)} runs to do: {', '.join(todo)}", flush=True)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        codes = list(pool.map(run_one, todo))
    return max(codes, default=0)


def report() -> int:
    """One comparison of the finished runs: the grid (seeds pooled per label) and the frontier."""
    done = [n for n in RUNS if finished(n)]
    if not done:
        print("no finished runs yet", file=sys.stderr)
        return 1
    dirs = [str((RESULTS / "runs" / n).relative_to(ROOT)) for n in done]  # relative: the report quotes them
    labels = ",".join(RUNS[n]["label"] for n in done)
    cmd = [sys.executable, "-m", "denser", "compare", *dirs, "--labels", labels, "--out", str(RESULTS.relative_to(ROOT))]
    print(shlex.join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
