"""``denser``: train | objectives | tasks | bench.

    denser train --objective sdpo                       # the embedded model on the default task
    denser train --objective grpo --model tiny --steps 3
    denser train --objective sdpo --help                # every sdpo field is a flag
    denser objectives ; denser tasks
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from typing import Any, Literal

from denser.objectives.base import coerce_field_value, field_help, objective_class, objective_fields

RUN_EPILOG = "Flags override values from --config FILE.yaml; a run's own config.yaml can be passed back as --config."


class CLIError(ValueError):
    """A bad command line or config file: printed as one line, exit code 2."""


# ---------------------------------------------------------------------------------- flag types


def _strip_optional(annotation):
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _parser_for(annotation, where: str):
    base, optional = _strip_optional(annotation)

    def parse(text: str):
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        try:
            if base is bool:
                low = text.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if base is int:
                return int(text)
            if base is float:
                return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {base.__name__}") from None
        return text

    return parse


def _add_field(group, f: dataclasses.Field, annotation, flag: str, default, where: str) -> None:
    base, optional = _strip_optional(annotation)
    help_text = (field_help(f) or "").replace("%", "%%") + f" (default: {default!r})"
    names = [f"--{flag}"]
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if base is bool and not optional:
        group.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if typing.get_origin(base) is Literal:
        choices = list(typing.get_args(base)) + ([None] if optional else [])
        kwargs["choices"] = choices
        kwargs["type"] = _parser_for(annotation, where) if optional else str
        kwargs["metavar"] = "{" + ",".join(str(c) for c in choices) + "}"
    else:
        kwargs["type"] = _parser_for(annotation, where)
        kwargs["metavar"] = (base.__name__.upper() if isinstance(base, type) else "VALUE") + ("|none" if optional else "")
    group.add_argument(*names, **kwargs)


# -------------------------------------------------------------------------------------- train


class TrainArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises :class:`CLIError` (one line, exit 2, no usage dump)
    instead of printing the usage and calling ``sys.exit``; ``--help`` still prints and exits 0."""

    def error(self, message: str):
        raise CLIError(f"{message} (see: {self.prog} --help)")


def _objective_flag_names(objective: str) -> dict[str, str]:
    from denser.trainers.config import TrainConfig

    run_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for f in objective_fields(objective_class(objective)):
        flag = f.name.replace("_", "-")
        out[f.name] = f"{objective}-{flag}" if f.name in run_fields else flag
    return out


