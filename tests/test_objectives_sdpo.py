"""SDPO: teacher masking, IS clipping, token dropout, sampled-token mode, batches without teacher."""

import dataclasses

import pytest
import torch
from test_objectives_helpers import loss_and_grad, make_case, stats_for

from denser.kernels import CoreOptions, TokenStats, token_stats
from denser.objectives import PolicyBatch, Signal, get_objective, normaliser_counts
from denser.objectives.sdpo import TOKEN_WEIGHT


def direct_sdpo(divergence, logp, batch, is_clip, keep=None, scale=1.0, agg="seq-mean-token-mean"):
    """Over distilled tokens, D_t * min(exp(logp - old), is_clip) (detached), aggregated:
    seq-mean-token-mean: each sequence's sum / its loss tokens, summed, / all sequences (SDPO);
    token-mean: summed / the step's teacher tokens."""
    per_seq = {}
    for i in range(len(batch.seq_ids)):
        s = int(batch.seq_ids[i])
        if not batch.token_mask[i] or not batch.teacher_mask[s]:
            continue
        if keep is not None and not keep[i]:
            continue
        w = torch.exp(logp[i] - batch.old_logp[i]).detach()
        if is_clip is not None:
            w = torch.clamp(w, max=is_clip)
        else:
            w = 1.0
        per_seq[s] = per_seq.get(s, 0.0) + divergence[i] * w * scale
    if agg == "token-mean":
        normaliser = batch.global_teacher_tokens if batch.global_teacher_tokens is not None else batch.global_tokens
        return sum(per_seq.values()) / normaliser
    assert agg == "seq-mean-token-mean"
    lens = {s: int((batch.token_mask & (batch.seq_ids == s)).sum()) for s in per_seq}
    return sum(v / lens[s] for s, v in per_seq.items()) / batch.global_seqs


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("mode, kw", [
    ("full", dict(alpha=0.5)),
    ("full", dict(alpha=0.0, is_clip=None)),
    ("topk", dict(alpha=1.0, topk=4)),
    ("topk", dict(alpha=0.3, topk=3, add_tail=False, is_clip=1.2)),
])
def test_sdpo_matches_direct_formula(gen, mode, kw, agg):
    case = make_case(gen, old_spread=0.6)
    case["batch"].global_teacher_tokens = 9.0
    objective = get_objective("sdpo", distill_mode=mode, loss_agg_mode=agg, **kw)
    out, grad = loss_and_grad(objective, case)
    hidden = case["hidden"].clone().requires_grad_()
    stats = stats_for(objective, case, hidden)
    expected = direct_sdpo(stats.divergence, stats.logp, case["batch"], objective.is_clip, agg=agg)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


def _hand_batch(lens, teacher, divergence, masked_seqs=()):
    seq_ids = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    token_mask = torch.tensor([int(s) not in masked_seqs for s in seq_ids])
    batch = PolicyBatch(seq_ids=seq_ids, num_seqs=len(lens), global_tokens=1.0, global_seqs=1.0,
                        token_mask=token_mask, teacher_mask=torch.tensor(teacher))
    logp = torch.zeros(len(seq_ids), requires_grad=True)
    return batch, TokenStats(logp=logp, divergence=torch.tensor(divergence))


