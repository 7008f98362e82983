"""Every flag of the command line, in one place: dataclass fields become flags, config files merge under them.

- :func:`add_dataclass_flags`: one flag per field of a dataclass (``TrainConfig``, an objective),
  with the field's help text and default, parsed by its type (``int``, ``float``, ``bool``,
  ``Literal``, ``X | None``);
- :func:`load_config_file`: a ``--config FILE.yaml`` checked key by key against the same dataclasses;
- :func:`parse_run_args`: ``denser train``'s command line -> the run resolved by
  :func:`~denser.trainers.resolve.resolve_run` (flags overriding the config file, both overriding the
  objective's ``run_defaults()``, the ``dapo`` preset's loop options; then what defaults to the task);
  :func:`parse_continual_args` adds ``denser continual``'s flags (``ContinualConfig``'s fields).
- ``denser eval``'s and ``denser report drift``'s settings are dataclasses too (``EvalSettings``,
  ``DriftSettings``): a list field is a comma-separated flag, a field with ``metadata["unset"]`` is
  None until set (its flag shows the value it then takes).
- :func:`add_engine_flags`: every rollout engine's options as flags ``--ENGINE-OPTION``
  (``--hf-max-batch-size``), read with a config file's ``engine_args:`` into the run's ``EngineSpec``.
- ``--import MODULE|FILE.py`` (and a config file's ``import:``) imports plugin modules first
  (:mod:`denser.plugins`), so the objectives and tasks they register have their flags here.

A bad command line or config file raises :class:`CLIError`: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from typing import Any, Literal

import yaml

from denser.engines.base import DEFAULT_ENGINE, EngineSpec, list_rollout_engines, rollout_engine_options
from denser.objectives import DEFAULT_OBJECTIVE, get_objective, list_objectives
from denser.objectives.base import coerce_field_value, field_help, objective_class, objective_fields
from denser.plugins import import_plugins
from denser.trainers.config import TEACHER_MODEL_KEY, TrainConfig

RUN_EPILOG = "Flags override values from --config FILE.yaml; a run's own config.yaml can be passed back as --config."
IMPORT_HELP = ("import a module (name or .py file) that registers objectives or tasks before the flags are read; "
               "repeatable; a config file's 'import:' key does the same")


class CLIError(ValueError):
    """A bad command line or config file: printed as one line, exit code 2."""


class TrainArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line raises :class:`CLIError` (one line, exit 2, no usage dump)
    instead of printing the usage and calling ``sys.exit``; ``--help`` still prints and exits 0."""

    def error(self, message: str):
        raise CLIError(f"{message} (see: {self.prog} --help)")


def one_line(error: BaseException) -> str:
    """An error message as one line (a message may quote user input holding newlines)."""
    return " ".join(str(error).split()) or type(error).__name__


# ---------------------------------------------------------------------------- dataclass -> flags


def _strip_optional(annotation) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(annotation, False)``."""
    args = typing.get_args(annotation)
    if type(None) not in args:  # only a union (``Optional``) has NoneType among its arguments
        return annotation, False
    rest = [a for a in args if a is not type(None)]
    return (rest[0] if len(rest) == 1 else annotation), True


def _value_parser(annotation):
    """The argparse ``type=`` of a field: text -> value of the field's type (``none`` for an optional one)."""
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


def list_parser(item):
    """``a,b,c`` -> ``["a", "b", "c"]`` (items parsed as ``item``; blanks dropped)."""
    one = _value_parser(item)

    def parse(text: str):
        try:
            return [one(x.strip()) for x in text.split(",") if x.strip()]
        except argparse.ArgumentTypeError:
            kind = {int: "integers", float: "numbers"}.get(item, "names")
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind}") from None

    return parse


def _shown(default) -> str:
    if isinstance(default, list):
        return ",".join(str(x) for x in default) or "none"
    return repr(default)


