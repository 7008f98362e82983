"""Fuzz ``denser train`` parsing: random flags, values and config files are either accepted or
rejected with one line on stderr and exit code 2, never a traceback.

"One line" includes argparse's own errors: the train parsers raise ``CLIError`` instead of printing
the usage block and calling ``sys.exit(2)``, so every rejection looks the same
(``denser train: error: <what is wrong> (see: denser train --help)``). Asking for ``--help`` (or a
prefix argparse expands to it) prints the help and exits 0: that counts as accepted.
Nothing trains: ``Trainer`` is replaced by a stand-in that records what it was given.
"""

from __future__ import annotations

import contextlib
import io
import os
import string
import tempfile
from unittest import mock

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from denser.cli import build_train_parser, main
from denser.objectives import Objective, list_objectives
from denser.trainers import loop
from denser.trainers.config import TrainConfig
from denser.trainers.resolve import ResolvedRun

OBJECTIVES = [row[0] for row in list_objectives()]


def _flags() -> list[str]:
    out = set()
    for objective in OBJECTIVES:
        for action in build_train_parser(objective)._actions:
            out.update(s for s in action.option_strings if s not in ("-h", "--help"))
    return sorted(out)


FLAGS = _flags()
KEYS = sorted({f.lstrip("-").replace("-", "_") for f in FLAGS if not f.startswith("--no-")} | {"objective_args"})

words = st.sampled_from(["", " ", "none", "None", "null", "true", "false", "yes", "0", "1", "-1", "2", "0.5", "1e309",
                         "-inf", "nan", "0x10", "1_000", " 3 ", "ema", "live", "frozen", "tiny", "default", "float32",
                         "bfloat16", "cosine", "linear", "auto", "chunked", "topk", "full", "token-mean", "k3",
                         "addition", "file:/nonexistent.jsonl", "addition?seed=x", "grpo", "sdpo", "--", "-", "-x",
                         "--steps", "=", "a=b", "\n", "é", "\x00"])
values = st.one_of(
    words,
    st.integers(min_value=-10**12, max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=string.printable + "é中\u2028", max_size=10),
)
flag_tokens = st.sampled_from(FLAGS + ["--objective"] * 5)  # the objective changes the flag set: draw it often
tokens = st.one_of(
    st.tuples(flag_tokens, values).map(list),
    st.tuples(flag_tokens, values).map(lambda t: [f"{t[0]}={t[1]}"]),
    flag_tokens.map(lambda f: [f]),
    st.tuples(st.sampled_from(["--objective"]), st.sampled_from(OBJECTIVES + ["nope"])).map(list),
    values.map(lambda v: [v]),
)
random_argvs = st.lists(tokens, max_size=8).map(lambda parts: [t for p in parts for t in p])


def _typed_value(action) -> st.SearchStrategy[str]:
    """Mostly well-typed values for one flag (so that the fuzz gets past argparse into the config
    and objective checks), sometimes anything."""
    metavar = str(action.metavar or "")
    if action.choices:
        typed = st.sampled_from([str(c) for c in action.choices])
    elif metavar.startswith("INT"):
        typed = st.one_of(st.integers(-3, 40), st.integers(-10**18, 10**18)).map(str)
    elif metavar.startswith("FLOAT"):
        typed = st.one_of(st.floats(-2, 3), st.floats(allow_nan=True, allow_infinity=True)).map(repr)
    else:
        typed = values
    if metavar.endswith("|none"):
        typed = st.one_of(typed, st.just("none"))
    return st.one_of(typed, typed, typed, values)


def _typed_argvs(objective: str) -> st.SearchStrategy[list[str]]:
    parts = []
    for action in build_train_parser(objective)._actions:
        names = [s for s in action.option_strings if s not in ("-h", "--help")]
        if not names or action.dest == "config":
            continue
        if action.nargs == 0:  # --flag / --no-flag
            parts.append(st.sampled_from(names).map(lambda n: [n]))
        else:
            parts.append(st.tuples(st.just(names[0]), _typed_value(action)).map(list))
    return st.lists(st.one_of(parts), max_size=6).map(
        lambda ps: ["--objective", objective, *[t for p in ps for t in p]])


typed_argvs = st.sampled_from(OBJECTIVES).flatmap(_typed_argvs)
argvs = st.one_of(random_argvs, typed_argvs)


