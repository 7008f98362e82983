"""End-to-end runs of the generic loop on the tiny model, and what it computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from denser.cli import main, parse_train_args
from denser.objectives import Signal
from denser.trainers import policy_loss as policy_loss_mod
from denser.trainers import signals as signals_mod
from denser.trainers import teacher as teacher_mod
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer

SMALL = ["--model", "tiny", "--steps", "2", "--max-new-tokens", "6", "--num-generations", "2",
         "--prompts-per-step", "2", "--eval-size", "4", "--micro-batch-size", "3", "--no-progress", "--lr", "1e-3"]


def _weights(run_dir, step):
    return load_file(os.path.join(run_dir, "checkpoints", f"step-{step:06d}", "model", "model.safetensors"))


class ParityAddition(__import__("denser.tasks.builtin", fromlist=["Addition"]).Addition):
    """A task the random tiny model scores on: reward 1 for an even-length reply (groups vary)."""

    def check(self, completion, row):
        from denser.tasks import Score

        ok = len(completion) % 2 == 0
        return Score(float(ok), None if ok else "The reply should have an even number of characters.", None)


@pytest.mark.parametrize("objective", ["grpo", "sdpo", "hybrid"])
def test_train_end_to_end_writes_metrics_and_changes_weights(tmp_path, objective):
    out = tmp_path / objective
    extra = ["--teacher", "ema"] if objective != "grpo" else []
    cfg, obj = parse_train_args(["--objective", objective, "--output-dir", str(out), *SMALL, *extra])
    summary = Trainer(cfg, obj, task=ParityAddition(), log=lambda *a: None).train()
    assert 0.0 <= summary["eval_accuracy_after"] <= 1.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2]
    steps = [r for r in rows if "loss" in r]
    for r in steps:
        for key in ("reward_mean", "reward_std", "success_rate", "loss", "response_length", "step_time_s", "tokens_per_s",
                    "time_generate_s", "time_update_s", "grad_norm"):
            assert key in r and r[key] is not None, key
        assert r["skipped"] == 0
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[-1]
    assert (out / "config.yaml").exists()
    # weights changed from the initial tiny model
    from denser.trainers.models import load_model

    initial, _ = load_model("tiny", seed=0)
    final = _weights(out, 2)
    changed = [k for k, v in initial.state_dict().items() if k in final and not torch.equal(v, final[k])]
    assert changed, "training did not change any weight"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000002" / "model")


class _Spy:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


@pytest.mark.parametrize(
    "argv, policy_only, has_ref, has_teacher",
    [
        (["--objective", "grpo"], True, False, False),
        (["--objective", "grpo", "--kl-coef", "0.1"], False, True, False),
        (["--objective", "sdpo", "--teacher", "live"], False, False, True),
        (["--objective", "hybrid", "--lam", "1.0"], True, False, False),  # lam=1 is pure grpo: no teacher
    ],
)
def test_only_declared_signals_are_computed(tmp_path, monkeypatch, argv, policy_only, has_ref, has_teacher):
    cfg, objective = parse_train_args([*argv, *SMALL, "--steps", "1", "--output-dir", str(tmp_path / "r")])
    trainer = Trainer(cfg, objective, log=lambda *a: None)
    assert (trainer.reference is not None) == has_ref
    assert (trainer.teacher is not None) == has_teacher
    assert (Signal.REF_LOGP in objective.signals()) == has_ref
    spy = _Spy(policy_loss_mod.completion_hidden_states)
    for module in (policy_loss_mod, signals_mod, teacher_mod):  # the policy's forward, the reference's, the teacher's
        monkeypatch.setattr(module, "completion_hidden_states", spy)
    trainer.step(0)
    micro_batches = -(-cfg.prompts_per_step * cfg.num_generations // cfg.micro_batch_size)
    expected = micro_batches * (1 + int(has_ref) + int(has_teacher))
    assert spy.calls == expected
    if policy_only:
        assert spy.calls == micro_batches


def test_unknown_names_list_the_known_ones(tmp_path, capsys):
    assert main(["train", "--objective", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown objective 'nope'" in err and "grpo" in err and "sdpo" in err
    assert main(["train", "--objective", "grpo", "--task", "nope", *SMALL, "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "addition" in err
    assert main(["train", "--objective", "grpo", "--model", "nope-model", *SMALL[2:], "--output-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "nope-model" in err and "tiny" in err


def test_signal_the_task_lacks_fails_before_generation(tmp_path):
    from denser.tasks import get_task

    task = get_task("addition")
    task.provides = frozenset({Signal.REWARDS, Signal.ADVANTAGES})  # e.g. a task with no way to build a teacher
    cfg, objective = parse_train_args(["--objective", "sdpo", *SMALL, "--output-dir", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="objective 'sdpo' needs signal 'teacher' but task 'addition'"):
        Trainer(cfg, objective, task=task)


def test_teacher_with_a_different_vocabulary_is_rejected():
    from denser.objectives import get_objective
    from denser.trainers.models import build_tiny_model
    from denser.trainers.signals import check_teacher_vocabulary

    student = build_tiny_model(seed=0)
    student = student[0] if isinstance(student, tuple) else student
    teacher = torch.nn.Module()
    teacher.get_output_embeddings = lambda: torch.nn.Linear(4, student.config.vocab_size + 3)
    with pytest.raises(ValueError, match="vocabulary .* differs from the policy's"):
        check_teacher_vocabulary(get_objective("sdpo"), student, teacher)


def test_objective_fields_are_documented_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--objective", "sdpo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--alpha", "--topk", "--is-clip", "--teacher {live,ema,frozen,trust-region}", "--teacher-update-rate",
                 "--teacher-path", "--teacher-init-alpha", "--reprompt-template", "--mask-truncated-completions", "--mask-ratio",
                 "--steps", "--num-generations", "--prompts-per-step", "--max-new-tokens", "--lr", "--seed",
                 "--output-dir", "--resume", "--eval-every", "--config", "--model", "--task"):
        assert flag in out, flag
    assert "EMA rate" in out  # the field's doc is the flag's help
    cfg, obj = parse_train_args(["--objective", "grpo", "--clip-high", "0.28", "--kl-coef", "0.05", "--steps", "7"])
    assert obj.clip_high == 0.28 and obj.kl_coef == 0.05 and cfg.steps == 7
    assert Signal.REF_LOGP in obj.signals()


def test_config_file_with_flags_overriding(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective: sdpo\nsteps: 5\nalpha: 0.2\nlr: 0.001\n")
    cfg, obj = parse_train_args(["--config", str(path), "--alpha", "0.7"])
    assert cfg.steps == 5 and cfg.lr == 0.001 and obj.alpha == 0.7 and obj.name == "sdpo"


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path):
    out = tmp_path / "ddp"
    # accelerate's --cpu flag routes to its single-process launcher unless an MPI hostfile is
    # configured; --multi_gpu starts torchrun, whose processes find no GPU and use gloo on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "denser", "train", "--objective", "grpo",
           "--output-dir", str(out), *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2]  # one writer, not two
    assert rows[1]["processes"] == 2  # really two processes
    assert proc.stdout.count("eval accuracy:") == 1  # printed by the main process only
    assert all(r.get("skipped", 0) == 0 for r in rows)
    assert _weights(out, 2)


def test_a_new_teacher_objective_gets_its_teacher_and_teacher_logp(tmp_path, monkeypatch):
    """An objective written from scratch (no sdpo class) declares TEACHER and TEACHER_LOGP and says
    how its teacher is built (TeacherSpec); the loop serves exactly that, knowing nothing else of it."""
    from dataclasses import dataclass

    from denser.objectives import (
        TEACHER_LOGP,
        LossOutput,
        Metric,
        Objective,
        TeacherSpec,
        aggregate,
        register_objective,
        unregister_objective,
    )

    seen = []
    spec = TeacherSpec(teacher="frozen", include_feedback=True,
                       reprompt_template="{prompt}{solution}{feedback}\n\nNow answer again, carefully.")

    @register_objective("test_teacher_gap")
    @dataclass
    class TeacherGap(Objective):
        """Toy dense objective: the sampled-token gap to the teacher as a REINFORCE surrogate."""

        scale: float = 1.0

        def signals(self):
            return frozenset({Signal.REWARDS, Signal.TEACHER, Signal.TEACHER_LOGP})

        def teacher_spec(self):
            return spec

        def loss(self, stats, batch):
            teacher_logp = batch.extras[TEACHER_LOGP]
            seen.append((stats.logp.detach().clone(), teacher_logp.clone(), batch.teacher_mask.clone(),
                         batch.seq_ids.clone()))
            gap = stats.logp.detach() - teacher_logp
            return LossOutput(self.scale * aggregate(gap * stats.logp, batch, "token-mean"),
                              {"gap": Metric.of(gap, batch.token_mask)})

    contexts = []
    real_messages = signals_mod.teacher_messages

    def spy_messages(*args):
        assert args[-1] is spec  # the objective's own spec builds the contexts
        out = real_messages(*args)
        contexts.append(out)
        return out

    monkeypatch.setattr(signals_mod, "teacher_messages", spy_messages)
    try:
        cfg = TrainConfig(objective="test_teacher_gap", model="tiny", steps=1, max_new_tokens=6, num_generations=2,
                          prompts_per_step=2, eval_size=2, micro_batch_size=3, progress=False,
                          output_dir=str(tmp_path / "run"))
        trainer = Trainer(cfg, task=ParityAddition(), log=lambda *a: None)
        assert trainer.teacher is not None and trainer.teacher.mode == "frozen"
        assert trainer.teacher.model is not trainer.policy and trainer.reference is None
        row = trainer.step(0)
    finally:
        unregister_objective("test_teacher_gap")
    assert row["skipped"] == 0 and row["gap"] is not None
    assert len(seen) == 2  # micro-batches of 3 and 1 samples
    built = [c for c in contexts if c is not None]
    assert built and all(c[-1]["content"].endswith("Now answer again, carefully.") for c in built)
    with_teacher = without_teacher = 0
    for logp, teacher_logp, mask, seq_ids in seen:
        assert teacher_logp.shape == logp.shape and not teacher_logp.requires_grad
        assert torch.isfinite(teacher_logp).all() and (teacher_logp <= 0).all()
        has = mask[seq_ids]
        # at step 0 the frozen teacher is the policy: on its own prompt it gives the policy's log-probs,
        # with a teacher context (feedback appended) it gives others
        torch.testing.assert_close(teacher_logp[~has], logp[~has], rtol=0, atol=1e-5)
        if has.any():
            assert not torch.allclose(teacher_logp[has], logp[has], atol=1e-3)
        with_teacher += int(mask.sum())
        without_teacher += int((~mask).sum())
    assert with_teacher > 0 and with_teacher + without_teacher == 4


def test_teacher_logp_alone_gets_the_default_teacher_and_a_missing_spec_fails_first(tmp_path):
    from dataclasses import dataclass

    from denser.objectives import TEACHER_LOGP, LossOutput, Objective, register_objective, unregister_objective

    seen = []

    @register_objective("test_teacher_logp_only")
    @dataclass
    class LogpOnly(Objective):
        """Declares the teacher's log-prob only; the default teacher_spec() serves SDPO's recipe."""

        def signals(self):
            return frozenset({Signal.REWARDS, Signal.TEACHER_LOGP})

        def loss(self, stats, batch):
            seen.append(batch.extras[TEACHER_LOGP].shape == stats.logp.shape and batch.teacher_mask is not None)
            return LossOutput((stats.logp * 0.0).sum(), {})

    @register_objective("test_teacher_no_spec")
    @dataclass
    class NoSpec(LogpOnly):
        """Declares a teacher but says nothing of how to build it."""

        def teacher_spec(self):
            return None

    kw = dict(model="tiny", steps=1, max_new_tokens=4, num_generations=2, prompts_per_step=1, eval_size=1,
              progress=False)
    try:
        trainer = Trainer(TrainConfig(objective="test_teacher_logp_only", output_dir=str(tmp_path / "a"), **kw),
                          task=ParityAddition(), log=lambda *a: None)
        assert trainer.teacher.mode == "ema" and trainer.teacher.rate == 0.05  # TeacherSpec()'s defaults
        trainer.step(0)
        assert seen == [True]
        with pytest.raises(ValueError, match="objective 'test_teacher_no_spec' declares signal 'teacher_logp' but "
                                             "its teacher_spec\\(\\) returns None"):
            Trainer(TrainConfig(objective="test_teacher_no_spec", output_dir=str(tmp_path / "b"), **kw),
                    task=ParityAddition(), log=lambda *a: None)
        assert not (tmp_path / "b").exists()  # failed before writing anything
    finally:
        unregister_objective("test_teacher_logp_only")
        unregister_objective("test_teacher_no_spec")


def test_the_loop_runs_the_engine_named_by_engine_and_refreshes_its_weights(tmp_path):
    from denser.engines import HFRolloutEngine, list_rollout_engines, register_rollout_engine
    from denser.engines.base import _ENGINES

    updates = []

    @register_rollout_engine("test_counting")
    class CountingEngine(HFRolloutEngine):
        """The HF engine, counting weight refreshes (an inference server would copy the weights here)."""

        def update_weights(self, model):
            updates.append(model)

    try:
        assert "test_counting" in list_rollout_engines()
        cfg, obj = parse_train_args(["--objective", "grpo", *SMALL, "--steps", "1", "--engine", "test_counting",
                                     "--output-dir", str(tmp_path / "r")])
        trainer = Trainer(cfg, obj, task=ParityAddition(), log=lambda *a: None)
        assert isinstance(trainer.engine, CountingEngine)
        row = trainer.step(0)
        assert updates == ([trainer.policy] if row["skipped"] == 0 else [])
    finally:
        _ENGINES.pop("test_counting", None)
    with pytest.raises(ValueError, match="--engine must be one of hf, vllm, got 'nope'"):
        TrainConfig(engine="nope")
