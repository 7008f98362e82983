"""GRPO against a direct, loop-by-loop implementation of the clipped surrogate; presets; signals."""

import math

import pytest
import torch
from test_objectives_helpers import loss_and_grad, make_case, stats_for

from denser.kernels import token_stats
from denser.objectives import PolicyBatch, Signal, get_objective


def direct_grpo(logp, entropy, batch, cfg):
    """The formula written out token by token, sequence by sequence (no shared code)."""
    clip_low, clip_high = cfg.get("clip_low", 0.2), cfg.get("clip_high", 0.2)
    c = cfg.get("clip_ratio_c", 3.0)
    kl_coef, ent_coef = cfg.get("kl_coef", 0.0), cfg.get("entropy_coef", 0.0)
    est, mode = cfg.get("kl_estimator", "k3"), cfg.get("loss_agg_mode", "token-mean")
    seq_level = cfg.get("ratio_level", "token") == "sequence"
    old = batch.old_logp if batch.old_logp is not None else logp.detach()
    total = 0.0
    for s in range(batch.num_seqs):
        idx = [i for i in range(len(batch.seq_ids)) if batch.seq_ids[i] == s and batch.token_mask[i]]
        if not idx:
            continue
        adv = batch.advantages[s] if batch.advantages.numel() == batch.num_seqs else None
        seq_ratio = torch.exp(sum(logp[i] - old[i] for i in idx) / len(idx)) if seq_level else None
        terms = []
        for i in idx:
            a = adv if adv is not None else batch.advantages[i]
            r = seq_ratio if seq_level else torch.exp(logp[i] - old[i])
            term = torch.maximum(-a * r, -a * torch.clamp(r, 1 - clip_low, 1 + clip_high))
            if c is not None and a < 0:
                term = torch.minimum(term, -a * c)
            d = batch.ref_logp[i] - logp[i]
            kl = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - d - 1}[est]
            term = term + kl_coef * kl
            if ent_coef:
                term = term - ent_coef * entropy[i]
            terms.append(term)
        seq_sum = sum(terms)
        if mode == "token-mean":
            total = total + seq_sum / batch.global_tokens
        elif mode == "seq-mean-token-mean":
            total = total + seq_sum / len(terms) / batch.global_seqs
        elif mode == "seq-mean-token-sum":
            total = total + seq_sum / batch.global_seqs
        else:
            total = total + seq_sum / (batch.global_seqs * batch.norm_length)
    return total