def _add_field(group, f: dataclasses.Field, annotation, flag: str, default, default_note: str = "") -> None:
    base, optional = _strip_optional(annotation)
    if "unset" in f.metadata:  # None means "not set" (a preset option, an eval setting taken from a run):
        optional = False       # a flag sets a value, leaving it off leaves the field unset
        if default is None:
            default = f.metadata["unset"]
    note = " (required)" if f.metadata.get("required") else f" (default: {_shown(default)}{default_note})"
    if "(default:" in (field_help(f) or ""):  # the help says it in words
        note = ""
    help_text = (field_help(f) or "").replace("%", "%%") + note
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if base is bool and not optional:
        group.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, **kwargs)
        return
    if typing.get_origin(base) is list:  # a comma-separated list of the item type
        item = (typing.get_args(base) or (str,))[0]
        kwargs["type"] = list_parser(item)
        kwargs["metavar"] = f.metadata.get("metavar") or f"{getattr(item, '__name__', 'VALUE').upper()}[,...]"
        group.add_argument(f"--{flag}", **kwargs)
        return
    if typing.get_origin(base) is Literal:
        choices = list(typing.get_args(base)) + ([None] if optional else [])
        kwargs["choices"] = choices
        kwargs["type"] = _value_parser(annotation) if optional else str
        kwargs["metavar"] = "{" + ",".join(str(c) for c in choices) + "}"
    else:
        parser = f.metadata.get("parse")  # a field's own text -> value (a comma-separated list)
        kwargs["type"] = parser if parser is not None else _value_parser(base if not optional else annotation)
        kwargs["metavar"] = f.metadata.get("metavar") or (
            (base.__name__.upper() if isinstance(base, type) else "VALUE") + ("|none" if optional else ""))
    group.add_argument(f"--{flag}", **kwargs)


def add_dataclass_flags(group, cls: type, flags: dict[str, str] | None = None,
                        defaults_from: tuple[str, dict[str, Any]] | None = None) -> None:
    """One ``--flag`` per init field of dataclass ``cls`` (``--field-name`` unless ``flags`` renames
    it), its help text from the field's ``metadata["help"]`` plus the default. A flag left off the
    command line is absent from the parsed namespace (``argparse.SUPPRESS``), so a config file's
    value is not overridden by a default. ``defaults_from = (who, values)`` shows ``values`` as the
    defaults of those fields, set by ``who`` (an objective's ``run_defaults()``)."""
    hints = typing.get_type_hints(cls)
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls) if f.init}
    who, overrides = defaults_from or ("", {})
    for f in dataclasses.fields(cls):
        if f.init and not f.metadata.get("no_flag"):
            flag = (flags or {}).get(f.name, f.name.replace("_", "-"))
            if f.name in overrides:
                _add_field(group, f, hints[f.name], flag, overrides[f.name], f", set by {who}")
            else:
                _add_field(group, f, hints[f.name], flag, defaults[f.name])


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _objective_flag_names(objective: str) -> dict[str, str]:
    """An objective field named like a run field gets the objective's name as prefix (``--grpo-seed``)."""
    run_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for f in objective_fields(objective_class(objective)):
        flag = f.name.replace("_", "-")
        out[f.name] = f"{objective}-{flag}" if f.name in run_fields else flag
    return out


# ---------------------------------------------------------------------------------- config files


def load_config_file(path: str, objective_hint: str | None) -> tuple[dict, dict]:
    """``(run values, objective values)`` from a YAML file; unknown keys and wrong types are errors.
    The run values hold the file's ``engine_args`` (the engine's options), if it has them.

    The objective is ``objective_hint`` (the command line's ``--objective``) if given, else the
    file's ``objective``, else ``DEFAULT_OBJECTIVE``; objective keys may sit at the top level or under
    ``objective_args`` (as in a run's own config.yaml)."""
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
    engine_args = data.pop("engine_args", None)  # the engine's options: checked when the run is resolved
    if engine_args is not None and not isinstance(engine_args, dict):
        raise CLIError(f"{where}: 'engine_args' must be a mapping of option: value of the run's engine")
    data.pop(TEACHER_MODEL_KEY, None)  # a run's record of its teacher model (checked by --resume), not an option
    if "import" in data:  # plugins first: the objective the file names may be one of theirs
        import_plugins(_near(data.pop("import"), os.path.dirname(path)), source=f"{where}: import")
    run_types = typing.get_type_hints(TrainConfig)
    objective = objective_hint or data.get("objective") or DEFAULT_OBJECTIVE
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
    if engine_args is not None:
        run_vals["engine_args"] = engine_args
    return run_vals, obj_vals


def _near(specs, folder: str):
    """A config file's relative ``.py`` paths: from the current directory, else from the file's own."""
    if not isinstance(specs, (list, tuple)):
        return specs if not isinstance(specs, str) else _near([specs], folder)[0]
    out = []
    for s in specs:
        if isinstance(s, str) and s.endswith(".py") and not os.path.isabs(s) and not os.path.exists(s) \
                and os.path.isfile(os.path.join(folder, s)):
            s = os.path.join(folder, s)
        out.append(s)
    return out


def _coerce_config_value(where: str, key, owner: str, name: str, annotation, value):
    try:
        return coerce_field_value(owner, name, annotation, value)
    except (ValueError, TypeError) as e:
        message = str(e).replace(f"objective {owner!r} field {name!r}", "").strip()
        raise CLIError(f"{where}: key {str(key)!r} {message}") from None


