"""One resolved run: the command line, a config file, ``denser.train``, ``Trainer`` and ``denser.continual``
decide the same run through ``resolve_run``; a run's config.yaml re-resolves to it; ``denser eval`` on a run
directory measures what the run's final eval line measured."""

from __future__ import annotations

import dataclasses
import json
import textwrap

import pytest
import yaml

import denser
from denser import api
from denser.cli import main, parse_run_args
from denser.cli.flags import parse_continual_args
from denser.objectives import Objective, Signal, list_objectives, register_objective, unregister_objective
from denser.objectives.grpo import DAPO_OVERLONG_BUFFER
from denser.tasks import unregister_task
from denser.trainers.config import EVAL_SIZE_CAP, TrainConfig, preset_options
from denser.trainers.resolve import ResolvedRun, resolve_run

DAPO_ON = {"dynamic_sampling": True, "overlong_buffer": DAPO_OVERLONG_BUFFER, "overlong_penalty": 1.0}


def _loop_options(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in DAPO_ON}


# ------------------------------------------------------------------------ Python = command line


def test_dapo_from_python_has_dynamic_sampling_and_overlong_shaping_as_from_the_cli(monkeypatch):
    cli = parse_run_args(["--objective", "dapo"])
    assert _loop_options(cli.config) == DAPO_ON
    for run in (resolve_run(TrainConfig(objective="dapo")), resolve_run(objective="dapo"),
                resolve_run({"objective": "dapo"}), resolve_run(TrainConfig(), "dapo")):
        assert run.config == cli.config and run.objective == cli.objective
    # denser.train hands Trainer the same resolved run
    seen = []

    class Recorder:
        def __init__(self, run, **kwargs):
            seen.append(run)

        def train(self):
            return {"run_dir": "x"}

    monkeypatch.setattr(api, "Trainer", Recorder)
    denser.train(objective="dapo")
    denser.train(TrainConfig(objective="dapo"))
    assert [r.config for r in seen] == [cli.config, cli.config]
    # grpo, which sets no run defaults, leaves them off everywhere
    assert _loop_options(resolve_run(objective="grpo").config) == {"dynamic_sampling": False, "overlong_buffer": 0,
                                                                   "overlong_penalty": 1.0}


def test_trainer_built_from_a_train_config_runs_the_dapo_preset(tmp_path):
    from denser.trainers.loop import Trainer

    small = dict(model="tiny", steps=1, max_new_tokens=6, num_generations=2, prompts_per_step=2, eval_size=2,
                 progress=False)
    trainer = Trainer(TrainConfig(objective="dapo", output_dir=str(tmp_path / "r"), **small), log=lambda m: None)
    cli = parse_run_args(["--objective", "dapo", "--output-dir", str(tmp_path / "r"), "--model", "tiny",
                          "--steps", "1", "--max-new-tokens", "6", "--num-generations", "2", "--prompts-per-step", "2",
                          "--eval-size", "2", "--no-progress"])
    assert trainer.cfg == cli.config and _loop_options(trainer.cfg) == DAPO_ON
    assert trainer.prompts.rounds == trainer.cfg.max_generation_rounds == 4  # dynamic sampling's refills are on
    with pytest.raises(ValueError, match="a ResolvedRun holds its objective, task and engine"):
        Trainer(cli, "grpo")


@pytest.mark.parametrize("objective", sorted({r[0] for r in list_objectives()} & {"sdpo", "grpo", "dapo", "gspo",
                                                                                   "dr_grpo", "hybrid"}))