def load_config_file(path: str, objective_hint: str | None) -> tuple[dict, dict]:
    """``(run values, objective values)`` from a YAML file; unknown keys and wrong types are errors.

    The objective is ``objective_hint`` (the command line's ``--objective``) if given, else the
    file's ``objective``, else ``sdpo``; objective keys may sit at the top level or under
    ``objective_args`` (as in a run's own config.yaml)."""
    import difflib

    import yaml

    from denser.trainers.config import TrainConfig

    where = f"--config {path}"
    if not os.path.isfile(path):
        raise CLIError(f"{where}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CLIError(f"{where}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise CLIError(f"{where}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CLIError(f"{where}: not valid YAML ({first})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise CLIError(f"{where}: expected a mapping of option: value, got {type(data).__name__}")
    run_types = typing.get_type_hints(TrainConfig)
    objective = objective_hint or data.get("objective") or "sdpo"
    if not isinstance(objective, str):
        raise CLIError(f"{where}: 'objective' must be a name, got {objective!r}")
    try:
        obj_cls = objective_class(objective)
    except ValueError as e:
        raise CLIError(f"{where}: {e}") from None
    obj_types = typing.get_type_hints(obj_cls)
    obj_names = {f.name for f in objective_fields(obj_cls)}
    nested = data.pop("objective_args", None) or {}
    if not isinstance(nested, dict):
        raise CLIError(f"{where}: 'objective_args' must be a mapping of {objective} option: value")
    valid = sorted(run_types) + sorted(obj_names)
    run_vals, obj_vals = {}, {}
    for key, value, in_nested in [(k, v, False) for k, v in data.items()] + [(k, v, True) for k, v in nested.items()]:
        k = str(key).replace("-", "_")
        if k in run_types and not in_nested:
            run_vals[k] = _coerce_config_value(where, key, "train", k, run_types[k], value)
        elif k in obj_names:
            obj_vals[k] = _coerce_config_value(where, key, objective, k, obj_types[k], value)
        else:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            section = f"objective_args of {objective!r}" if in_nested else "keys"
            raise CLIError(f"{where}: unknown key {key!r}{hint}; valid {section}: "
                           f"{', '.join(sorted(obj_names) if in_nested else valid)}")
    return run_vals, obj_vals


def _coerce_config_value(where: str, key, owner: str, name: str, annotation, value):
    try:
        return coerce_field_value(owner, name, annotation, value)
    except (ValueError, TypeError) as e:
        message = str(e).replace(f"objective {owner!r} field {name!r}", "").strip()
        raise CLIError(f"{where}: key {str(key)!r} {message}") from None


def build_train_parser(objective: str) -> argparse.ArgumentParser:
    from denser.trainers.config import TrainConfig

    p = TrainArgumentParser(prog="denser train", description=f"Train with the {objective!r} objective.",
                            epilog=RUN_EPILOG)
    p.add_argument("--config", default=None, help="YAML file of run and objective options")
    run = p.add_argument_group("run")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        _add_field(run, f, hints[f.name], f.name.replace("_", "-"), f.default, f"--{f.name.replace('_', '-')}")
    cls = objective_class(objective)
    doc = (cls.__doc__ or "").strip().splitlines()
    group = p.add_argument_group(f"objective {objective}", doc[0] if doc else None)
    obj_hints = typing.get_type_hints(cls)
    names = _objective_flag_names(objective)
    defaults = cls()
    for f in objective_fields(cls):
        _add_field(group, f, obj_hints[f.name], names[f.name], getattr(defaults, f.name), f"--{names[f.name]}")
    return p


def parse_train_args(argv: list[str]):
    """``(TrainConfig, objective instance)`` from the command line (and ``--config``)."""
    from denser.objectives import get_objective
    from denser.trainers.config import TrainConfig

    pre = TrainArgumentParser(prog="denser train", add_help=False)
    pre.add_argument("--objective", default=None)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    file_run, file_obj = ({}, {})
    if known.config:
        file_run, file_obj = load_config_file(known.config, known.objective)
    objective = known.objective or file_run.get("objective") or "sdpo"
    try:
        objective_class(objective)
    except ValueError as e:
        raise CLIError(str(e)) from None
    parser = build_train_parser(objective)
    ns = vars(parser.parse_args(argv))
    ns.pop("config", None)
    run_names = {f.name for f in dataclasses.fields(TrainConfig)}
    obj_names = {f.name for f in objective_fields(objective_class(objective))}
    run_vals = {**file_run, **{k: v for k, v in ns.items() if k in run_names}}
    obj_vals = {**file_obj, **{k: v for k, v in ns.items() if k in obj_names and k not in run_names}}
    run_vals["objective"] = objective
    try:
        cfg = TrainConfig(**run_vals)
        obj = get_objective(objective, **obj_vals)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return cfg, obj


def cmd_train(argv: list[str]) -> int:
    """Exit codes: 0 done, 2 bad input (before any compute), 1 the run stopped (non-finite updates,
    a checkpoint that could not be written), 143 / 130 stopped by SIGTERM / SIGINT (a checkpoint of
    the last finished step was written). Each error is one line on stderr."""
    cfg, objective = parse_train_args(argv)
    from denser.trainers.checkpoint import CheckpointError
    from denser.trainers.loop import Trainer, TrainingStopped
    from denser.trainers.models import EmbeddedModelMissingError
    from denser.trainers.preemption import Interrupted, StopSignals

    try:
        with StopSignals() as signals:  # SIGTERM / Ctrl-C: stop at the next check point and save
            summary = Trainer(cfg, objective, stop_signals=signals).train()
    except EmbeddedModelMissingError as e:
        raise CLIError(str(e)) from None
    except (TrainingStopped, CheckpointError) as e:
        print(f"denser train: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        if stop.is_main:
            print(f"denser train: {_one_line(stop.message)}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # a handler could not be installed (not the main thread)
        print("denser train: interrupted; rerun with --resume to continue from the newest complete checkpoint",
              file=sys.stderr)
        return 130
    before, after = summary.get("eval_accuracy_before"), summary.get("eval_accuracy_after")
    if before is not None and summary.get("is_main", True):
        print(f"eval accuracy: {before:.3f} -> {after:.3f}")
    return 0


# ------------------------------------------------------------------------------------- others


def cmd_objectives(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="denser objectives", description="List the registered objectives.").parse_args(argv)
    from denser.objectives import list_objectives

    rows = list_objectives()
    width = max(len(r[0]) for r in rows)
    for name, doc, signals in rows:
        sig = ",".join(sorted(s.value for s in signals))
        print(f"{name:<{width}}  [{sig}]  {doc}")
    print("\nflags of one objective: denser train --objective NAME --help")
    return 0


def cmd_tasks(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="denser tasks", description="List the built-in tasks.").parse_args(argv)
    from denser.tasks import DEFAULT_TASK, task_descriptions

    desc = task_descriptions()
    width = max(len(n) for n in desc)
    for name, text in desc.items():
        mark = " (default)" if name == DEFAULT_TASK else ""
        print(f"{name:<{width}}  {text}{mark}")
    print("\nany local file: --task file:PATH.jsonl (columns prompt, answer)")
    return 0


def cmd_bench(argv: list[str]) -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isdir(os.path.join(root, "bench")):
        raise CLIError("denser bench runs the benchmarks of a source checkout; run it from a clone (python -m bench)")
    sys.path.insert(0, root)
    from bench.loss_core import main as bench_main

    return bench_main(argv)


def cmd_continual(argv: list[str]) -> int:
    from denser.trainers.continual import main as continual_main

    return continual_main(argv)


def cmd_report(argv: list[str]) -> int:
    from denser.analysis.commands import report_main

    return report_main(argv)


def cmd_compare(argv: list[str]) -> int:
    from denser.analysis.commands import compare_main

    return compare_main(argv)


COMMANDS = {"train": cmd_train, "objectives": cmd_objectives, "tasks": cmd_tasks, "bench": cmd_bench,
            "continual": cmd_continual, "report": cmd_report, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"denser: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except CLIError as e:
        print(f"denser {cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"denser {cmd}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    """An error message as one line (a message may quote user input holding newlines)."""
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
