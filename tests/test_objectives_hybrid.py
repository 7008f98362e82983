"""Sparse-dense mixes: exact limits (lam = 1 is grpo, lam = 0 is sdpo), blends, schedules, density."""

import dataclasses

import pytest
import torch
from test_objectives_helpers import loss_and_grad, make_case, stats_for

from denser.kernels import token_stats
from denser.objectives import Signal, get_objective
from denser.objectives.sdpo import TOKEN_WEIGHT

SDPO_KW = dict(topk=4, mask_ratio=0.25, seed=7)


def test_hybrid_lam_one_is_grpo_exactly(gen):
    case = make_case(gen, old_spread=0.4)
    kw = dict(clip_high=0.28, kl_coef=0.05, loss_agg_mode="seq-mean-token-mean")
    hybrid = get_objective("hybrid", lam=1.0, **kw, **SDPO_KW)
    grpo = get_objective("grpo", **kw)
    assert hybrid.signals() == grpo.signals() and Signal.TEACHER not in hybrid.signals()
    assert hybrid.core_options().need_divergence is False
    h_out, h_grad = loss_and_grad(hybrid, case)
    g_out, g_grad = loss_and_grad(grpo, case)
    assert torch.equal(h_out.loss, g_out.loss) and torch.equal(h_grad, g_grad)
    assert {k: m.value for k, m in g_out.metrics.items()} == {k: h_out.metrics[k].value for k in g_out.metrics}


@pytest.mark.parametrize("mode", ["topk", "full", "sampled_token"])
def test_hybrid_lam_zero_is_sdpo_exactly(gen, mode):
    case = make_case(gen, old_spread=0.8)
    kw = dict(SDPO_KW, distill_mode=mode, alpha=1.0 if mode == "sampled_token" else 0.3)
    hybrid = get_objective("hybrid", lam=0.0, **kw)
    sdpo = get_objective("sdpo", **kw)
    assert hybrid.signals() == sdpo.signals() and Signal.ADVANTAGES not in hybrid.signals()
    assert hybrid.core_options() == dataclasses.replace(sdpo.core_options(), need_entropy=False)
    h_out, h_grad = loss_and_grad(hybrid, case)
    s_out, s_grad = loss_and_grad(sdpo, case)
    assert torch.equal(h_out.loss, s_out.loss) and torch.equal(h_grad, s_grad)
    assert h_grad.abs().sum() > 0


def test_hybrid_blend_between(gen):
    case = make_case(gen, old_spread=0.4)
    hybrid = get_objective("hybrid", lam=0.3, **SDPO_KW)
    assert {Signal.ADVANTAGES, Signal.TEACHER} <= hybrid.signals()
    h_out, h_grad = loss_and_grad(hybrid, case)
    g_out, g_grad = loss_and_grad(get_objective("grpo"), case)
    s_out, s_grad = loss_and_grad(get_objective("sdpo", **SDPO_KW), case)
    assert h_out.loss.item() == pytest.approx(0.3 * g_out.loss.item() + 0.7 * s_out.loss.item(), rel=1e-6)
    assert torch.allclose(h_grad, 0.3 * g_grad + 0.7 * s_grad, rtol=1e-5, atol=1e-8)
    assert set(g_out.metrics) | set(s_out.metrics) | {"lam"} == set(h_out.metrics)
    assert h_out.metric_values()["lam"] == pytest.approx(0.3)


def test_hybrid_fields_are_shared_and_validated():
    hybrid = get_objective("hybrid", clip_high=0.28, alpha=0.1, loss_agg_mode="seq-mean-token-sum")
    assert hybrid.grpo_part().clip_high == 0.28 and hybrid.sdpo_part().alpha == 0.1
    assert hybrid.grpo_part().loss_agg_mode == "seq-mean-token-sum"
    # the SDPO part has its own aggregation, SDPO's per-sequence token mean unless set
    assert hybrid.sdpo_part().loss_agg_mode == get_objective("sdpo").loss_agg_mode == "seq-mean-token-mean"
    assert get_objective("hybrid", sdpo_loss_agg_mode="token-mean").sdpo_part().loss_agg_mode == "token-mean"
    assert get_objective("hybrid", ratio_level="sequence").separable == "sequence"
    with pytest.raises(ValueError, match="objective 'hybrid'.*clip_ratio_c"):
        get_objective("hybrid", clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="objective 'hybrid'.*alpha=1.0"):
        get_objective("hybrid", distill_mode="sampled_token")
    with pytest.raises(ValueError, match="lam"):
        get_objective("hybrid", lam=1.5)
    with pytest.raises(ValueError, match="density"):
        get_objective("hybrid_adv", density=0.0)


