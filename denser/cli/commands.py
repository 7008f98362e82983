"""Every ``denser`` command: ``cmd_<name>(argv) -> exit code``.

A bad command line raises :class:`~denser.cli.flags.CLIError` (or ``ValueError``), which
:func:`denser.cli.main` prints as one line with exit code 2. What a command runs (the loop, the
continual runner, the reports, the benchmarks) is imported inside the command: those modules pull
in transformers, accelerate and matplotlib, and ``denser --help``, ``denser objectives`` or
``denser train --help`` should not wait for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from denser.cli.flags import (
    IMPORT_HELP,
    CLIError,
    TrainArgumentParser,
    add_dataclass_flags,
    add_engine_flags,
    engine_flag_values,
    list_parser,
    one_line,
    parse_continual_args,
    parse_run_args,
)
from denser.objectives import list_objectives
from denser.objectives.fields import help_field as _field
from denser.plugins import import_plugins

# -------------------------------------------------------------------------------------- training


def cmd_train(argv: list[str]) -> int:
    """Exit codes: 0 done, 2 bad input (before any compute), 1 the run stopped (non-finite updates,
    a checkpoint that could not be written), 143 / 130 stopped by SIGTERM / SIGINT (a checkpoint of
    the last finished step was written). Each error is one line on stderr."""
    run = parse_run_args(argv)  # the run, resolved once (flags, --config, the objective's run defaults, the task)
    cfg = run.config
    # imported here for start-up time (transformers, accelerate): see the module docstring
    from denser.trainers.checkpoint import CheckpointError
    from denser.trainers.evaluation import format_eval
    from denser.trainers.loop import Trainer, TrainingStopped
    from denser.trainers.models import EmbeddedModelMissingError
    from denser.trainers.preemption import Interrupted, StopSignals

    try:
        with StopSignals() as signals:  # SIGTERM / Ctrl-C: stop at the next check point and save
            summary = Trainer(run, stop_signals=signals).train()
    except EmbeddedModelMissingError as e:
        raise CLIError(str(e)) from None
    except (TrainingStopped, CheckpointError) as e:
        print(f"denser train: error: {one_line(e)}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        if stop.is_main:
            print(f"denser train: {one_line(stop.message)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # a handler could not be installed (not the main thread)
        print("denser train: interrupted; rerun with --resume to continue from the newest complete checkpoint",
              file=sys.stderr)
        return 130
    before, after = summary.get("eval_before"), summary.get("eval_after")
    if before is not None and after is not None and summary.get("is_main", True):
        print(f"eval accuracy: {format_eval(before)} -> {format_eval(after)}")
        if after.get("eval_mean_at_n") is not None and before.get("eval_mean_at_n") is not None:
            print(f"eval mean@{cfg.eval_samples}: {before['eval_mean_at_n']:.3f} ± {before['eval_mean_at_n_se'] or 0:.3f} "
                  f"-> {after['eval_mean_at_n']:.3f} ± {after['eval_mean_at_n_se'] or 0:.3f}")
    return 0


def cmd_continual(argv: list[str]) -> int:
    """``denser continual ...``: run the sequence, print where the report is. Exit codes as ``denser
    train``'s: 143 / 130 stopped by SIGTERM / SIGINT (inside a stage, that stage's last finished step
    is saved; the line printed says how to continue: the same command with ``--resume``)."""
    cfg, objective, engine, values = parse_continual_args(argv)
    # imported here for start-up time (the loop and the analysis): see the module docstring
    from denser.continual import ContinualConfig, ContinualRunner
    from denser.trainers.preemption import Interrupted, StopSignals

    resume_argv = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    if cfg.overwrite and "--overwrite" not in argv:  # set by a --config file
        resume_argv.append("--no-overwrite")
    try:
        with StopSignals() as signals:  # SIGTERM / Ctrl-C: stop at the next check point and save
            runner = ContinualRunner(cfg, objective, ContinualConfig(**values), stop_signals=signals, engine=engine)
            runner.command = "denser continual " + shlex.join(argv)
            runner.resume_command = "denser continual " + shlex.join(resume_argv)
            record = runner.run()
    except Interrupted as stop:
        print(f"denser continual: {one_line(stop.message)}", file=sys.stderr)
        return stop.exit_code
    if not runner.is_main:  # the other processes of a multi-process run: the main one reports
        return 0
    m = record["metrics"]
    print(f"final average accuracy {m['final_average_accuracy']:.3f}, average forgetting "
          f"{(m['final_average_forgetting'] or 0.0):.3f}, relative L2 drift {record['stages'][-1]['params']['relative_l2']:.3e}")
    print(f"report: {runner.run_dir / 'report.md'}  (data: {runner.run_dir / 'continual.json'})")
    return 0


# ------------------------------------------------------------------------------------ evaluation



def build_eval_parser() -> argparse.ArgumentParser:
    """``denser eval``'s parser: the model, the tasks, and the fields of ``EvalSettings`` as flags."""
    from denser.analysis.evaluation import EvalSettings  # start-up time (models): see the module docstring

    p = TrainArgumentParser(  # one-line errors, as `denser train`
        prog="denser eval",
        description="Evaluate a model or checkpoint on tasks without training: greedy accuracy, and with --samples N "
                    "the sampled mean@N, pass@k (unbiased estimator from the N samples) and maj@k (majority vote over "
                    "parsed answers, averaged over all k-subsets of the N), each with its standard error over "
                    "prompts. A table on stdout; --json FILE writes every number. On a `denser train` run directory "
                    "(or one of its checkpoints) the settings left unset are the run's own, so its final "
                    "eval line is measured again.")
    p.add_argument("--model", default="default",
                   help="'default', 'tiny', a Hugging Face model directory, a checkpoint directory (.../step-000012 or "
                        "its model/), a `denser train` run directory (its newest checkpoint) or RUN@K of a continual "
                        "run (default: default)")
    p.add_argument("--tasks", type=list_parser(str), default=None, metavar="TASK[,TASK...]",
                   help="comma-separated tasks (names, file:PATH); default: the task a run directory was trained on, "
                        "else the default task")
    p.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE|FILE.py",
                   help=IMPORT_HELP)
    add_dataclass_flags(p.add_argument_group("eval settings"), EvalSettings, flags={"ks": "k"})
    add_engine_flags(p)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--json", default="", metavar="FILE", help="also write the result as JSON to FILE")
    return p


