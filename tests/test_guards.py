"""Numerical guards: a non-finite loss or gradient norm skips the update (weights, optimizer and
EMA teacher untouched), is counted and warned about; too many in a row stop the run with a clear
message and a checkpoint of the last good weights. Zero-variance groups and SDPO batches without a
teacher give an exact zero loss, never NaN."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from denser.cli import main
from denser.kernels.stats import LossOutput
from denser.objectives import register_objective
from denser.objectives.base import unregister_objective
from denser.objectives.grpo import GRPO
from denser.objectives.sdpo import SDPO
from denser.trainers import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import TASK, _register_task  # noqa: E402

BASE = ["--model", "tiny", "--max-new-tokens", "6", "--num-generations", "4", "--prompts-per-step", "2",
        "--eval-size", "2", "--no-progress", "--lr", "3e-3"]


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _nan_version(base: type, name: str) -> type:
    @register_objective(name)
    @dataclass
    class NaNAt(base):
        nan_steps: str = field(default="", metadata={"help": "comma-separated 0-based steps that go wrong"})
        nan_in: str = field(default="loss", metadata={"help": "loss: a NaN loss; grad: a finite loss, NaN gradients"})

        def loss(self, stats, batch):
            out = base.loss(self, stats, batch)
            if batch.step not in {int(s) for s in self.nan_steps.split(",") if s}:
                return out
            if self.nan_in == "loss":
                return LossOutput(out.loss * float("nan"), out.metrics)
            return LossOutput(out.loss + 0.0 * _NaNGrad.apply(stats.logp).sum(), out.metrics)

    return NaNAt


@pytest.fixture(scope="module", autouse=True)
def objectives_and_task():
    _register_task()  # reward noise + parity: the tiny model's updates are not zero
    _nan_version(GRPO, "test_nan_grpo")
    _nan_version(SDPO, "test_nan_sdpo")
    yield
    unregister_objective("test_nan_grpo")
    unregister_objective("test_nan_sdpo")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _tensors(run: Path, step: int, rel: str = "model/model.safetensors") -> dict:
    return load_file(str(ckpt.checkpoint_dir(run, step) / rel))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optimizer_state(run: Path, step: int) -> dict:
    return ckpt.load_train_state(ckpt.checkpoint_dir(run, step))[0]["optimizer"]


@pytest.mark.parametrize("objective, nan_in, extra", [
    ("test_nan_grpo", "loss", []),
    ("test_nan_grpo", "grad", ["--max-grad-norm", "0"]),  # the unclipped gradient-norm path
    ("test_nan_sdpo", "grad", ["--teacher", "ema", "--distill-mode", "full"]),
])
def test_a_non_finite_update_is_skipped_counted_and_warned(tmp_path, capsys, objective, nan_in, extra):
    run = tmp_path / "run"
    assert main(["train", "--objective", objective, "--nan-steps", "1", "--nan-in", nan_in, *BASE, *extra,
                 "--task", TASK, "--steps", "3", "--save-every", "1", "--keep-last", "5",
                 "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "warning: step 2: non-finite loss" in out and "update skipped, weights unchanged" in out
    rows = [r for r in _rows(run) if "loss" in r]
    assert [r["skipped"] for r in rows] == [0, 1, 0]
    assert [r["skipped_total"] for r in rows] == [0, 1, 1]
    bad = rows[1]
    assert not math.isfinite(bad["loss"] if nan_in == "loss" else bad["grad_norm"])
    if nan_in == "grad":
        assert math.isfinite(bad["loss"])
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in (rows[0], rows[2]))
    # step 2's update was skipped: weights, optimizer state (step counts included) and EMA teacher as after step 1
    assert _same(_tensors(run, 1), _tensors(run, 2))
    o1, o2 = _optimizer_state(run, 1), _optimizer_state(run, 2)
    assert all(torch.equal(o1["state"][i][k], o2["state"][i][k]) for i in o1["state"] for k in o1["state"][i])
    if objective == "test_nan_sdpo":
        assert _same(_tensors(run, 1, "state/teacher.safetensors"), _tensors(run, 2, "state/teacher.safetensors"))
    # and the run went on: step 3 updated the weights
    assert not _same(_tensors(run, 2), _tensors(run, 3))


def test_too_many_consecutive_skips_stop_the_run_with_the_last_good_weights(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--objective", "test_nan_grpo", "--nan-steps", "1,2,3,4,5", *BASE, "--task", TASK,
                 "--steps", "6", "--save-every", "1", "--keep-last", "5", "--max-consecutive-skips", "2",
                 "--output-dir", str(run)])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("denser train: error: stopped at step 3: 2 consecutive updates had a non-finite loss")
    assert "last good update (step 1)" in err[0] and str(ckpt.checkpoint_dir(run, 3)) in err[0]
    assert "--lr" in err[0]
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 3)
    assert _same(_tensors(run, 1), _tensors(run, 3))  # the checkpoint holds the last good weights
    assert [r["step"] for r in _rows(run)] == [0, 1, 2, 3]  # no final eval row: the run did not finish
    assert [r.get("skipped") for r in _rows(run)[1:]] == [0, 1, 1]


def _initial_tiny() -> dict:
    from denser.trainers.models import load_model

    return {k: v.clone() for k, v in load_model("tiny", seed=0)[0].state_dict().items()}


@pytest.mark.parametrize("argv", [
    ["--objective", "grpo"],
    ["--objective", "dr_grpo"],  # no std scaling, seq-mean-token-sum-norm
    ["--objective", "grpo", "--kl-coef", "0.1"],
])
def test_zero_variance_groups_give_zero_loss_not_nan(tmp_path, argv):
    """The random tiny model never answers an addition right: every group's rewards are all 0."""
    run = tmp_path / "run"
    assert main(["train", *argv, *BASE, "--task", "addition", "--steps", "2", "--output-dir", str(run)]) == 0
    rows = [r for r in _rows(run) if "loss" in r]
    assert all(r["reward_std"] == 0.0 for r in rows)
    assert all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 and r["skipped"] == 0 for r in rows), rows
    assert _same(_tensors(run, 2), _initial_tiny())  # AdamW with zero gradients and no decay moves nothing


def test_sdpo_steps_without_any_teacher_give_zero_loss_not_nan(tmp_path):
    """No success to demonstrate and no feedback: no sample has a teacher context."""
    run = tmp_path / "run"
    assert main(["train", "--objective", "sdpo", "--no-include-feedback", "--teacher", "ema", *BASE,
                 "--task", "addition", "--steps", "2", "--output-dir", str(run)]) == 0
    rows = [r for r in _rows(run) if "loss" in r]
    assert all(r["teacher_frac"] == 0.0 for r in rows), rows
    assert all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 and r["skipped"] == 0 for r in rows), rows
    assert _same(_tensors(run, 2), _initial_tiny())