def test_sdpo_aggregation_by_hand_with_teacherless_and_masked_samples():
    """Two micro-batches of one step. A: sequences of 2 and 3 tokens, the second without a teacher;
    B: sequences of 1 and 2 tokens, both with a teacher, the second masked (as a truncated reply under
    mask_truncated_completions). Per-token divergences are given."""
    a, a_stats = _hand_batch([2, 3], [True, False], [1.0, 3.0, 5.0, 5.0, 5.0])
    b, b_stats = _hand_batch([1, 2], [True, True], [4.0, 7.0, 9.0], masked_seqs=(1,))
    totals = {}
    for batch in (a, b):  # what the loop does: sum each micro-batch's share, then set it on every one
        for k, v in normaliser_counts(batch).items():
            totals[k] = totals.get(k, 0.0) + v
    assert totals["global_seqs"] == 4.0  # every sequence: the teacher-less and the masked one count
    assert totals["global_teacher_tokens"] == 3.0
    for batch in (a, b):
        for k, v in totals.items():
            setattr(batch, k, v)

    def step_loss(agg):
        objective = get_objective("sdpo", distill_mode="full", loss_agg_mode=agg)
        return sum(objective.loss(stats, batch).loss.item() for stats, batch in ((a_stats, a), (b_stats, b)))

    # SDPO / TRL: token means of the distilled sequences, (1 + 3) / 2 and 4 / 1, summed, / 4 sequences
    assert step_loss("seq-mean-token-mean") == pytest.approx((2.0 + 4.0) / 4)
    # the distilled-token mean: (1 + 3 + 4) / 3 distilled tokens
    assert step_loss("token-mean") == pytest.approx(8.0 / 3)
    assert get_objective("sdpo").loss_agg_mode == "seq-mean-token-mean"  # SDPO's aggregation is the default


def test_is_weight_is_clipped_and_detached(gen):
    case = make_case(gen, old_spread=1.5)
    objective = get_objective("sdpo", distill_mode="full", is_clip=1.5, loss_agg_mode="token-mean")
    out, grad = loss_and_grad(objective, case)
    m = out.metric_values()
    assert m["is_clip_frac"] > 0 and m["is_weight"] <= 1.5
    # detached: the gradient is that of sum(w * D) with w a constant
    hidden = case["hidden"].clone().requires_grad_()
    stats = stats_for(objective, case, hidden)
    b = case["batch"]
    w = torch.exp(stats.logp.detach() - b.old_logp).clamp(max=1.5)
    keep = b.token_mask & b.teacher_mask[b.seq_ids]
    (expected,) = torch.autograd.grad((stats.divergence * w)[keep].sum() / b.global_tokens, hidden)
    assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-7)
    no_weight, _ = loss_and_grad(get_objective("sdpo", distill_mode="full", is_clip=None), case)
    assert "is_weight" not in no_weight.metrics and no_weight.loss.item() != pytest.approx(out.loss.item())


def test_samples_without_teacher_contribute_nothing(gen):
    case = make_case(gen, teacher_mask=torch.tensor([True, False, True, False]))
    objective = get_objective("sdpo", distill_mode="full")
    out, grad = loss_and_grad(objective, case)
    seq_ids = case["batch"].seq_ids
    no_teacher_rows = (seq_ids == 1) | (seq_ids == 3)
    assert torch.all(grad[no_teacher_rows] == 0) and grad[~no_teacher_rows].abs().sum() > 0
    m = out.metric_values()
    assert m["teacher_frac"] == pytest.approx(0.5)
    b = case["batch"]
    distilled = (b.token_mask & ~no_teacher_rows).sum().item()
    assert m["distilled_frac"] == pytest.approx(distilled / b.token_mask.sum().item())


@pytest.mark.parametrize("mode", ["full", "topk", "sampled_token"])
def test_batch_without_any_teacher_gives_exact_zero(gen, mode):
    case = make_case(gen, teacher_mask=torch.zeros(4, dtype=torch.bool))
    b = case["batch"]
    b.global_teacher_tokens, b.global_teacher_seqs = 0.0, 0.0
    b.extras["teacher_logp"] = torch.full_like(b.extras["teacher_logp"], float("nan"))  # garbage: no teacher ran
    kw = dict(alpha=1.0) if mode == "sampled_token" else dict(topk=4)
    for agg in ("token-mean", "seq-mean-token-mean"):
        objective = get_objective("sdpo", distill_mode=mode, loss_agg_mode=agg, **kw)
        out, grad = loss_and_grad(objective, case)
        assert out.loss.item() == 0.0 and out.loss.requires_grad
        assert torch.all(grad == 0)
        assert out.metric_values()["teacher_frac"] == 0.0