# ----------------------------------------------------------------------------------- denser train


def build_train_parser(objective: str, known: list[str] | None = None) -> argparse.ArgumentParser:
    """``denser train``'s parser for ``objective``: ``--config``, ``--import``, the run flags, the
    objective's flags (``known``: the registered objectives, listed in the description)."""
    listing = f" Objectives: {', '.join(known)}." if known else ""
    p = TrainArgumentParser(prog="denser train", description=f"Train with the {objective!r} objective.{listing}",
                            epilog=RUN_EPILOG)
    p.add_argument("--config", default=None, help="YAML file of run and objective options")
    p.add_argument("--import", dest="imports", action="append", default=None, metavar="MODULE|FILE.py",
                   help=IMPORT_HELP)
    cls = objective_class(objective)
    add_dataclass_flags(p.add_argument_group("run"), TrainConfig,
                        defaults_from=(f"the {objective} objective", cls().run_defaults()))
    doc = (cls.__doc__ or "").strip().splitlines()
    group = p.add_argument_group(f"objective {objective}", doc[0] if doc else None)
    add_dataclass_flags(group, cls, _objective_flag_names(objective))
    add_engine_flags(p)
    return p


def pre_parse(argv: list[str]) -> argparse.Namespace:
    """``--objective``, ``--config`` and ``--import`` of a command line, read before its parser can
    be built (the objective decides the flags); the ``--import`` modules are imported here."""
    pre = TrainArgumentParser(prog="denser train", add_help=False)
    pre.add_argument("--objective", default=None)
    pre.add_argument("--config", default=None)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    import_plugins(known.imports)
    return known


def train_values(argv: list[str]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(objective name, run values, objective values)`` the command line (and ``--config``) sets:
    flags over the config file's values; an option set by neither is absent (not set). The run values'
    ``engine_args`` are the engine's options (the file's, when it names the same engine, then the
    ``--ENGINE-OPTION`` flags)."""
    known = pre_parse(argv)
    file_run, file_obj = ({}, {})
    if known.config:
        file_run, file_obj = load_config_file(known.config, known.objective)
    objective = known.objective or file_run.get("objective") or DEFAULT_OBJECTIVE
    try:
        objective_class(objective)
    except ValueError as e:
        raise CLIError(str(e)) from None
    wants_help = any(a in ("-h", "--help") for a in argv)
    parser = build_train_parser(objective, [r[0] for r in list_objectives()] if wants_help else None)
    ns = vars(parser.parse_args(argv))
    ns.pop("config", None)
    ns.pop("imports", None)
    run_names = {f.name for f in dataclasses.fields(TrainConfig)}
    obj_names = {f.name for f in objective_fields(objective_class(objective))}
    file_engine_args = file_run.pop("engine_args", None) or {}
    run_vals = {**file_run, **{k: v for k, v in ns.items() if k in run_names}}
    obj_vals = {**file_obj, **{k: v for k, v in ns.items() if k in obj_names and k not in run_names}}
    run_vals.pop("objective", None)
    engine = run_vals.get("engine", DEFAULT_ENGINE)
    if file_run.get("engine", DEFAULT_ENGINE) != engine:  # the file's options are another engine's
        file_engine_args = {}
    engine_args = {**file_engine_args, **engine_flag_values(ns, engine)}
    if engine_args:
        run_vals["engine_args"] = engine_args
    return objective, run_vals, obj_vals


def parse_run_args(argv: list[str]):
    """The :class:`~denser.trainers.resolve.ResolvedRun` of a ``denser train`` command line (and ``--config``):
    flags over the config file, both over the objective's ``run_defaults()`` (resolved by ``resolve_run``,
    as ``denser.train`` and ``Trainer`` resolve theirs)."""
    from denser.trainers.resolve import resolve_run  # the task registry: see denser.cli.commands' docstring

    objective, run_vals, obj_vals = train_values(argv)
    try:
        return resolve_run(run_vals, objective, objective_args=obj_vals)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None


def parse_train_args(argv: list[str]):
    """``(TrainConfig, objective)`` of :func:`parse_run_args`'s resolved run (``Trainer(cfg, objective)``
    resolves them to the same run again)."""
    run = parse_run_args(argv)
    return run.config, run.objective


# ------------------------------------------------------------------------------- rollout engines


def _engine_flag_fields(name: str) -> type:
    """Engine ``name``'s options dataclass with every field renamed ``NAME_FIELD``: its flags are
    ``--NAME-FIELD`` (``--hf-max-batch-size``), never one of the run's own (a ``--vllm-dtype`` beside ``--dtype``)."""
    options = rollout_engine_options(name)
    hints = typing.get_type_hints(options)
    fields = []
    for f in dataclasses.fields(options):
        if f.init:
            default = (dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
                       if f.default is dataclasses.MISSING else dataclasses.field(default=f.default, metadata=f.metadata))
            fields.append((f"{name}_{f.name}".replace("-", "_"), hints[f.name], default))
    return dataclasses.make_dataclass(f"{options.__name__}Flags", fields)