def test_python_and_cli_resolve_the_same_run(objective, tmp_path):
    argv = ["--objective", objective, "--mini-batches", "2", "--task", "compare", "--seed", "3", "--lr", "1e-4"]
    cli = parse_run_args(argv)
    values = dict(mini_batches=2, task="compare", seed=3, lr=1e-4)
    runs = [resolve_run(TrainConfig(**values), objective), resolve_run(values, objective),
            resolve_run(objective=objective, **values), resolve_run(TrainConfig(objective=objective), task="compare",
                                                                    mini_batches=2, seed=3, lr=1e-4)]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"objective": objective, **values}))
    runs.append(parse_run_args(["--config", str(config)]))
    for run in runs:
        assert run.config == cli.config, objective
        assert run.objective == cli.objective and run.teacher == cli.teacher and run.engine == cli.engine
        assert run.task.name == cli.task.name == "compare"
    # what resolving decided: the task's budget and eval rows, the concrete old-logp source, for_run
    cfg = cli.config
    assert cfg.max_new_tokens == cli.task.suggested_max_new_tokens
    assert cfg.eval_size == min(len(cli.task.eval), EVAL_SIZE_CAP)
    assert cfg.old_logp_source == "forward" and Signal.OLD_LOGP in cli.objective.signals()  # two updates per step
    assert resolve_run(objective=objective).config.old_logp_source == "engine"  # one update: the engine's log-probs
    assert resolve_run(objective=objective, old_logp_source="forward").config.old_logp_source == "forward"
    declares_teacher = bool(cli.objective.signals() & {Signal.TEACHER, Signal.TEACHER_LOGP})
    assert (cli.teacher is not None) == declares_teacher
    assert all(getattr(cfg, name) is not None for name in preset_options())  # nothing left "not set"


# ------------------------------------------------------------------------------ not set vs set


def test_an_explicit_value_equal_to_the_default_is_not_overridden_by_a_preset(tmp_path):
    @register_objective("test_resolve_preset")
    class Preset(Objective):
        """Turns on truncation masking and more generation rounds, as a preset may."""

        def signals(self):
            return frozenset({Signal.REWARDS})

        def run_defaults(self):
            return {"mask_truncated_completions": True, "max_generation_rounds": 7}

    try:
        unset = resolve_run(objective="test_resolve_preset").config
        assert (unset.mask_truncated_completions, unset.max_generation_rounds) == (True, 7)
        # the defaults (False, 4), given explicitly: from Python, flags and a config file alike
        given = resolve_run(TrainConfig(mask_truncated_completions=False, max_generation_rounds=4),
                            "test_resolve_preset").config
        flags = parse_run_args(["--objective", "test_resolve_preset", "--no-mask-truncated-completions",
                                "--max-generation-rounds", "4"]).config
        path = tmp_path / "c.yaml"
        path.write_text("objective: test_resolve_preset\nmask_truncated_completions: false\nmax_generation_rounds: 4\n")
        file = parse_run_args(["--config", str(path)]).config
        for cfg in (given, flags, file):
            assert (cfg.mask_truncated_completions, cfg.max_generation_rounds) == (False, 4)
        # dapo's overlong penalty 1.0 equals its default: an explicit 0 buffer keeps shaping off
        assert resolve_run(TrainConfig(overlong_buffer=0, overlong_penalty=1.0), "dapo").config.overlong_buffer == 0
    finally:
        unregister_objective("test_resolve_preset")


def test_a_preset_may_set_only_the_options_that_can_be_left_unset():
    @register_objective("test_resolve_bad_preset")
    class Bad(Objective):
        """Sets the learning rate, which a user's explicit default could not be told from."""

        def signals(self):
            return frozenset({Signal.REWARDS})

        def run_defaults(self):
            return {"lr": 1e-3}

    try:
        with pytest.raises(ValueError, match="run_defaults\\(\\) names lr, which a preset cannot set.*dynamic_sampling"):
            resolve_run(objective="test_resolve_bad_preset")
    finally:
        unregister_objective("test_resolve_bad_preset")
    assert set(preset_options()) >= set(DAPO_ON)
    assert all(f.default is None for f in dataclasses.fields(TrainConfig) if f.name in preset_options())