def test_token_mean_uses_teacher_tokens_and_sequence_modes_all_sequences(gen):
    case = make_case(gen)
    objective = get_objective("sdpo", distill_mode="full", loss_agg_mode="token-mean")
    plain, _ = loss_and_grad(objective, case)
    b = dataclasses.replace(case["batch"], global_teacher_tokens=4.0)
    scaled, _ = loss_and_grad(objective, case, b)
    assert scaled.loss.item() == pytest.approx(plain.loss.item() * b.global_tokens / 4.0, rel=1e-6)
    for agg in ("seq-mean-token-mean", "seq-mean-token-sum"):
        seq = get_objective("sdpo", distill_mode="full", loss_agg_mode=agg)
        a, _ = loss_and_grad(seq, case, dataclasses.replace(case["batch"], global_teacher_seqs=2.0))
        c, _ = loss_and_grad(seq, case)
        d, _ = loss_and_grad(seq, case, dataclasses.replace(case["batch"], global_seqs=2.0))
        assert a.loss.item() == pytest.approx(c.loss.item(), rel=1e-6)  # teacher sequences are not the normaliser
        assert d.loss.item() == pytest.approx(c.loss.item() * case["batch"].global_seqs / 2.0, rel=1e-6)


def test_mask_ratio_drops_tokens_reproducibly(gen):
    case = make_case(gen, lens=(20, 20, 20), teacher_mask=torch.ones(3, dtype=torch.bool), masked=())
    objective = get_objective("sdpo", distill_mode="full", mask_ratio=0.5, seed=3, loss_agg_mode="token-mean")
    b1, b2 = objective.prepare(case["batch"]), objective.prepare(case["batch"])
    w = b1.extras[TOKEN_WEIGHT]
    assert torch.equal(w, b2.extras[TOKEN_WEIGHT])
    assert set(w.unique().tolist()) <= {0.0, 2.0} and 10 < (w > 0).sum() < 50
    assert TOKEN_WEIGHT not in case["batch"].extras  # prepare does not mutate its input
    later = objective.prepare(dataclasses.replace(case["batch"], step=1))
    assert not torch.equal(later.extras[TOKEN_WEIGHT], w)
    out, grad = loss_and_grad(objective, case)
    dropped = w == 0
    assert torch.all(grad[dropped] == 0) and torch.all(grad[~dropped].abs().sum(-1) > 0)
    assert out.metric_values()["distilled_frac"] == pytest.approx((~dropped).float().mean().item())
    # kept tokens are weighted 1 / (1 - mask_ratio)
    hidden = case["hidden"].clone().requires_grad_()
    stats = stats_for(objective, case, hidden)
    expected = direct_sdpo(stats.divergence, stats.logp, case["batch"], 2.0, keep=~dropped, scale=2.0, agg="token-mean")
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    seq = get_objective("sdpo", distill_mode="full", mask_ratio=0.5, seed=3)  # SDPO's per-sequence mean
    out, _ = loss_and_grad(seq, case)
    expected = direct_sdpo(stats.divergence, stats.logp, case["batch"], 2.0, keep=~dropped, scale=2.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sampled_token_mode(gen):
    case = make_case(gen, old_spread=0.0)
    with pytest.raises(ValueError, match="alpha=1.0"):
        get_objective("sdpo", distill_mode="sampled_token")
    objective = get_objective("sdpo", distill_mode="sampled_token", alpha=1.0, is_clip=None, loss_agg_mode="token-mean")
    assert objective.core_options().need_divergence is False
    assert Signal.TEACHER in objective.signals()
    out, grad = loss_and_grad(objective, case)
    b = case["batch"]
    hidden = case["hidden"].clone().requires_grad_()
    logp = token_stats(hidden, case["weight"], case["targets"], backend="reference").logp
    keep = b.token_mask & b.teacher_mask[b.seq_ids]
    gap = logp.detach() - b.extras["teacher_logp"]
    # gradient of the sampled-token reverse KL: (logp_s - logp_t) * grad logp_s over distilled tokens
    (expected,) = torch.autograd.grad((gap * logp)[keep].sum() / b.global_tokens, hidden)
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7)
    m = out.metric_values()
    assert m["distill_loss"] == pytest.approx(gap[keep].mean().item(), rel=1e-5)
    assert m["teacher_gap"] == pytest.approx(-gap[keep].mean().item(), rel=1e-5)
    del b.extras["teacher_logp"]
    with pytest.raises(ValueError, match="teacher_logp"):
        objective.loss(stats_for(objective, case), b)


