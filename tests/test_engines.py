"""The rollout engine as a component: engines registered with an options dataclass, built by the
registry from an EngineSpec, their options as prefixed flags and a run's engine_args."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
import yaml

from denser.cli.flags import CLIError, build_train_parser, parse_run_args
from denser.engines import (
    EngineSpec,
    HFOptions,
    HFRolloutEngine,
    NoOptions,
    register_rollout_engine,
    rollout_engine_options,
)
from denser.engines.base import _ENGINES
from denser.trainers.models import build_tiny_model


@dataclass(frozen=True)
class _FakeOptions:
    dtype: str = field(default="float32", metadata={"help": "the engine's own dtype"})
    memory_fraction: float = field(default=0.5, metadata={"help": "share of the device"})


@pytest.fixture
def fake_engine():
    """A second engine whose options include a name the run also has (dtype)."""

    @register_rollout_engine("fake", options=_FakeOptions)
    class Fake(HFRolloutEngine):
        calls: list = []  # (sampled?, completion ids) of every generate call of every instance

        def __init__(self, model, tokenizer, *, dtype="float32", memory_fraction=0.5):
            super().__init__(model, tokenizer)
            self.dtype, self.memory_fraction = dtype, memory_fraction

        def generate(self, prompt_ids, params, **kw):
            rollout = super().generate(prompt_ids, params, **kw)
            Fake.calls.append((params.do_sample, rollout.completion_ids))
            return rollout

    try:
        yield Fake
    finally:
        _ENGINES.pop("fake", None)


def test_the_spec_builds_the_registered_engine_with_its_options():
    model, tok = build_tiny_model(seed=0)
    assert EngineSpec() == EngineSpec("hf", HFOptions())
    spec = EngineSpec.from_args("hf", {"max_batch_size": 3})
    assert spec.options == HFOptions(max_batch_size=3) and spec.args() == {"max_batch_size": 3, "share_prefill": True, "cpu_decode_matmul": True}
    assert EngineSpec.from_args("hf", spec.args()) == spec  # config.yaml's engine_args read back
    engine = spec.build(model, tok)
    assert type(engine) is HFRolloutEngine and engine.max_batch_size == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"


@pytest.mark.parametrize("name, args, message", [
    ("hf", {"max_batch": 2}, "engine 'hf' has no option 'max_batch'; its options: cpu_decode_matmul, max_batch_size, "
                                  "share_prefill"),
    ("hf", {"max_batch_size": "two"}, "hf option 'max_batch_size' must be an int"),
    ("hf", {"max_batch_size": -1}, "--hf-max-batch-size must be >= 0"),
    ("nope", {}, "unknown rollout engine 'nope'; known: hf"),
])
def test_bad_engine_options_name_the_problem(name, args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineSpec.from_args(name, args)


def test_options_must_be_the_engines_dataclass(fake_engine):
    with pytest.raises(TypeError, match="engine 'hf' takes options of type HFOptions"):
        EngineSpec("hf", _FakeOptions())
    assert rollout_engine_options("fake") is _FakeOptions
    assert EngineSpec("fake").build(*build_tiny_model(seed=0)).memory_fraction == 0.5


def test_an_engine_without_options_and_one_that_inherits_them():
    from denser.engines.base import RolloutEngine

    @register_rollout_engine("plain")
    class Plain(RolloutEngine):
        def __init__(self, model, tokenizer):
            pass

        def generate(self, prompt_ids, params, **kw):
            raise NotImplementedError

    @register_rollout_engine("hf_child")
    class Child(HFRolloutEngine):
        pass

    try:
        assert rollout_engine_options("plain") is NoOptions and EngineSpec("plain").args() == {}
        assert rollout_engine_options("hf_child") is HFOptions
        with pytest.raises(ValueError, match="engine 'plain' has no option 'max_batch_size'; its options: none"):
            EngineSpec.from_args("plain", {"max_batch_size": 1})
    finally:
        _ENGINES.pop("plain", None)
        _ENGINES.pop("hf_child", None)
    with pytest.raises(ValueError, match="use letters, digits"):
        register_rollout_engine("a b")


def _options(parser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_engine_options_are_prefixed_flags_beside_the_runs_own(fake_engine):
    flags = _options(build_train_parser("grpo"))
    assert {"--hf-max-batch-size", "--fake-dtype", "--fake-memory-fraction", "--dtype"} <= flags
    argv = ["--objective", "grpo", "--engine", "fake", "--fake-dtype", "bfloat16", "--dtype", "float32"]
    run = parse_run_args(argv)
    assert run.config.dtype == "float32" and run.engine == EngineSpec("fake", _FakeOptions(dtype="bfloat16"))


def test_a_flag_of_another_engine_is_an_error(fake_engine):
    argv = ["--engine", "fake", "--hf-max-batch-size", "4"]
    with pytest.raises(CLIError, match="--hf-max-batch-size is an option of --engine hf, but this run's engine is fake"):
        parse_run_args(argv)


def test_engine_args_of_a_config_file_and_flags_over_them(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"objective": "grpo", "steps": 2, "engine_args": {"max_batch_size": 6}}))
    argv = ["--config", str(path)]
    run = parse_run_args(argv)
    assert run.config.steps == 2 and run.engine == EngineSpec("hf", HFOptions(6))
    argv += ["--hf-max-batch-size", "2"]
    assert parse_run_args(argv).engine == EngineSpec("hf", HFOptions(2))
    path.write_text(yaml.safe_dump({"engine_args": {"max_batch": 6}}))
    with pytest.raises(CLIError, match="engine_args: engine 'hf' has no option 'max_batch'"):
        parse_run_args(["--config", str(path)])
    path.write_text("engine_args: [1, 2]\n")
    with pytest.raises(CLIError, match="'engine_args' must be a mapping"):
        parse_run_args(["--config", str(path)])


def test_the_run_takes_its_engine_from_the_spec_or_its_config(fake_engine, tmp_path):
    from denser.trainers.config import TrainConfig
    from denser.trainers.resolve import resolve_run

    assert resolve_run(TrainConfig(model="tiny"), "grpo", "addition").engine == EngineSpec("hf")
    spec = EngineSpec("fake", _FakeOptions(memory_fraction=0.25))
    run = resolve_run(TrainConfig(model="tiny"), "grpo", "addition", engine=spec)
    assert run.engine is spec and run.config.engine == "fake"  # the spec names the engine
    run = resolve_run(TrainConfig(model="tiny"), "grpo", "addition", engine="fake", engine_args={"dtype": "bfloat16"})
    assert run.engine == EngineSpec("fake", _FakeOptions(dtype="bfloat16"))
    with pytest.raises(ValueError, match="engine_args apply to an engine given by name"):
        resolve_run(TrainConfig(model="tiny"), "grpo", "addition", engine=spec, engine_args={"dtype": "float32"})
    # a run's config.yaml records the options and re-resolves to the same engine; another engine drops them
    recorded = {**dataclasses.asdict(run.config), "engine_args": run.engine.args()}
    assert resolve_run(recorded, "grpo").engine == run.engine
    assert resolve_run(recorded, "grpo", engine="hf").engine == EngineSpec("hf")


def test_the_runs_engine_generates_its_eval_and_the_suites_with_the_same_seeds(tmp_path, fake_engine):
    """The eval suite (denser eval, the continual measurements) builds the run's engine through the
    registry, and its sampled eval seeds each eval row as the loop's own sampled eval does:
    request_seed(seed, row), so both draw the same completions."""
    from denser.analysis.evaluation import EvalSettings, evaluate_model
    from denser.analysis.suite import EvalSuite
    from denser.tasks import get_task
    from denser.trainers.config import TrainConfig
    from denser.trainers.loop import Trainer

    cfg = TrainConfig(model="tiny", engine="fake", steps=1, eval_samples=3, eval_size=3, max_new_tokens=6,
                      seed=5, cpu=True, progress=False, output_dir=str(tmp_path / "r"))
    spec = EngineSpec("fake", _FakeOptions(memory_fraction=0.25))
    trainer = Trainer(cfg, task=get_task("addition", seed=5), log=lambda *a: None, engine=spec)
    assert type(trainer.engine) is fake_engine and trainer.engine.memory_fraction == 0.25
    fake_engine.calls.clear()
    trainer.evaluate_all()
    assert [sampled for sampled, _ in fake_engine.calls] == [False, True]
    suite = EvalSuite({"addition": trainer.task}, eval_size=3, max_new_tokens=cfg.max_new_tokens, engine=spec)
    suite.sample_many(trainer.policy, trainer.tokenizer, ["addition"], samples=3, temperature=cfg.eval_temperature,
                      top_p=cfg.eval_top_p, seed=cfg.seed)
    suite.generate_many(trainer.policy, trainer.tokenizer, ["addition"])
    loop_greedy, loop_sampled, suite_sampled, suite_greedy = (ids for _, ids in fake_engine.calls)
    assert suite_sampled == loop_sampled and suite_greedy == loop_greedy
    assert len({tuple(c) for c in loop_sampled}) > 3  # really sampled
    # denser eval's sampling too, through the engine it is given
    fake_engine.calls.clear()
    evaluate_model("tiny", ["addition"], EvalSettings(eval_size=3, max_new_tokens=6, samples=2, seed=5), engine=spec,
                   device="cpu", log=lambda *a: None)
    assert [sampled for sampled, _ in fake_engine.calls] == [False, True]