def cmd_eval(argv: list[str]) -> int:
    """``denser eval --model M --tasks a,b [--samples N]``: a table, and JSON with ``--json``."""
    args = vars(build_eval_parser().parse_args(argv))
    import_plugins(args.pop("imports"))
    # imported here for start-up time (models, generation): see the module docstring
    from denser.analysis.evaluation import (
        EvalSettings,
        eval_table,
        evaluate_model,
        run_config,
        run_engine,
        write_json,
    )
    from denser.trainers.models import EmbeddedModelMissingError

    model, tasks, cpu, json_path = args.pop("model"), args.pop("tasks"), args.pop("cpu"), args.pop("json")
    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    # the flags given; the rest from the run (a run directory) or the defaults
    run = run_config(model)  # a run directory's config.yaml (continual.json), read once
    settings = EvalSettings(**{k: v for k, v in args.items() if k in fields}).resolve(run)
    engine = run_engine(settings, run, engine_flag_values(args, settings.engine))
    try:
        result = evaluate_model(model, tasks or None, settings, device="cpu" if cpu else None, engine=engine,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    except EmbeddedModelMissingError as e:
        raise CLIError(str(e)) from None
    print(eval_table(result))
    if json_path:
        print(f"written: {write_json(result, json_path)}")
    return 0


# --------------------------------------------------------------------------------------- reports


def cmd_report(argv: list[str]) -> int:
    """``denser report RUN [RUN ...]``: re-render ``<run>/report.md`` and plots from ``continual.json``;
    ``denser report drift A B``: every drift measure of model B against model A."""
    if argv and argv[0] == "drift":
        return cmd_report_drift(argv[1:])
    p = argparse.ArgumentParser(
        prog="denser report",
        description="Render report.md and plots of `denser continual` runs from their continual.json. "
                    "`denser report drift A B --help`: drift of one model from another.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="continual run directories")
    args = p.parse_args(argv)
    from denser.analysis.report import (
        write_run_report,  # start-up time (matplotlib): see the module docstring
    )

    for run in args.runs:
        try:
            out = write_run_report(run)
        except ValueError as e:
            raise CLIError(str(e)) from None
        print(f"report: {out}")
    return 0


@dataclasses.dataclass
class DriftSettings:
    """What ``denser report drift`` measures and how (its flags)."""

    tasks: list[str] = _field([], "comma-separated tasks whose eval prompts are used (default: the columns of a "
                              "continual run given as A or B, else the default task)", metavar="TASK[,TASK...]")
    eval_size: int = _field(16, "prompts per task")
    max_new_tokens: int = _field(24, "generation budget")
    spectral_rank: int = _field(16, "r of the singular-subspace drift (0 = off)")
    seed: int = _field(0, "task generation seed (and the tiny model's)")
    backend: str = _field("auto", "loss-core backend for KL and entropy")

    def __post_init__(self) -> None:
        if self.eval_size < 1 or self.max_new_tokens < 1 or self.spectral_rank < 0:
            raise CLIError("--eval-size and --max-new-tokens must be >= 1 and --spectral-rank >= 0")


def cmd_report_drift(argv: list[str]) -> int:
    p = TrainArgumentParser(  # one-line errors, as `denser train`
        prog="denser report drift",
        description="Parameter drift, response drift (KL(B || A) on B's greedy responses, similarity to A's), "
                    "accuracy and formatting artifacts of model B against model A. A model is 'default', 'tiny', "
                    "a model or checkpoint directory, a run directory (its newest checkpoint), or RUN@K for stage K "
                    "of a `denser continual` run.")
    p.add_argument("a", metavar="A", help="the reference model (e.g. the initial one)")
    p.add_argument("b", metavar="B", help="the model whose drift from A is measured")
    add_dataclass_flags(p.add_argument_group("drift settings"), DriftSettings)
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--out", default="", help="write drift.json and drift.md into this directory")
    args = vars(p.parse_args(argv))
    a, b, cpu, out_dir = args.pop("a"), args.pop("b"), args.pop("cpu"), args.pop("out")
    settings = DriftSettings(**args)
    # imported here for start-up time (models, generation): see the module docstring
    from denser.analysis.checkpoints import compare_checkpoints, drift_markdown

    try:
        result = compare_checkpoints(a, b, **dataclasses.asdict(settings), device="cpu" if cpu else None,
                                     log=lambda m: print(m, flush=True))
    except ValueError as e:
        raise CLIError(str(e)) from None
    text = drift_markdown(result)
    print(text)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "drift.json").write_text(json.dumps(result, indent=1))
        (out / "drift.md").write_text(text)
        print(f"written: {out / 'drift.json'}, {out / 'drift.md'}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    """``denser compare RUN RUN [...] --labels ...``: seeds pooled per label, error bars, claims, frontier."""
    p = argparse.ArgumentParser(
        prog="denser compare",
        description="Compare `denser continual` runs (e.g. grpo vs sdpo vs hybrid at several seeds) in one report: "
                    "<out>/report.md and <out>/plots/compare_*.png. Runs sharing a label are seeds of one configuration: "
                    "every measure is their mean ± standard error over seeds, accuracies also bootstrapped over seeds "
                    "and eval prompts; the report checks the claims of \"Denser ≠ Better\" (grpo and sdpo told apart by "
                    "each run's recorded objective) and draws the density frontier of hybrid runs at several lam values.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="continual run directories")
    p.add_argument("--out", default="runs/compare", help="report directory (default: runs/compare)")
    p.add_argument("--labels", default="", help="comma-separated, one per run; runs sharing a label are seeds of one "
                   "configuration (default: the recorded objective with its teacher and lam)")
    p.add_argument("--frontier", action=argparse.BooleanOptionalAction, default=None,
                   help="draw the density frontier (hybrid in-domain gain vs forgetting and vs response KL, one point per "
                        "lam); default: when one hybrid objective has runs at 3 or more lam values")
    args = p.parse_args(argv)
    from denser.analysis.compare import (
        write_compare_report,  # start-up time (matplotlib): see the module docstring
    )

    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    try:
        out = write_compare_report(args.runs, args.out, labels=labels, frontier=args.frontier,
                                   command="denser compare " + shlex.join(argv))
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(f"report: {out}")
    return 0

# -------------------------------------------------------------------------------- the registries


def _listing_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description + " Installed plugins (entry-point groups "
                                "denser.objectives and denser.tasks) are included.")
    p.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE|FILE.py",
                   help=IMPORT_HELP)
    return p


def cmd_objectives(argv: list[str]) -> int:
    import_plugins(_listing_parser("denser objectives", "List the registered objectives.").parse_args(argv).imports)
    rows = list_objectives()
    width = max(len(r[0]) for r in rows)
    for name, doc, signals in rows:
        sig = ",".join(sorted(s.value for s in signals))
        print(f"{name:<{width}}  [{sig}]  {doc}")
    print("\nflags of one objective: denser train --objective NAME --help")
    return 0


def cmd_tasks(argv: list[str]) -> int:
    import_plugins(_listing_parser("denser tasks", "List the registered tasks.").parse_args(argv).imports)
    from denser.tasks import (  # start-up time (datasets): see the module docstring
        DEFAULT_TASK,
        task_descriptions,
    )

    desc = task_descriptions()
    width = max(len(n) for n in desc)
    for name, text in desc.items():
        mark = " (default)" if name == DEFAULT_TASK else ""
        print(f"{name:<{width}}  {text}{mark}")
    print("\nany local file: --task file:PATH.jsonl (columns prompt, answer)")
    return 0


def cmd_score(argv: list[str]) -> int:
    """``denser score --task NAME --row I --completion FILE``: one completion's reward and feedback as
    JSON on stdout. Exit 0 whatever the completion (a program that crashes is a score of 0 with its
    feedback), 2 on bad input (an unknown task, a row out of range, a missing file)."""
    p = TrainArgumentParser(
        prog="denser score",
        description="Score one completion against one row of a task's train split and print "
                    '{"reward": ..., "feedback": ..., "answer": ..., "success": ...} as JSON (code tasks run the '
                    "program in the sandbox), to debug a reward or a test case by hand.")
    p.add_argument("--task", required=True, help="a task name, name?option=value, file:PATH or hf:NAME (as --task of "
                   "denser train)")
    p.add_argument("--row", type=int, required=True, metavar="I", help="the row of the task's split (0-based)")
    p.add_argument("--completion", required=True, metavar="FILE", help="the completion's text ('-': standard input)")
    p.add_argument("--split", choices=["train", "eval"], default="train", help="the split the row is from "
                   "(default: train)")
    p.add_argument("--seed", type=int, default=0, help="task generation seed, as denser train's --seed (default: 0)")
    p.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE|FILE.py",
                   help=IMPORT_HELP)
    args = p.parse_args(argv)
    import_plugins(args.imports)
    from denser.tasks import get_task  # start-up time (datasets): see the module docstring

    if args.completion == "-":
        text = sys.stdin.read()
    else:
        path = Path(args.completion)
        if not path.is_file():
            raise CLIError(f"--completion {args.completion}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--completion {args.completion}: cannot read it as UTF-8 text ({e})") from None
    try:
        task = get_task(args.task, seed=args.seed)
    except (TypeError, ValueError) as e:
        raise CLIError(f"--task {args.task}: {one_line(e)}") from None
    rows = task.train if args.split == "train" else task.eval
    if not 0 <= args.row < len(rows):
        raise CLIError(f"--row {args.row} is outside the {args.split} split of {task.name!r} (rows 0 to {len(rows) - 1})")
    row = rows[args.row]
    score = task.score(text, row)
    print(json.dumps({"task": task.name, "split": args.split, "row": args.row, "reward": score.score,
                      "success": task.is_success(score), "feedback": score.feedback, "answer": score.answer,
                      **({"rewards": score.rewards} if score.rewards else {})}, default=str))
    return 0


# ------------------------------------------------------------------------------------ benchmarks


def cmd_bench(argv: list[str]) -> int:
    """``denser bench [gpu|loop|step] ...``: the benchmark runners of ``denser.bench``."""
    from denser.bench import (
        main as bench_main,  # imported here for start-up time (see the module docstring)
    )

    return bench_main(argv)


def cmd_merge_lora(argv: list[str]) -> int:
    """``denser merge-lora RUN_OR_CHECKPOINT [--output DIR] [--model BASE]``: the LoRA adapter of a
    checkpoint merged into its base model, written as a model directory ``from_pretrained`` loads."""
    p = TrainArgumentParser(
        prog="denser merge-lora",
        description="Merge the LoRA adapter of a `denser train --lora-r` checkpoint (or of a run directory's newest "
                    "complete checkpoint) into its base model; the result loads with "
                    "AutoModelForCausalLM.from_pretrained.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run directory or one of its checkpoints")
    p.add_argument("--output", default=None, help="where to write the merged model (default: <run>/merged-step-N)")
    p.add_argument("--model", default=None, help="the base model (default: the run's --model from its config.yaml)")
    args = p.parse_args(argv)
    from denser.trainers.lora import merge_lora  # start-up time (transformers, peft): see the module docstring

    out = merge_lora(args.path, args.output, model=args.model)
    print(f"merged model: {out} (AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0


def cmd_export(argv: list[str]) -> int:
    """``denser export RUN_OR_CHECKPOINT [--output DIR]``: the weights of an FSDP run's sharded
    checkpoint written as a model directory ``from_pretrained`` loads."""
    p = TrainArgumentParser(
        prog="denser export",
        description="Write the weights of a sharded checkpoint (an FSDP run's: each process wrote its shards) as a "
                    "model directory AutoModelForCausalLM.from_pretrained loads. The final checkpoint of a run "
                    "holds them already.")
    p.add_argument("path", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest complete checkpoint) or a "
                   "checkpoint")
    p.add_argument("--output", default=None, help="where to write the model (default: <run>/export-step-N)")
    args = p.parse_args(argv)
    from denser.trainers.sharded_checkpoint import export

    out = export(args.path, args.output)
    print(f"exported model: {out} (AutoModelForCausalLM.from_pretrained('{out}'))")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "objectives": cmd_objectives, "tasks": cmd_tasks, "bench": cmd_bench,
            "continual": cmd_continual, "report": cmd_report, "compare": cmd_compare, "merge-lora": cmd_merge_lora,
            "score": cmd_score, "export": cmd_export}