def add_engine_flags(parser) -> None:
    """Every registered rollout engine's options as flags ``--NAME-FIELD``, one group per engine that has any."""
    for name in list_rollout_engines():
        flags = _engine_flag_fields(name)
        if dataclasses.fields(flags):
            add_dataclass_flags(parser.add_argument_group(
                f"engine {name}", f"options of --engine {name} (a run's engine_args: in config.yaml)"), flags)


def engine_flag_values(ns: dict[str, Any], engine: str) -> dict[str, Any]:
    """The options of engine ``engine`` set on the command line (``ns``: the parsed flags); a flag of
    another engine is an error."""
    values = {}
    for name in list_rollout_engines():
        for f in dataclasses.fields(_engine_flag_fields(name)):
            if f.name in ns:
                option = f.name[len(name) + 1:]
                if name != engine:
                    raise CLIError(f"--{f.name.replace('_', '-')} is an option of --engine {name}, but this run's "
                                   f"engine is {engine}; drop the flag or pass --engine {name}")
                values[option] = ns[f.name]
    return values


# ------------------------------------------------------------------------------- denser continual


def add_continual_flags(group) -> None:
    """The flags ``denser continual`` adds to ``denser train``'s: the fields of ``denser.continual.ContinualConfig``."""
    from denser.continual.config import ContinualConfig  # the task registry: see denser.cli.commands' docstring

    add_dataclass_flags(group, ContinualConfig)
    group.add_argument("--reset-optimizer", dest="carry_optimizer", action="store_false", default=argparse.SUPPRESS,
                       help="a fresh AdamW state in every stage (the default; the opposite of --carry-optimizer)")


def build_continual_parser(objective: str, known: list[str] | None = None) -> argparse.ArgumentParser:
    """``denser train``'s parser for ``objective`` plus the continual flags (used for --help)."""
    p = build_train_parser(objective, known)
    p.prog = "denser continual"
    p.description = (f"Train {objective!r} on a sequence of tasks from one model and measure forgetting, drift and "
                     "artifacts after every stage. Every `denser train` flag applies to every stage, except --task "
                     "and --steps (use --tasks and --steps-per-task)."
                     + (f" Objectives: {', '.join(known)}." if known else ""))
    add_continual_flags(p.add_argument_group("continual"))
    return p


def parse_continual_args(argv: list[str]) -> tuple[TrainConfig, Any, EngineSpec, dict[str, Any]]:
    """``(TrainConfig, objective, EngineSpec, ContinualConfig keyword arguments)`` from a ``denser continual``
    command line (``--help`` prints the help and exits). The TrainConfig holds what the user gave
    (flags, ``--config``) with the objective's run defaults applied; each stage resolves it with its
    task (``resolve_run``), as ``denser.continual`` does."""
    if any(a in ("-h", "--help") for a in argv):
        objective = pre_parse(argv).objective or DEFAULT_OBJECTIVE
        try:
            objective_class(objective)
        except ValueError as e:
            raise CLIError(str(e)) from None
        build_continual_parser(objective, [r[0] for r in list_objectives()]).print_help()
        raise SystemExit(0)
    mine = TrainArgumentParser(prog="denser continual", add_help=False, allow_abbrev=False)
    add_continual_flags(mine)
    ns, rest = mine.parse_known_args(argv)
    if "tasks" not in vars(ns):
        raise CLIError("--tasks is required (comma-separated training tasks, in order)")
    for tok in rest:
        flag = tok.split("=", 1)[0]
        if flag in ("--task", "--steps"):
            raise CLIError(f"{flag} is a `denser train` flag; a continual run takes --tasks a,b,c and --steps-per-task K")
    from denser.trainers.resolve import apply_run_defaults  # the task registry, as above

    objective, run_vals, obj_vals = train_values(rest)
    engine_args = run_vals.pop("engine_args", {})
    try:
        obj = get_objective(objective, **obj_vals)
        cfg = apply_run_defaults(TrainConfig(**run_vals, objective=obj.name), obj)
        engine = EngineSpec.from_args(cfg.engine, engine_args, where="engine options")
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    return cfg, obj, engine, vars(ns)