def test_bad_python_arguments_fail_with_one_clear_error():
    with pytest.raises(ValueError, match="'max_new_token' is not a run option \\(did you mean 'max_new_tokens'\\?\\)"):
        resolve_run(max_new_token=8)
    with pytest.raises(ValueError, match="unknown objective|not registered|no objective"):
        resolve_run(objective="nosuchobjective")
    with pytest.raises(ValueError, match="denser.train: .*TrainConfig fields"):
        denser.train(TrainConfig(), objective="grpo", learning_rate=0.1)
    # a minimum above the budget, given or the task's suggestion (addition: 32), names both flags
    with pytest.raises(ValueError, match=r"--min-new-tokens 40 exceeds .*task's suggested budget, 32.*--max-new-tokens"):
        resolve_run(objective="grpo", task="addition", min_new_tokens=40)
    with pytest.raises(ValueError, match=r"--min-new-tokens 9 exceeds the generation budget \(--max-new-tokens, 8\)"):
        resolve_run(objective="grpo", task="addition", min_new_tokens=9, max_new_tokens=8)
    assert resolve_run(objective="grpo", task="addition", min_new_tokens=32).config.min_new_tokens == 32


def test_denser_continual_from_python_resolves_as_the_cli(monkeypatch):
    from denser.continual import ContinualRunner

    monkeypatch.setattr(ContinualRunner, "run", lambda self: self)
    runner = denser.continual(objective="dapo", tasks=["addition", "compare"], model="tiny", steps_per_task=2)
    cfg, objective, _, values = parse_continual_args(["--objective", "dapo", "--tasks", "addition,compare",
                                                   "--model", "tiny", "--steps-per-task", "2"])
    assert runner.cfg == cfg and _loop_options(cfg) == DAPO_ON and runner.objective == objective
    assert dataclasses.asdict(runner.ccfg)["tasks"] == values["tasks"] == ["addition", "compare"]
    assert values["steps_per_task"] == runner.ccfg.steps_per_task == 2
    with pytest.raises(ValueError, match="denser.continual: .*steps_per_task"):
        denser.continual(objective="grpo", tasks=["addition"], steps=3)


# ------------------------------------------------------------- a finished run, resolved and measured again

