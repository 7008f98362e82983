"""``denser report`` and ``denser compare``.

    denser report RUN [RUN ...]                     # re-render <run>/report.md and plots from continual.json
    denser report drift A B [--tasks a,b] [--out DIR]   # every drift measure of model B against model A
    denser compare RUN RUN [...] [--out DIR] [--labels x,y]  # runs overlaid in one report
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path


def report_main(argv: list[str]) -> int:
    from denser.cli import CLIError

    if argv and argv[0] == "drift":
        return drift_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="denser report",
        description="Render report.md and plots of `denser continual` runs from their continual.json. "
                    "`denser report drift A B --help`: drift of one model from another.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="continual run directories")
    args = p.parse_args(argv)
    from denser.analysis.report import write_run_report

    for run in args.runs:
        try:
            out = write_run_report(run)
        except ValueError as e:
            raise CLIError(str(e)) from None
        print(f"report: {out}")
    return 0


def drift_main(argv: list[str]) -> int:
    from denser.cli import CLIError

    p = argparse.ArgumentParser(
        prog="denser report drift",
        description="Parameter drift, response drift (KL(B || A) on B's greedy responses, similarity to A's), "
                    "accuracy and formatting artifacts of model B against model A. A model is 'default', 'tiny', "
                    "a model or checkpoint directory, a run directory (its newest checkpoint), or RUN@K for stage K "
                    "of a `denser continual` run.")
    p.add_argument("a", metavar="A", help="the reference model (e.g. the initial one)")
    p.add_argument("b", metavar="B", help="the model whose drift from A is measured")
    p.add_argument("--tasks", default="", help="comma-separated tasks whose eval prompts are used "
                   "(default: the columns of a continual run given as A or B, else the default task)")
    p.add_argument("--eval-size", type=int, default=16, help="prompts per task (default: 16)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="generation budget (default: 24)")
    p.add_argument("--spectral-rank", type=int, default=16, help="r of the singular-subspace drift (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="task generation seed (and the tiny model's)")
    p.add_argument("--backend", default="auto", help="loss-core backend for KL and entropy")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--out", default="", help="write drift.json and drift.md into this directory")
    args = p.parse_args(argv)
    from denser.analysis.checkpoints import compare_checkpoints, drift_markdown

    if args.eval_size < 1 or args.max_new_tokens < 1 or args.spectral_rank < 0:
        raise CLIError("--eval-size and --max-new-tokens must be >= 1 and --spectral-rank >= 0")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        result = compare_checkpoints(args.a, args.b, tasks=tasks, eval_size=args.eval_size,
                                     max_new_tokens=args.max_new_tokens, spectral_rank=args.spectral_rank,
                                     seed=args.seed, backend=args.backend, device="cpu" if args.cpu else None,
                                     log=lambda m: print(m, flush=True))
    except ValueError as e:
        raise CLIError(str(e)) from None
    text = drift_markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "drift.json").write_text(json.dumps(result, indent=1))
        (out / "drift.md").write_text(text)
        print(f"written: {out / 'drift.json'}, {out / 'drift.md'}")
    return 0


def compare_main(argv: list[str]) -> int:
    from denser.cli import CLIError

    p = argparse.ArgumentParser(prog="denser compare",
                                description="Overlay several `denser continual` runs (e.g. grpo vs sdpo vs hybrid) "
                                            "in one report: <out>/report.md and <out>/plots/compare_*.png.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="continual run directories")
    p.add_argument("--out", default="runs/compare", help="report directory (default: runs/compare)")
    p.add_argument("--labels", default="", help="comma-separated run names for legends (default: objective and teacher)")
    args = p.parse_args(argv)
    from denser.analysis.report import write_compare_report

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    try:
        out = write_compare_report(args.runs, args.out, labels=labels, command="denser compare " + shlex.join(argv))
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"report: {out}")
    return 0