def test_missing_divergence_fails_clearly(gen):
    case = make_case(gen)
    objective = get_objective("sdpo", distill_mode="full")
    stats = token_stats(case["hidden"], case["weight"], case["targets"], backend="reference")
    with pytest.raises(ValueError, match="teacher_hidden"):
        objective.loss(stats, case["batch"])


def test_defaults_and_options():
    sdpo = get_objective("sdpo")
    assert (sdpo.alpha, sdpo.distill_mode, sdpo.topk, sdpo.add_tail, sdpo.is_clip, sdpo.mask_ratio) == (
        0.5, "topk", 100, True, 2.0, 0.0)
    assert (sdpo.teacher, sdpo.teacher_update_rate, sdpo.success_threshold) == ("ema", 0.05, 0.5)
    assert sdpo.dont_reprompt_on_self_success and sdpo.remove_thinking and sdpo.include_feedback
    assert sdpo.loss_agg_mode == "seq-mean-token-mean"
    assert (sdpo.teacher_path, sdpo.teacher_init_alpha) == (None, 1.0)
    assert sdpo.core_options() == CoreOptions(need_entropy=False, need_divergence=True, alpha=0.5, topk=100, add_tail=True)
    assert get_objective("sdpo", distill_mode="full").core_options().topk is None
    assert sdpo.signals() == {Signal.REWARDS, Signal.TEACHER}
    assert Signal.OLD_LOGP in get_objective("sdpo", use_old_logp=True).signals()
    assert sdpo.separable == "token"


@pytest.mark.parametrize("bad, match", [
    (dict(alpha=1.5), "alpha"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(is_clip=0.0), "is_clip"),
    (dict(topk=0), "topk"),
    (dict(teacher="student"), "teacher"),
    (dict(teacher_update_rate=2.0), "teacher_update_rate"),
    (dict(teacher_init_alpha=1.5), "teacher_init_alpha"),
    (dict(teacher="live", teacher_path="/some/dir"), "teacher_path needs a teacher of its own"),
    (dict(teacher="live", teacher_init_alpha=0.5), "teacher_init_alpha < 1 needs a teacher of its own"),
    (dict(reprompt_template="{prompt} {answer}"), r"placeholder\(s\) \{answer\}"),
    (dict(solution_template="{solution"), "not a format string"),
])
def test_invalid_values(bad, match):
    with pytest.raises(ValueError, match=match):
        get_objective("sdpo", **bad)


@pytest.mark.parametrize("name", ["sdpo", "hybrid", "hybrid_adv"])
def test_teacher_fields_are_teacher_specs_declared_once(name):
    """The distilling objectives' teacher fields are TeacherSpec's own (the same dataclass fields, so one
    help text and one default), and teacher_spec() carries every value as it is: each field set to a
    value other than its default comes back in the spec, compared against a spec built directly."""
    from denser.objectives import TeacherSpec
    from denser.objectives.base import objective_class

    own = {f.name: f for f in dataclasses.fields(objective_class(name))}
    for f in dataclasses.fields(TeacherSpec):
        assert own[f.name] is f, f.name
    values = dict(teacher="trust-region", teacher_update_rate=0.3, teacher_path="/some/dir", teacher_init_alpha=0.25,
                  success_threshold=0.8, dont_reprompt_on_self_success=False, remove_thinking=False,
                  include_feedback=False, feedback_only_without_solution=False, reprompt_template="{prompt}|{solution}",
                  solution_template="S={successful_previous_attempt}", feedback_template="F={feedback_raw}",
                  teacher_context="prompt")
    assert set(values) == {f.name for f in dataclasses.fields(TeacherSpec)}
    for f in dataclasses.fields(TeacherSpec):
        assert values[f.name] != f.default, f.name
    spec = get_objective(name, **values).teacher_spec()
    assert type(spec) is TeacherSpec and spec == TeacherSpec(**values)
    assert get_objective(name, teacher_path="").teacher_spec().teacher_path is None  # a config file's ''
    assert get_objective(name).teacher_spec() == TeacherSpec()