PARITY = '''
from denser.tasks import Score, register_task
from denser.tasks.builtin import Addition


@register_task("test_resolve_parity", "addition prompts; reward 1 for an even-length reply")
class Parity(Addition):
    """The random tiny model scores about half: an eval whose settings matter."""

    def check(self, completion, row):
        ok = len(completion) % 2 == 0
        return Score(float(ok), None if ok else "The reply should have an even number of characters.", None)
'''


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-step tiny run on a task the random model half-solves, its eval settings left to resolve."""
    root = tmp_path_factory.mktemp("resolve")
    plugin = root / "parity_task.py"
    plugin.write_text(textwrap.dedent(PARITY))
    run = root / "run"
    argv = ["--import", str(plugin), "--objective", "grpo", "--task", "test_resolve_parity", "--model", "tiny",
            "--steps", "2", "--num-generations", "2", "--prompts-per-step", "2", "--seed", "1", "--no-progress",
            "--output-dir", str(run)]
    try:
        assert main(["train", *argv]) == 0
        yield run, plugin, argv
    finally:
        unregister_task("test_resolve_parity")


def test_a_finished_runs_config_yaml_re_resolves_to_the_same_run(finished_run):
    run, _, argv = finished_run
    resolved = parse_run_args(argv)
    again = parse_run_args(["--config", str(run / "config.yaml")])
    assert again.config == resolved.config and again.objective == resolved.objective
    assert again.config.eval_size == 50 and again.config.max_new_tokens == 32  # from the task, written down
    from_python = resolve_run(yaml.safe_load((run / "config.yaml").read_text()))
    assert from_python.config == resolved.config and from_python.objective == resolved.objective
    assert isinstance(from_python, ResolvedRun) and from_python.task.name == "test_resolve_parity"


def test_denser_eval_on_a_run_directory_reproduces_its_final_eval_line(finished_run, tmp_path, capsys):
    run, plugin, _ = finished_run
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in rows if "eval_accuracy" in r][-1]
    assert final["step"] == 2 and 0 < final["eval_accuracy"] < 1  # a measurement that settings can move
    out = tmp_path / "e.json"
    assert main(["eval", "--model", str(run), "--import", str(plugin), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    task = result["tasks"]["test_resolve_parity"]
    assert task["prompts"] == 50 and task["metrics"]["greedy"]["mean"] == final["eval_accuracy"]
    assert task["metrics"]["greedy"]["stderr"] == pytest.approx(final["eval_accuracy_se"], abs=1e-12)
    assert (result["settings"]["eval_size"], result["settings"]["max_new_tokens"]) == (50, 32)
    assert result["settings"]["seed"] == 1  # the run's seed: the task's rows are the run's
    # a flag overrides the run's setting
    assert main(["eval", "--model", str(run), "--import", str(plugin), "--eval-size", "8", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["test_resolve_parity"]["prompts"] == 8
    capsys.readouterr()


# ------------------------------------------------------------------------- flags from dataclasses


def test_every_settings_field_is_a_flag_of_its_command():
    from denser.analysis.evaluation import EvalSettings
    from denser.cli.commands import DriftSettings, build_eval_parser
    from denser.cli.flags import build_continual_parser
    from denser.continual import ContinualConfig

    def flags(parser):
        out: dict[str, list[str]] = {}
        for a in parser._actions:
            out.setdefault(a.dest, []).extend(a.option_strings)
        return out

    for parser, cls, renamed in ((build_eval_parser(), EvalSettings, {"ks": "--k"}),
                                 (build_continual_parser("grpo"), ContinualConfig, {})):
        found = flags(parser)
        for f in dataclasses.fields(cls):
            assert renamed.get(f.name, "--" + f.name.replace("_", "-")) in found[f.name], f.name
    assert {f.name for f in dataclasses.fields(DriftSettings)} == {"tasks", "eval_size", "max_new_tokens",
                                                                    "spectral_rank", "seed", "backend"}
    # a list field is comma-separated on the command line; a flag left off keeps the dataclass default
    _, _, _, values = parse_continual_args(["--objective", "grpo", "--tasks", "addition, compare", "--carry-optimizer",
                                         "--reset-optimizer"])
    ccfg = ContinualConfig(**values)
    assert ccfg.tasks == ["addition", "compare"] and ccfg.eval_tasks == [] and ccfg.carry_optimizer is False
    assert ccfg.steps_per_task == ContinualConfig(tasks=["addition"]).steps_per_task == 4


def test_eval_settings_default_to_the_training_evals():
    from denser.analysis.evaluation import EvalSettings

    train = TrainConfig()
    settings = EvalSettings().resolve(None)
    assert (settings.eval_size, settings.max_new_tokens, settings.temperature, settings.top_p, settings.seed,
            settings.dtype, settings.samples) == (train.eval_size, train.max_new_tokens, train.eval_temperature,
                                                  train.eval_top_p, train.seed, train.dtype, train.eval_samples)
    run = {"eval_size": 50, "max_new_tokens": 32, "eval_temperature": 0.7, "eval_top_p": 0.9, "seed": 4,
           "dtype": "bfloat16", "eval_samples": 2}
    mine = EvalSettings(eval_size=8, temperature=1.0).resolve(run)  # flags win over the run's values
    assert (mine.eval_size, mine.max_new_tokens, mine.temperature, mine.top_p, mine.seed, mine.dtype,
            mine.samples, mine.ks) == (8, 32, 1.0, 0.9, 4, "bfloat16", 2, [1, 2])


def test_eval_finds_the_settings_of_a_train_or_continual_run(tmp_path):
    from denser.analysis.evaluation import run_config

    train = tmp_path / "train"
    (train / "checkpoints" / "step-000002" / "model").mkdir(parents=True)
    (train / "config.yaml").write_text("task: compare\neval_size: 12\n")
    for spec in (train, train / "checkpoints" / "step-000002", train / "checkpoints" / "step-000002" / "model"):
        assert run_config(str(spec)) == {"task": "compare", "eval_size": 12}
    continual = tmp_path / "continual"
    continual.mkdir()
    (continual / "continual.json").write_text(json.dumps({"config": {"max_new_tokens": 48, "seed": 2}}))
    assert run_config(str(continual)) == run_config(f"{continual}@1") == {"max_new_tokens": 48, "seed": 2}
    assert run_config("tiny") is None and run_config(str(tmp_path)) is None