CONFIGS = [
    dict(),
    dict(clip_low=0.1, clip_high=0.28, loss_agg_mode="seq-mean-token-mean"),
    dict(clip_ratio_c=1.1, kl_coef=0.1, kl_estimator="k1", loss_agg_mode="seq-mean-token-sum"),
    dict(clip_ratio_c=None, kl_coef=0.05, kl_estimator="k2", entropy_coef=0.01, loss_agg_mode="seq-mean-token-sum-norm"),
    dict(kl_coef=0.2, kl_estimator="k3", entropy_coef=-0.02),
    dict(ratio_level="sequence", clip_low=0.05, clip_high=0.08, loss_agg_mode="seq-mean-token-mean"),
    dict(ratio_level="sequence", clip_ratio_c=1.2, kl_coef=0.1, loss_agg_mode="token-mean"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("per_token_adv", [False, True])
def test_grpo_matches_direct_formula(gen, cfg, per_token_adv):
    case = make_case(gen, old_spread=0.4, per_token_adv=per_token_adv)
    objective = get_objective("grpo", **cfg)
    out, grad = loss_and_grad(objective, case)
    hidden = case["hidden"].clone().requires_grad_()
    stats = token_stats(hidden, case["weight"], case["targets"], need_entropy=True, backend="reference")
    expected = direct_grpo(stats.logp, stats.entropy, case["batch"], cfg)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(grad, expected_grad, rtol=1e-4, atol=1e-6)
    assert grad.abs().sum() > 0


def test_clipping_actually_binds_in_the_direct_test(gen):
    case = make_case(gen, old_spread=0.4)
    out, _ = loss_and_grad(get_objective("grpo", clip_ratio_c=1.1), case)
    m = out.metric_values()
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0 and m["dual_clip_frac"] > 0


def test_metrics_hand_computed():
    # 4 tokens of one sequence; ratios e^{0.5}, e^{-0.5}, 1, e^{1.5}
    logp = torch.tensor([-1.0, -2.0, -1.5, -0.5])
    old = torch.tensor([-1.5, -1.5, -1.5, -2.0])
    batch = PolicyBatch(seq_ids=torch.zeros(4, dtype=torch.long), num_seqs=1, global_tokens=4, global_seqs=1,
                        advantages=torch.tensor([-1.0]), old_logp=old, ref_logp=torch.tensor([-1.0, -1.0, -1.0, -1.0]))
    from denser.objectives import TokenStats

    out = get_objective("grpo", kl_coef=0.1).loss(TokenStats(logp, entropy=torch.tensor([1.0, 2.0, 3.0, 4.0])), batch)
    m = out.metric_values()
    ratios = [math.exp(0.5), math.exp(-0.5), 1.0, math.exp(1.5)]
    assert m["ratio"] == pytest.approx(sum(ratios) / 4)
    assert m["clip_frac_low"] == pytest.approx(1 / 4)   # A < 0 and r < 0.8: e^-0.5
    assert m["clip_frac_high"] == 0.0                  # A < 0: the upper clip never binds
    assert m["dual_clip_frac"] == pytest.approx(1 / 4)  # r = e^1.5 > 3
    kl_old = [math.exp(x) - 1 - x for x in (0.5, -0.5, 0.0, 1.5)]  # k3 of KL(old || new), r = e^(logp - old)
    assert m["approx_kl"] == pytest.approx(sum(kl_old) / 4, rel=1e-6)
    kl_ref = [math.exp(r - l) - (r - l) - 1 for l, r in zip(logp.tolist(), [-1.0] * 4)]
    assert m["kl_ref"] == pytest.approx(sum(kl_ref) / 4, rel=1e-6)
    assert m["entropy"] == pytest.approx(2.5)
    # per-token loss: max(-A r, -A clip(r)) then min with -A*3 for A < 0
    terms = [max(r, min(max(r, 0.8), 1.2)) for r in ratios]
    terms = [min(t, 3.0) for t in terms]
    expected = sum(terms) / 4 + 0.1 * sum(kl_ref) / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    # positive advantage: only the upper clip can bind (ratios e^-0.5 < 0.8 and e^0.5 > 1.2)
    positive = PolicyBatch(seq_ids=torch.zeros(2, dtype=torch.long), num_seqs=1, global_tokens=2, global_seqs=1,
                           advantages=torch.tensor([2.0]), old_logp=torch.tensor([-1.5, -1.5]))
    m = get_objective("grpo").loss(TokenStats(torch.tensor([-2.0, -1.0])), positive).metric_values()
    assert (m["clip_frac_low"], m["clip_frac_high"], m["dual_clip_frac"]) == (0.0, 0.5, 0.0)


def test_on_policy_without_old_logp_ratio_is_one_and_gradient_is_policy_gradient(gen):
    case = make_case(gen)
    batch = case["batch"]
    import dataclasses

    on_policy = dataclasses.replace(batch, old_logp=None)
    objective = get_objective("grpo")
    assert Signal.OLD_LOGP not in objective.signals()
    out, grad = loss_and_grad(objective, case, on_policy)
    assert out.metric_values()["ratio"] == pytest.approx(1.0)
    hidden = case["hidden"].clone().requires_grad_()
    logp = token_stats(hidden, case["weight"], case["targets"], backend="reference").logp
    pg = -(batch.advantages[batch.seq_ids] * logp)[batch.token_mask].sum() / batch.global_tokens
    (expected,) = torch.autograd.grad(pg, hidden)
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_signals_depend_on_fields():
    assert get_objective("grpo").signals() == {Signal.REWARDS, Signal.ADVANTAGES}
    assert Signal.REF_LOGP in get_objective("grpo", kl_coef=0.01).signals()
    assert Signal.REF_LOGP not in get_objective("grpo", kl_coef=0.0, kl_estimator="k1").signals()
    assert Signal.OLD_LOGP in get_objective("grpo", use_old_logp=True).signals()
    ent = get_objective("grpo", entropy_coef=0.01)
    assert Signal.ENTROPY in ent.signals() and ent.core_options().need_entropy
    assert get_objective("grpo", log_entropy=True).core_options().need_entropy
    assert not get_objective("grpo").core_options().need_entropy


def test_separable_follows_ratio_level():
    assert get_objective("grpo").separable == "token"
    assert get_objective("grpo", ratio_level="sequence").separable == "sequence"
    assert get_objective("gspo").separable == "sequence"
    assert get_objective("gspo", ratio_level="token").separable == "token"


def test_presets_have_the_papers_settings():
    dr = get_objective("dr_grpo")
    assert (dr.scale_rewards, dr.loss_agg_mode, dr.kl_coef) == ("none", "seq-mean-token-sum-norm", 0.0)
    dapo = get_objective("dapo")
    assert (dapo.clip_low, dapo.clip_high, dapo.loss_agg_mode, dapo.kl_coef) == (0.2, 0.28, "token-mean", 0.0)
    assert dapo.scale_rewards == "group"
    gspo = get_objective("gspo")
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high) == ("sequence", 3e-4, 4e-4)
    assert (gspo.loss_agg_mode, gspo.kl_coef, gspo.clip_ratio_c, gspo.use_old_logp) == ("seq-mean-token-mean", 0.0, None, True)
    assert Signal.OLD_LOGP in gspo.signals()
    grpo = get_objective("grpo")
    assert (grpo.clip_low, grpo.clip_high, grpo.clip_ratio_c, grpo.kl_estimator) == (0.2, 0.2, 3.0, "k3")
    # presets are their own registered classes, overridable like any objective
    assert get_objective("dapo", clip_high=0.3).clip_high == 0.3


def test_preset_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert torch.allclose(get_objective("dr_grpo").advantages(rewards, 4), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    grpo_adv = get_objective("grpo").advantages(rewards, 4)
    assert torch.allclose(grpo_adv, torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6))
    rloo = get_objective("grpo", scale_rewards="none", leave_one_out=True).advantages(rewards, 4)
    assert torch.allclose(rloo, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


@pytest.mark.parametrize("bad, match", [
    (dict(clip_low=1.0), "clip_low"),
    (dict(clip_high=-0.1), "clip_high"),
    (dict(clip_ratio_c=1.0), "clip_ratio_c"),
    (dict(kl_coef=-1.0), "kl_coef"),
])
def test_invalid_values(bad, match):
    with pytest.raises(ValueError, match=match):
        get_objective("grpo", **bad)


def test_kl_coef_without_ref_logp_fails_clearly(gen):
    import dataclasses

    case = make_case(gen)
    objective = get_objective("grpo", kl_coef=0.1)
    batch = dataclasses.replace(case["batch"], ref_logp=None)
    with pytest.raises(ValueError, match="ref_logp"):
        objective.loss(stats_for(objective, case), batch)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_garbage_on_masked_tokens_does_not_leak(gen, ratio_level):
    case = make_case(gen, per_token_adv=True, masked=(2, 5))
    b = case["batch"]
    for name in ("advantages", "old_logp", "ref_logp"):
        getattr(b, name)[2] = float("nan")
        getattr(b, name)[5] = float("inf")
    out, grad = loss_and_grad(get_objective("grpo", kl_coef=0.1, ratio_level=ratio_level), case)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(torch.isfinite(m.sum) for m in out.metrics.values())