def test_lam_schedule_moves_over_steps(gen):
    case = make_case(gen)
    hybrid = get_objective("hybrid", lam=1.0, lam_end=0.0, **SDPO_KW)
    assert {Signal.ADVANTAGES, Signal.TEACHER} <= hybrid.signals()  # both parts are needed at some step
    lams = [hybrid.lam_at(dataclasses.replace(case["batch"], step=s, total_steps=5)) for s in range(6)]
    assert lams == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    first = dataclasses.replace(case["batch"], step=0, total_steps=5)
    last = dataclasses.replace(case["batch"], step=4, total_steps=5)
    g_out, _ = loss_and_grad(get_objective("grpo"), case, first)
    s_out, _ = loss_and_grad(get_objective("sdpo", **SDPO_KW), case, last)
    assert torch.equal(loss_and_grad(hybrid, case, first)[0].loss, g_out.loss)
    assert torch.equal(loss_and_grad(hybrid, case, last)[0].loss, s_out.loss)
    cosine = get_objective("hybrid", lam=0.0, lam_end=1.0, lam_schedule="cosine")
    assert cosine.lam_at(dataclasses.replace(case["batch"], step=1, total_steps=5)) == pytest.approx(0.5 - 0.5 ** 1.5)


def test_hybrid_density_distils_a_fraction_of_tokens(gen):
    case = make_case(gen, lens=(15, 15), teacher_mask=torch.ones(2, dtype=torch.bool), masked=())
    hybrid = get_objective("hybrid", lam=0.0, density=0.4, distill_mode="full", seed=1)
    prepared = hybrid.prepare(case["batch"])
    w = prepared.extras[TOKEN_WEIGHT]
    assert torch.equal(w, hybrid.prepare(case["batch"]).extras[TOKEN_WEIGHT])
    assert set(w.unique().tolist()) <= {0.0, 2.5} and 0 < (w > 0).sum() < 30
    out, grad = loss_and_grad(hybrid, case)
    assert torch.all(grad[w == 0] == 0) and grad[w > 0].abs().sum() > 0
    # density 1 -> the plain sdpo loss
    full, _ = loss_and_grad(get_objective("hybrid", lam=0.0, density=1.0, distill_mode="full"), case)
    plain, _ = loss_and_grad(get_objective("sdpo", distill_mode="full"), case)
    assert torch.equal(full.loss, plain.loss)


def test_hybrid_adv_lam_one_is_grpo_exactly(gen):
    case = make_case(gen, old_spread=0.4)
    kw = dict(clip_low=0.1, kl_coef=0.02, ratio_level="sequence")
    adv = get_objective("hybrid_adv", lam=1.0, **kw)
    grpo = get_objective("grpo", **kw)
    assert adv.signals() == grpo.signals()
    a_out, a_grad = loss_and_grad(adv, case)
    g_out, g_grad = loss_and_grad(grpo, case)
    assert torch.equal(a_out.loss, g_out.loss) and torch.equal(a_grad, g_grad)


def test_hybrid_adv_blend_matches_formula(gen):
    case = make_case(gen, old_spread=0.3)
    lam = 0.6
    adv = get_objective("hybrid_adv", lam=lam)
    assert Signal.TEACHER in adv.signals() and adv.core_options().need_divergence is False
    out, grad = loss_and_grad(adv, case)
    b = case["batch"]
    logp0 = token_stats(case["hidden"], case["weight"], case["targets"], backend="reference").logp
    has_teacher = b.token_mask & b.teacher_mask[b.seq_ids]
    dense = torch.where(has_teacher, b.extras["teacher_logp"] - logp0, torch.zeros(()))
    blended = dataclasses.replace(b, advantages=lam * b.advantages[b.seq_ids] + (1 - lam) * dense,
                                  token_level_advantages=True)
    g_out, g_grad = loss_and_grad(get_objective("grpo"), case, blended)
    assert out.loss.item() == pytest.approx(g_out.loss.item(), rel=1e-6)
    assert torch.allclose(grad, g_grad, rtol=1e-5, atol=1e-8)
    assert out.metric_values()["dense_adv"] == pytest.approx(dense[has_teacher].mean().item(), rel=1e-5)


def test_hybrid_adv_lam_zero_gradient_is_sampled_token_sdpo(gen):
    # on-policy (ratio 1), every sample with a teacher: -d * grad logp == (logp_s - logp_t) grad logp_s
    case = make_case(gen, teacher_mask=torch.ones(4, dtype=torch.bool))
    b = dataclasses.replace(case["batch"], old_logp=None)
    adv = get_objective("hybrid_adv", lam=0.0)
    assert Signal.ADVANTAGES not in adv.signals()
    _, a_grad = loss_and_grad(adv, case, dataclasses.replace(b, advantages=None))
    # the same aggregation on both sides: the GRPO surrogate's token-mean
    sdpo = get_objective("sdpo", distill_mode="sampled_token", alpha=1.0, loss_agg_mode="token-mean")
    _, s_grad = loss_and_grad(sdpo, case, b)
    assert torch.allclose(a_grad, s_grad, rtol=1e-5, atol=1e-8) and a_grad.abs().sum() > 0


def test_hybrid_adv_density_and_missing_teacher_logp(gen):
    case = make_case(gen, lens=(15, 15), teacher_mask=torch.ones(2, dtype=torch.bool), masked=())
    adv = get_objective("hybrid_adv", lam=0.0, density=0.5, seed=2)
    out, _ = loss_and_grad(adv, case)
    frac = out.metric_values()["distilled_frac"]
    assert 0 < frac < 1
    b = dataclasses.replace(case["batch"], extras={})
    with pytest.raises(ValueError, match="teacher_logp"):
        adv.loss(stats_for(adv, case), b)
