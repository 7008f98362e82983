"""opd (on-policy distillation from a teacher model) against divergences computed in float64 from
materialised logits of a student and a teacher of another hidden size; hybrid_adv with a teacher model
(the advantage form); the command end to end on the tiny models; bad input before any compute."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from denser.cli import main
from denser.engines import HFRolloutEngine
from denser.kernels import fused_loss, token_stats
from denser.objectives import PolicyBatch, Signal, get_objective
from denser.objectives.grpo import GRPO
from denser.objectives.opd import MISSING_TEACHER
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer
from denser.trainers.models import build_tiny_model

HS, HT, V = 6, 10, 13  # the student's hidden size, the teacher's (another), the shared vocabulary
LENS = (3, 5, 1, 4)
MASKED = (2, 9)  # token positions outside the loss


def _case(seed: int, temperature: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    n, s = sum(LENS), len(LENS)
    seq_ids = torch.repeat_interleave(torch.arange(s), torch.tensor(LENS))
    token_mask = torch.ones(n, dtype=torch.bool)
    token_mask[list(MASKED)] = False
    hidden = torch.randn(n, HS, generator=g)
    weight = torch.randn(V, HS, generator=g) * 0.8
    t_hidden = torch.randn(n, HT, generator=g)
    t_weight = torch.randn(V, HT, generator=g) * 0.6
    targets = torch.randint(0, V, (n,), generator=g)
    t_logp = torch.log_softmax((t_hidden.double() @ t_weight.double().T) / temperature, -1)
    teacher_logp = t_logp.gather(1, targets[:, None])[:, 0].float()
    batch = PolicyBatch(seq_ids=seq_ids, num_seqs=s, global_tokens=float(token_mask.sum()) + 2.0, global_seqs=s + 1.0,
                        token_mask=token_mask, teacher_mask=torch.ones(s, dtype=torch.bool),  # context 'prompt'
                        old_logp=None, extras={"teacher_logp": teacher_logp})
    batch.global_teacher_tokens = float(token_mask.sum()) + 3.0  # the update's other micro-batches count too
    return dict(hidden=hidden, weight=weight, t_hidden=t_hidden, t_weight=t_weight, targets=targets, batch=batch)


def _divergence64(case, hidden, weight, temperature, direction):
    """Per-token KL in float64 from the materialised [N, V] logits of both models."""
    ls = torch.log_softmax((hidden.double() @ weight.double().T) / temperature, -1)
    lt = torch.log_softmax((case["t_hidden"].double() @ case["t_weight"].double().T) / temperature, -1)
    if direction == "reverse":  # KL(p_S || p_T)
        return (ls.exp() * (ls - lt)).sum(-1)
    return (lt.exp() * (lt - ls)).sum(-1)  # forward: KL(p_T || p_S)


def _core(objective, case, backend, temperature):
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    out = fused_loss(hidden, weight, case["targets"], objective, case["batch"], teacher_hidden=case["t_hidden"],
                     teacher_weight=case["t_weight"], temperature=temperature, backend=backend,
                     chunk_size=4 if backend == "chunked" else None)
    dh, dw = torch.autograd.grad(out.loss, (hidden, weight))
    return out, dh, dw


@pytest.mark.parametrize("backend", ["chunked", "reference"])
@pytest.mark.parametrize("alpha, direction", [(1.0, "reverse"), (0.0, "forward")])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_opd_full_vocabulary_is_the_kl_of_materialised_logits(backend, alpha, direction, temperature):
    """beta = 1: reverse KL(p_S || p_T), beta = 0: forward KL(p_T || p_S), over the whole vocabulary,
    token-mean over the update's distilled tokens, with a teacher of another hidden size: value and
    gradients (student hidden states and output layer) against float64 from materialised logits."""
    case = _case(seed=int(alpha * 10 + temperature * 100), temperature=temperature)
    objective = get_objective("opd", teacher_path="tiny", alpha=alpha)
    assert objective.distill_mode == "full" and objective.is_clip == 2.0  # weight 1: one update, no old_logp
    out, dh, dw = _core(objective, case, backend, temperature)

    hidden = case["hidden"].double().requires_grad_()
    weight = case["weight"].double().requires_grad_()
    kl = _divergence64(case, hidden, weight, temperature, direction)
    mask = case["batch"].token_mask
    expected = kl[mask].sum() / case["batch"].global_teacher_tokens
    eh, ew = torch.autograd.grad(expected, (hidden, weight))
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(dh.double(), eh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dw.double(), ew, rtol=1e-4, atol=1e-6)
    assert out.metrics["teacher_frac"].value == 1.0
    if alpha == 1.0:  # distill_loss is then the exact per-token reverse KL
        assert out.metrics["distill_loss"].value == pytest.approx(kl[mask].mean().item(), rel=1e-5)


def test_opd_metrics_are_the_sampled_tokens_log_probs():
    """teacher_logp, student_logp: mean log-prob of the sampled tokens; reverse_kl: their difference
    (the single-sample estimate of KL(p_S || p_T)); all over the distilled tokens only."""
    case = _case(seed=5)
    out, _, _ = _core(get_objective("opd", teacher_path="tiny"), case, "chunked", 1.0)
    mask = case["batch"].token_mask
    ls = torch.log_softmax(case["hidden"].double() @ case["weight"].double().T, -1)
    lt = torch.log_softmax(case["t_hidden"].double() @ case["t_weight"].double().T, -1)
    ys, yt = (x.gather(1, case["targets"][:, None])[:, 0][mask] for x in (ls, lt))
    assert out.metrics["student_logp"].value == pytest.approx(ys.mean().item(), rel=1e-5)
    assert out.metrics["teacher_logp"].value == pytest.approx(yt.mean().item(), rel=1e-5)
    assert out.metrics["reverse_kl"].value == pytest.approx((ys - yt).mean().item(), rel=1e-5)


@pytest.mark.parametrize("add_tail", [True, False])
def test_opd_topk_with_tail_matches_the_reference_backend(add_tail):
    case = _case(seed=11)
    objective = get_objective("opd", teacher_path="tiny", distill_mode="topk", topk=4, add_tail=add_tail, alpha=1.0)
    got, gh, gw = _core(objective, case, "chunked", 1.0)
    ref, rh, rw = _core(objective, case, "reference", 1.0)
    full, _, _ = _core(get_objective("opd", teacher_path="tiny"), case, "reference", 1.0)
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert abs(ref.loss.item() - full.loss.item()) > 1e-4  # top-4 of 13 ids is not the full vocabulary
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-6)


def test_opd_is_a_preset_of_the_teacher_axes():
    objective = get_objective("opd", teacher_path="some/dir")
    spec = objective.teacher_spec()
    assert (spec.teacher, spec.teacher_context, spec.teacher_path) == ("frozen", "prompt", "some/dir")
    assert (objective.alpha, objective.distill_mode, objective.loss_agg_mode) == (1.0, "full", "token-mean")
    assert {Signal.TEACHER, Signal.TEACHER_LOGP} <= objective.signals()
    assert Signal.OLD_LOGP not in objective.signals()
    several = objective.for_run(4)  # several updates per rollout batch: behaviour log-probs and SDPO's IS clip
    assert several.use_old_logp and several.is_clip == 2.0 and Signal.OLD_LOGP in several.signals()
    assert objective.for_run(1) is objective
    off = get_objective("opd", teacher_path="some/dir", is_clip=None).for_run(4)  # --is-clip none: no weight
    assert off.use_old_logp and off.is_clip is None
    with pytest.raises(ValueError, match="^" + MISSING_TEACHER.replace("(", r"\(").replace(")", r"\)") + "$"):
        get_objective("opd").for_run(1)


def test_hybrid_adv_with_a_teacher_model_at_lam_0_has_the_opd_advantage(monkeypatch):
    """The advantage form: hybrid_adv --teacher frozen --teacher-path DIR --teacher-context prompt --lam 0
    gives the GRPO surrogate the per-token advantage -(logp_S(y) - logp_T(y)), computed here from float64
    logits of a student and a teacher of another hidden size."""
    case = _case(seed=21)
    seen = {}

    def spy(self, stats, batch):
        seen["adv"], seen["token_level"] = batch.advantages.detach().clone(), batch.token_level_advantages
        return original(self, stats, batch)

    original = GRPO.loss
    monkeypatch.setattr(GRPO, "loss", spy)
    objective = get_objective("hybrid_adv", lam=0.0, teacher="frozen", teacher_path="tiny", teacher_context="prompt")
    stats = token_stats(case["hidden"].clone().requires_grad_(), case["weight"], case["targets"], backend="reference")
    case["batch"].old_logp = stats.logp.detach()
    out = objective.loss(stats, case["batch"])
    assert torch.isfinite(out.loss) and seen["token_level"]
    mask = case["batch"].token_mask
    ls = torch.log_softmax(case["hidden"].double() @ case["weight"].double().T, -1)
    lt = torch.log_softmax(case["t_hidden"].double() @ case["t_weight"].double().T, -1)
    ys, yt = (x.gather(1, case["targets"][:, None])[:, 0] for x in (ls, lt))
    torch.testing.assert_close(seen["adv"][mask].double(), -(ys - yt)[mask], rtol=0, atol=1e-5)
    assert torch.all(seen["adv"][~mask] == 0)


def _last_step(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


TINY_RUN = ["--model", "tiny", "--steps", "2", "--max-new-tokens", "6", "--num-generations", "2",
            "--prompts-per-step", "2", "--eval-size", "2", "--no-progress"]


def test_opd_command_end_to_end_on_the_tiny_models(tmp_path, capsys):
    """`denser train --objective opd --teacher-path tiny --model tiny`: the teacher is a tiny model of
    another seed and hidden size, every sample has a teacher, the loss is finite and the student and
    the teacher disagree (reverse KL > 0); the teacher is not in the checkpoint."""
    run = tmp_path / "opd"
    assert main(["train", "--objective", "opd", "--teacher-path", "tiny", *TINY_RUN, "--output-dir", str(run)]) == 0
    rows = _last_step(run)
    assert len(rows) == 2
    for row in rows:
        assert row["teacher_frac"] == 1.0 and row["distilled_frac"] == 1.0
        assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["reverse_kl"] != 0
        assert row["distill_loss"] == pytest.approx(row["loss"])
    ckpt = next((run / "checkpoints").iterdir())
    assert not any("teacher" in p.name for p in ckpt.rglob("*"))


def test_hybrid_adv_with_a_teacher_model_runs(tmp_path):
    from test_train import ParityAddition

    cfg = TrainConfig(model="tiny", steps=1, eval_size=2, max_new_tokens=6, num_generations=2, prompts_per_step=2,
                      progress=False, output_dir=str(tmp_path / "hadv"))
    trainer = Trainer(cfg, get_objective("hybrid_adv", lam=0.0, teacher="frozen", teacher_path="tiny",
                                         teacher_context="prompt"), task=ParityAddition(), log=lambda m: None)
    assert trainer.teacher.model.config.hidden_size != trainer.policy.config.hidden_size
    row = trainer.step(0)
    assert row["skipped"] == 0 and row["teacher_frac"] == 1.0 and math.isfinite(row["loss"])
    assert math.isfinite(row["dense_adv"]) and row["dense_adv"] != 0


@pytest.fixture
def no_compute(monkeypatch):
    def generate(*a, **k):
        raise AssertionError("generation started: the error should have come before any compute")

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)


def _one_line_error(capsys, argv):
    capsys.readouterr()  # what came before (a test's own model saving) is not the command's
    assert main(["train", *argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out + err, err
    return lines[0]


def test_opd_without_a_teacher_is_one_line_before_any_compute(tmp_path, capsys, no_compute):
    line = _one_line_error(capsys, ["--objective", "opd", *TINY_RUN, "--output-dir", str(tmp_path / "r")])
    assert line == "denser train: error: " + MISSING_TEACHER
    assert not (tmp_path / "r").exists()


def test_opd_bad_teacher_paths_are_one_line_before_any_compute(tmp_path, capsys, no_compute):
    line = _one_line_error(capsys, ["--objective", "opd", "--teacher-path", str(tmp_path / "nope"), *TINY_RUN,
                                    "--output-dir", str(tmp_path / "r")])
    assert "--teacher-path" in line and "no such directory" in line and "default/tiny" in line
    model, tok = build_tiny_model(seed=3, hidden_size=32)
    model.resize_token_embeddings(300)
    model.save_pretrained(tmp_path / "bigvocab")
    tok.save_pretrained(tmp_path / "bigvocab")
    line = _one_line_error(capsys, ["--objective", "opd", "--teacher-path", str(tmp_path / "bigvocab"), *TINY_RUN,
                                    "--output-dir", str(tmp_path / "r2")])
    assert "vocabulary (300) differs from the policy's (259)" in line


def _save_tiny(path, seed, hidden_size):
    model, tok = build_tiny_model(seed=seed, hidden_size=hidden_size)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def test_teacher_model_is_recorded_and_resume_refuses_another(tmp_path, capsys):
    """config.yaml records the teacher model's path and the SHA-256 of its weights; --resume with the
    same path holding other weights is one line, before any compute; with the same weights it resumes."""
    from denser.trainers.teacher import weights_sha256

    teacher_dir = tmp_path / "teacher"
    model = _save_tiny(teacher_dir, seed=4, hidden_size=32)
    run = tmp_path / "run"
    argv = ["--objective", "opd", "--teacher-path", str(teacher_dir), *TINY_RUN, "--output-dir", str(run)]
    argv[argv.index("--steps") + 1] = "1"
    assert main(["train", *argv]) == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())["teacher_model"]
    assert recorded == {"path": str(teacher_dir), "sha256": weights_sha256(model)}
    grpo = yaml.safe_load(_grpo_config(tmp_path))
    assert "teacher_model" not in grpo  # runs without a teacher model write the keys they wrote before
    _save_tiny(teacher_dir, seed=5, hidden_size=32)  # other weights under the same path
    resume = [*argv, "--resume"]
    resume[resume.index("--steps") + 1] = "2"
    capsys.readouterr()
    assert main(["train", *resume]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--resume: the teacher model changed since the run started" in lines[0], lines
    _save_tiny(teacher_dir, seed=4, hidden_size=32)  # the weights the run started with
    assert main(["train", *resume]) == 0
    assert len(_last_step(run)) == 2
    # the record is not an option: the run's own config.yaml resumes it (and refuses other weights too)
    again = ["--config", str(run / "config.yaml"), "--steps", "3", "--resume", "--no-progress"]
    assert main(["train", *again]) == 0
    assert len(_last_step(run)) == 3
    _save_tiny(teacher_dir, seed=5, hidden_size=32)
    capsys.readouterr()
    assert main(["train", *again[:3], "4", *again[4:]]) == 2
    assert "the teacher model changed" in capsys.readouterr().err


def _grpo_config(tmp_path) -> str:
    run = tmp_path / "grpo"
    argv = ["--objective", "grpo", *TINY_RUN, "--output-dir", str(run)]
    argv[argv.index("--steps") + 1] = "1"
    assert main(["train", *argv]) == 0
    return (run / "config.yaml").read_text()


def test_a_frozen_teacher_model_keeps_its_own_dtype(tmp_path):
    """A frozen teacher from --teacher-path loads in the dtype its config records (here bfloat16 for a
    float32 policy) and the run computes with it; ema and trust-region teachers, which mix with the
    policy, take the policy's dtype."""
    from denser.objectives import TeacherSpec
    from denser.trainers.teacher import build_teacher

    model, tok = build_tiny_model(seed=6, hidden_size=32, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    tok.save_pretrained(tmp_path / "bf16")
    policy, _ = build_tiny_model(seed=0)
    frozen = build_teacher(TeacherSpec(teacher="frozen", teacher_path=str(tmp_path / "bf16")), policy)
    assert next(frozen.model.parameters()).dtype == torch.bfloat16
    tr = build_teacher(TeacherSpec(teacher="trust-region", teacher_path=str(tmp_path / "bf16")), policy)
    assert next(tr.model.parameters()).dtype == torch.float32
    run = tmp_path / "run"
    argv = ["--objective", "opd", "--teacher-path", str(tmp_path / "bf16"), *TINY_RUN, "--output-dir", str(run)]
    argv[argv.index("--steps") + 1] = "1"
    assert main(["train", *argv]) == 0
    (row,) = _last_step(run)
    assert math.isfinite(row["loss"]) and row["teacher_frac"] == 1.0