def _typed_config(objective: str) -> st.SearchStrategy[str]:
    """A YAML mapping of mostly well-typed option: value pairs (top level or under objective_args)."""
    typed: dict[str, st.SearchStrategy] = {}
    for action in build_train_parser(objective)._actions:
        if not action.option_strings or action.dest in ("help", "config"):
            continue
        metavar = str(action.metavar or "")
        if action.nargs == 0:
            value = st.booleans()
        elif action.choices:
            value = st.sampled_from(list(action.choices))
        elif metavar.startswith("INT"):
            value = st.integers(-3, 40)
        elif metavar.startswith("FLOAT"):
            value = st.one_of(st.floats(-2, 3), st.integers(0, 3))
        else:
            value = st.text(max_size=6)
        typed[action.dest] = st.one_of(value, value, value, yaml_scalars)
    keys = sorted(typed)
    pairs = st.lists(st.sampled_from(keys).flatmap(lambda k: st.tuples(st.just(k), typed[k])), max_size=6)
    return st.tuples(pairs, st.booleans()).map(lambda t: yaml.safe_dump(
        {"objective": objective, **({"objective_args": dict(t[0])} if t[1] else dict(t[0]))}, allow_unicode=True))

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=True, allow_infinity=True), values)
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                           max_leaves=6)
config_files = st.one_of(
    st.sampled_from(OBJECTIVES).flatmap(_typed_config),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers()), yaml_values, max_size=6)
    .map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.dictionaries(st.sampled_from(KEYS), yaml_values, max_size=4).map(lambda d: yaml.safe_dump(d)),
    st.text(max_size=60),  # anything, YAML or not
    st.sampled_from(["", "[", "{a: 1", "- 1\n- 2", "steps: !!python/object:os.system x", "a: &x [*x]",
                     "objective: grpo\nobjective_args: {clip_low: 0.1}", "objective_args: 3", "[" * 200 + "]" * 200]),
)


class Recorder:
    """Stands in for Trainer: records the config it was built with; trains nothing."""

    calls: list = []

    def __init__(self, run, objective=None, **kwargs):
        assert isinstance(run, ResolvedRun) and objective is None  # the command line resolves the run once
        assert isinstance(run.config, TrainConfig) and isinstance(run.objective, Objective)
        Recorder.calls.append((run.config, run.objective))

    def train(self):
        return {"eval_accuracy_before": 0.0, "eval_accuracy_after": 0.0}


def run_train(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    Recorder.calls = []
    with mock.patch.object(loop, "Trainer", Recorder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["train", *argv])
        except SystemExit as e:  # only --help (or a prefix of it) may exit, and only with 0
            assert e.code == 0 and "usage: denser train" in out.getvalue(), (argv, e.code, err.getvalue())
            return 0, out.getvalue(), err.getvalue()
    return code, out.getvalue(), err.getvalue()


def check(argv: list[str]) -> None:
    code, out, err = run_train(argv)
    if code == 0:
        assert err == "", (argv, err)
        assert len(Recorder.calls) == 1 or "usage: denser train" in out, argv
    else:
        assert code == 2, (argv, code, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("denser train: error: "), (argv, err)
        assert not Recorder.calls, argv
    assert "Traceback" not in out + err


@settings(max_examples=int(os.environ.get("DENSER_FUZZ_EXAMPLES", 400)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(argvs)
def test_random_command_lines_are_accepted_or_one_line_errors(argv):
    check(argv)


@settings(max_examples=int(os.environ.get("DENSER_FUZZ_EXAMPLES", 200)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(config_files, st.one_of(st.just([]), st.just([]), typed_argvs))
def test_random_config_files_are_accepted_or_one_line_errors(text, argv):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "c.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        check(["--config", path, *argv])


@settings(max_examples=int(os.environ.get("DENSER_FUZZ_EXAMPLES", 200)), deadline=None)
@given(st.dictionaries(st.sampled_from([k for k in KEYS if k in TrainConfig.__dataclass_fields__]), yaml_values,
                       max_size=6))
def test_train_config_from_python_rejects_bad_values_with_value_error(kwargs):
    """A Python caller gets a ValueError naming the flag, never a TypeError or a crash later."""
    try:
        TrainConfig(**kwargs)
    except ValueError as e:
        assert str(e).startswith("--"), str(e)


def test_accepted_values_reach_the_trainer():
    """The fuzzers' 'accepted' branch is real: a valid command line gets to Trainer with its values."""
    code, out, err = run_train(["--objective", "grpo", "--steps", "3", "--clip-high", "0.3", "--no-progress"])
    assert code == 0 and err == ""
    cfg, objective = Recorder.calls[0]
    assert cfg.steps == 3 and not cfg.progress and objective.clip_high == 0.3 and objective.name == "grpo"
