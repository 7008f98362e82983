"""The teacher's weights (trainers/teacher.py) against hand-built expectations: SDPO's trust-region
teacher, SDPO-CL's teacher_path and teacher_init_alpha; and the loop's teacher-context options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from denser.engines.packing import build_packed_batch, completion_hidden_states, lm_head_params
from denser.kernels import token_stats, token_stats_from_logits
from denser.objectives import TeacherSpec, get_objective
from denser.trainers import checkpoint as ckpt
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer
from denser.trainers.models import build_tiny_model
from denser.trainers.scoring import score_rollout
from denser.trainers.teacher import TeacherWeights, build_teacher, resolve_teacher_path


def _tiny(seed: int, bias: bool = False):
    model, tokenizer = build_tiny_model(seed=seed)
    if bias:  # an output bias, so the trust-region bias mix is exercised too
        g = torch.Generator().manual_seed(100 + seed)
        model.lm_head.bias = nn.Parameter(0.5 * torch.randn(model.lm_head.weight.shape[0], generator=g))
    return model.eval(), tokenizer


def _logits(model, packed):
    with torch.no_grad():
        out = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids)
    return out.logits[packed.predict_mask].float()


def _batches(gen):
    """A student batch (own prompts) and a teacher batch (longer contexts), the same completions."""
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (4, 6)]
    teacher_ctx = [p + torch.randint(3, 250, (5,), generator=gen).tolist() for p in prompts]
    completions = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (5, 3)]
    return (build_packed_batch(prompts, completions, pad_token_id=256),
            build_packed_batch(teacher_ctx, completions, pad_token_id=256))


@pytest.mark.parametrize("rate, topk", [(0.3, None), (0.05, 7)])
def test_trust_region_divergence_is_the_reference_on_explicitly_lerped_logits(gen, rate, topk):
    reference, _ = _tiny(1, bias=True)
    policy, _ = _tiny(0, bias=True)
    student, teacher_batch = _batches(gen)
    teacher = TeacherWeights(policy, "trust-region", rate, weights=reference)
    out = teacher.outputs(teacher_batch)
    h_ref = completion_hidden_states(reference, teacher_batch)
    assert out.hidden.shape == (teacher_batch.num_tokens, 2 * h_ref.shape[1]) and out.weight.shape[1] == 2 * h_ref.shape[1]
    # what SDPO's TrustRegionTeacher computes: lerp of the two models' logits on the teacher context
    lerped = torch.lerp(_logits(reference, teacher_batch), _logits(policy, teacher_batch), rate)
    with torch.no_grad():
        h_s = completion_hidden_states(policy, student)
    w_s, b_s = lm_head_params(policy)
    opts = dict(alpha=0.5, topk=topk, temperature=0.7)
    core = token_stats(h_s, w_s, student.targets, bias=b_s, teacher_hidden=out.hidden, teacher_weight=out.weight,
                       teacher_bias=out.bias, backend="chunked", chunk_size=3, **opts)
    expected = token_stats_from_logits(_logits(policy, student), student.targets, teacher_logits=lerped, **opts)
    torch.testing.assert_close(core.divergence, expected.divergence, rtol=1e-4, atol=1e-6)
    # the teacher's log-prob of the sampled tokens (TEACHER_LOGP) is that of the lerped logits
    t_logp = token_stats(out.hidden, out.weight, teacher_batch.targets, bias=out.bias, temperature=0.7).logp
    ref_logp = torch.log_softmax(lerped / 0.7, -1).gather(1, teacher_batch.targets[:, None])[:, 0]
    torch.testing.assert_close(t_logp, ref_logp, rtol=1e-5, atol=1e-5)
    # the concatenated weight is built once per optimiser update, and again after the policy changed
    assert teacher.outputs(teacher_batch).weight is out.weight
    with torch.no_grad():
        policy.lm_head.weight.add_(0.01)
    teacher.policy_updated()
    again = teacher.outputs(teacher_batch).weight
    assert again is not out.weight and torch.equal(again[:, h_ref.shape[1]:], policy.lm_head.weight)
    teacher.update(policy)  # a trust-region teacher is never averaged
    assert torch.equal(teacher.model.lm_head.weight, reference.lm_head.weight)


def _save(model, tokenizer, path):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_teacher_path_accepts_a_model_a_checkpoint_and_a_run_directory(tmp_path):
    model, tok = _tiny(1)
    hf = _save(model, tok, tmp_path / "hf")
    _save(model, tok, tmp_path / "ckpt" / "model")
    step = tmp_path / "run" / "checkpoints" / "step-000003"
    _save(model, tok, step / "model")
    (step / ckpt.COMPLETE).write_text("3")
    assert resolve_teacher_path(str(hf)) == hf
    assert resolve_teacher_path(str(tmp_path / "ckpt")) == tmp_path / "ckpt" / "model"
    assert resolve_teacher_path(str(tmp_path / "run")) == step / "model"
    with pytest.raises(ValueError, match="--teacher-path .*no such directory"):
        resolve_teacher_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a Hugging Face model directory"):
        resolve_teacher_path(str(tmp_path / "empty"))
    policy, _ = _tiny(0)
    for mode in ("ema", "frozen", "trust-region"):
        teacher = build_teacher(TeacherSpec(teacher=mode, teacher_path=str(tmp_path / "run")), policy)
        for (name, t), p in zip(teacher.model.named_parameters(), model.parameters()):
            assert torch.equal(t, p), (mode, name)
        assert not any(p.requires_grad for p in teacher.model.parameters())


@pytest.mark.parametrize("mode", ["ema", "frozen", "trust-region"])
def test_teacher_init_alpha_mixes_teacher_and_policy_parameter_by_parameter(tmp_path, mode):
    other, tok = _tiny(1)
    path = _save(other, tok, tmp_path / "teacher")
    policy, _ = _tiny(0)
    a = 0.3
    teacher = build_teacher(TeacherSpec(teacher=mode, teacher_path=str(path), teacher_init_alpha=a), policy)
    for (name, t), o, p in zip(teacher.model.named_parameters(), other.parameters(), policy.parameters()):
        torch.testing.assert_close(t, a * o + (1 - a) * p, rtol=0, atol=1e-6, msg=name)
    # without a path the teacher starts from the initial model; a shared initial model is never modified
    initial, _ = _tiny(2)
    before = initial.lm_head.weight.clone()
    mixed = build_teacher(TeacherSpec(teacher="frozen", teacher_init_alpha=a), policy, initial=initial)
    assert mixed.model is not initial and torch.equal(initial.lm_head.weight, before)
    torch.testing.assert_close(mixed.model.lm_head.weight, a * before + (1 - a) * policy.lm_head.weight)
    assert build_teacher(TeacherSpec(teacher="frozen"), policy, initial=initial).model is initial


def test_a_teacher_of_another_vocabulary_or_shape_is_refused_before_any_compute(tmp_path):
    model, tok = _tiny(1)
    model.resize_token_embeddings(300)
    path = _save(model, tok, tmp_path / "bigvocab")
    policy, _ = _tiny(0)
    with pytest.raises(ValueError, match=r"--teacher-path .*vocabulary \(300\) differs from the policy's \(259\)"):
        build_teacher(TeacherSpec(teacher="frozen", teacher_path=str(path)), policy)
    wide, tok = build_tiny_model(seed=1, hidden_size=48)
    wpath = _save(wide, tok, tmp_path / "wide")
    with pytest.raises(ValueError, match="EMA teacher averages the policy"):
        build_teacher(TeacherSpec(teacher="ema", teacher_path=str(wpath)), policy)
    with pytest.raises(ValueError, match="--teacher-init-alpha 0.5 mixes"):
        build_teacher(TeacherSpec(teacher="frozen", teacher_path=str(wpath), teacher_init_alpha=0.5), policy)
    wide_tr = build_teacher(TeacherSpec(teacher="trust-region", teacher_path=str(wpath)), policy)  # another H is fine
    student, teacher_batch = _batches(torch.Generator().manual_seed(0))
    assert wide_tr.outputs(teacher_batch).hidden.shape == (teacher_batch.num_tokens, 48 + 64)
    # the loop: a bad path fails at construction, before any model is loaded or anything generated
    cfg = TrainConfig(model="tiny", steps=1, progress=False, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="--teacher-path .*no such directory"):
        Trainer(cfg, get_objective("sdpo", teacher="frozen", teacher_path=str(tmp_path / "nope")), log=lambda m: None)
    with pytest.raises(ValueError, match="vocabulary"):
        Trainer(cfg, get_objective("sdpo", teacher="ema", teacher_path=str(path)), log=lambda m: None)


def test_a_teacher_whose_tokenizer_numbers_tokens_differently_is_refused(tmp_path):
    """Same vocabulary size, two tokens' ids swapped: the sizes agree, the tokenizers do not."""
    import json

    model, tok = _tiny(1)
    path = _save(model, tok, tmp_path / "swapped")
    spec = json.loads((path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (path / "tokenizer.json").write_text(json.dumps(spec))
    policy, policy_tok = _tiny(0)
    a, b = policy_tok.get_vocab()["a"], policy_tok.get_vocab()["b"]
    with pytest.raises(ValueError, match=rf"--teacher-path .*2 of its tokens have another id .*'a' is {b} in the "
                                         rf"teacher's, {a} in the policy's.*one shared tokenizer"):
        build_teacher(TeacherSpec(teacher="frozen", teacher_path=str(path)), policy, tokenizer=policy_tok)
    same = _save(model, tok, tmp_path / "same")  # the same tokenizer passes
    assert build_teacher(TeacherSpec(teacher="frozen", teacher_path=str(same)), policy, tokenizer=policy_tok) is not None
    cfg = TrainConfig(model="tiny", steps=1, progress=False, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="another id"):  # the loop passes the policy's tokenizer
        Trainer(cfg, get_objective("opd", teacher_path=str(path)), log=lambda m: None)


def _cfg(tmp_path, name, **kw):
    base = dict(model="tiny", steps=1, eval_size=2, max_new_tokens=6, num_generations=2, prompts_per_step=2,
                micro_batch_size=3, progress=False, lr=1e-3, output_dir=str(tmp_path / name))
    return TrainConfig(**{**base, **kw})


def test_trust_region_and_teacher_from_policy_in_the_loop(tmp_path):
    from test_train import ParityAddition

    trainer = Trainer(_cfg(tmp_path, "tr"), get_objective("sdpo", teacher="trust-region", teacher_update_rate=0.2),
                      task=ParityAddition(), log=lambda m: None)
    assert trainer.teacher.mode == "trust-region" and trainer.teacher.policy is trainer.policy
    assert trainer.teacher.model is not trainer.policy
    w0 = trainer.teacher.model.lm_head.weight.clone()
    row = trainer.step(0)
    assert row["skipped"] == 0 and torch.equal(trainer.teacher.model.lm_head.weight, w0)
    assert not torch.equal(trainer.policy.lm_head.weight, w0)  # the policy moved, the reference did not
    # the next update's teacher mixes in the policy as it is now: the fused AdamW step changes the weights
    # in place without bumping their version counter, so nothing keyed on versions may survive the step
    _, teacher_batch = _batches(torch.Generator().manual_seed(3))
    joint = trainer.teacher.outputs(teacher_batch).weight
    h = trainer.policy.lm_head.weight.shape[1]
    assert torch.equal(joint[:, :h], w0) and torch.equal(joint[:, h:], trainer.policy.lm_head.weight)
    # --teacher-reset in a continual run: a frozen teacher starts from the run's own starting policy
    anchor, _ = build_tiny_model(seed=1)
    reset = Trainer(_cfg(tmp_path, "reset"), get_objective("sdpo", teacher="frozen"), anchor=anchor,
                    teacher_from_policy=True, log=lambda m: None)
    assert reset.teacher.model is not anchor and reset.teacher.model is not reset.policy
    assert torch.equal(reset.teacher.model.lm_head.weight, reset.policy.lm_head.weight)


def test_teacher_context_is_cut_on_the_right_and_truncated_completions_are_masked(tmp_path):
    from test_train import ParityAddition

    task = ParityAddition()
    long = Trainer(_cfg(tmp_path, "long", num_generations=4), get_objective("sdpo", teacher="live"), task=task,
                   log=lambda m: None)
    short = Trainer(_cfg(tmp_path, "short", num_generations=4, teacher_max_context_tokens=12,
                         mask_truncated_completions=True, max_new_tokens=3),
                    get_objective("sdpo", teacher="live"), task=task, log=lambda m: None)
    assert TrainConfig().teacher_max_context_tokens == 10240
    rows = long.prompts.rows_for_step(0)
    rollout = short._rollout(rows)
    scores = score_rollout(long.task, rollout, rows, long.cfg)
    full, mask = long.signals.teacher_contexts(rollout, rows, scores)
    cut, mask2 = short.signals.teacher_contexts(rollout, rows, scores)
    assert mask.any() and torch.equal(mask, mask2)
    for s in range(rollout.num_samples):
        if mask[s]:
            assert len(full[s]) > 12 and cut[s] == full[s][:12]  # SDPO: reprompt_truncation right
    assert rollout.truncated.any()
    sample = short.signals.per_sample(rollout, rows, scores)
    batches = short.batches.micro_batches(rollout, sample, list(range(rollout.num_samples)), 0)
    for mb in batches:
        b = mb.batch
        assert torch.equal(b.token_mask, ~rollout.truncated[mb.indices][b.seq_ids])
        assert b.global_seqs == rollout.num_samples  # masked completions still count per sequence
        assert b.global_tokens == float((~rollout.truncated).float() @ rollout.lengths.float())


def test_warmup_is_applied_with_the_constant_schedule(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "warm", warmup_steps=10, steps=20), get_objective("grpo"), log=lambda m: None)
    lrs = []
    for _ in range(3):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs == pytest.approx([0.0, 1e-4, 2e-4])  # verl's constant schedule with a linear warmup
    flat = Trainer(_cfg(tmp_path, "flat"), get_objective("grpo"), log=lambda m: None)
    assert flat.scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def test_build_teacher_loads_only_what_the_teacher_uses(tmp_path):
    """build_teacher is the one place that decides which weights load: the initial model (``initial``)
    only for a frozen teacher or trust-region reference, shared, never copied or changed; the
    run's starting weights (``start``) only to mix in or to start from (--teacher-reset)."""
    policy, _ = _tiny(0)
    initial_model, _ = _tiny(1)
    start_model, _ = _tiny(2)
    calls: list[str] = []

    def initial():
        calls.append("initial")
        return initial_model

    def start():
        calls.append("start")
        return start_model

    def build(**kw):
        calls.clear()
        flags = {k: kw.pop(k) for k in ("start_from_policy",) if k in kw}
        return build_teacher(TeacherSpec(**kw), policy, initial=initial, start=start, **flags)

    assert build_teacher(None, policy, initial=initial, start=start) is None and calls == []
    live = build(teacher="live")
    assert live.model is policy and calls == []
    ema = build(teacher="ema", teacher_update_rate=0.3)
    assert calls == [] and ema.model is not policy and ema.keeps_state and ema.rate == 0.3
    assert all(torch.equal(t, p) for t, p in zip(ema.model.parameters(), policy.parameters()))
    for mode in ("frozen", "trust-region"):
        teacher = build(teacher=mode)
        assert teacher.model is initial_model and calls == ["initial"] and not teacher.keeps_state
    reset = build(teacher="frozen", start_from_policy=True)
    assert calls == ["start"] and reset.model is not start_model
    assert all(torch.equal(t, p) for t, p in zip(reset.model.parameters(), start_model.parameters()))
    before = initial_model.lm_head.weight.clone()
    a = 0.25
    mixed = build(teacher="trust-region", teacher_init_alpha=a)
    assert calls == ["initial", "start"] and mixed.model is not initial_model
    assert torch.equal(initial_model.lm_head.weight, before)
    for t, i, s in zip(mixed.model.parameters(), initial_model.parameters(), start_model.parameters()):
        torch.testing.assert_close(t, a * i + (1 - a) * s, rtol=0, atol=1e-6)
    # a path replaces the initial model: it is never loaded
    path = _save(*_tiny(3), tmp_path / "teacher")
    other, _ = _tiny(3)
    from_path = build(teacher="frozen", teacher_path=str(path))
    assert calls == [] and torch.equal(from_path.model.lm_head.weight, other.lm_head.weight)
    # without sources: the initial model is a copy of the policy
    plain = build_teacher(TeacherSpec(teacher="frozen"), policy)
    assert plain.model is not policy and torch.equal(plain.model.lm_head.weight, policy.lm_head.weight)


def test_the_ema_teacher_moves_once_per_rollout_batch(tmp_path):
    """The loop updates the EMA teacher once per rollout batch, after all of its optimiser updates:
    with two mini-batches (two updates) the teacher is (1 - r) * teacher + r * policy_after_both."""
    from test_train import ParityAddition

    rate = 0.4
    trainer = Trainer(_cfg(tmp_path, "ema2", mini_batches=2), get_objective("sdpo", teacher="ema",
                                                                            teacher_update_rate=rate),
                      task=ParityAddition(), log=lambda m: None)
    t0 = [p.detach().clone() for p in trainer.teacher.model.parameters()]
    row = trainer.step(0)
    assert row["updates"] == 2 and row["skipped"] == 0
    moved = False
    for t, t_before, p in zip(trainer.teacher.model.parameters(), t0, trainer.policy.parameters()):
        torch.testing.assert_close(t, (1 - rate) * t_before + rate * p.detach(), rtol=0, atol=1e-6)
        moved = moved or not torch.equal(t, t_before)
    assert moved
