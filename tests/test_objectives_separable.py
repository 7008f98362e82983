"""Contract 1b: every built-in loss is a sum over token chunks (sequence-aligned chunks for
sequence ratios); losses, gradients and metrics of the chunks add up to the whole."""

import pytest
import torch
from test_objectives_helpers import make_case, stats_for

from denser.kernels import merge_metrics
from denser.objectives import get_objective

CASES = [
    ("grpo", dict()),
    ("grpo", dict(kl_coef=0.1, entropy_coef=0.01, loss_agg_mode="seq-mean-token-mean")),
    ("grpo", dict(loss_agg_mode="seq-mean-token-sum", clip_ratio_c=1.1, kl_estimator="k2", kl_coef=0.2)),
    ("grpo", dict(ratio_level="sequence", loss_agg_mode="token-mean")),
    ("dr_grpo", dict()),
    ("dapo", dict(log_entropy=True)),
    ("gspo", dict()),
    ("gspo", dict(clip_low=0.05, clip_high=0.05, kl_coef=0.1)),
    ("sdpo", dict(topk=4)),
    ("sdpo", dict(distill_mode="full", alpha=0.0, loss_agg_mode="seq-mean-token-mean", mask_ratio=0.3)),
    ("sdpo", dict(distill_mode="sampled_token", alpha=1.0, is_clip=1.1)),
    ("hybrid", dict(topk=4, lam=0.4, mask_ratio=0.2, density=0.7)),
    ("hybrid", dict(distill_mode="full", lam=0.8, lam_end=0.2, ratio_level="sequence",
                    loss_agg_mode="seq-mean-token-sum-norm")),
    ("hybrid_adv", dict(lam=0.5, kl_coef=0.05)),
    ("hybrid_adv", dict(lam=0.2, density=0.6, loss_agg_mode="seq-mean-token-mean")),
    ("rloo", dict(loss_agg_mode="seq-mean-token-mean", kl_coef=0.1)),
    ("reinforce_pp", dict(clip_high=0.28, entropy_coef=0.01)),
    ("reinforce_pp_baseline", dict(loss_agg_mode="seq-mean-token-sum-norm")),
    ("cispo", dict()),
    ("cispo", dict(clip_low=0.1, clip_high=0.1, kl_coef=0.1, loss_agg_mode="seq-mean-token-mean")),
]


def bounds(batch, sequence_aligned: bool, gen: torch.Generator) -> list[tuple[int, int]]:
    """Random chunk boundaries; only at sequence starts for sequence-separable objectives."""
    n = batch.num_tokens
    if sequence_aligned:
        candidates = torch.nonzero(batch.seq_starts).flatten()[1:].tolist()
    else:
        candidates = list(range(1, n))
    pick = torch.randperm(len(candidates), generator=gen)[: max(1, len(candidates) // 2)]
    cuts = sorted(candidates[i] for i in pick.tolist())
    edges = [0] + cuts + [n]
    return list(zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_sum_over_chunks_equals_whole(gen, name, kw):
    objective = get_objective(name, **kw)
    case = make_case(gen, lens=(4, 6, 1, 5, 3), masked=(2, 10), old_spread=0.4, step=1, total_steps=4)
    hidden = case["hidden"].clone().requires_grad_()
    batch = objective.prepare(case["batch"])  # once per micro-batch, before chunking
    stats = stats_for(objective, case, hidden)
    whole = objective.loss(stats, batch)
    (whole_grad,) = torch.autograd.grad(whole.loss, hidden, retain_graph=True)

    chunks = bounds(batch, objective.separable == "sequence", gen)
    assert len(chunks) > 1
    parts = [objective.loss(stats[a:b], batch.token_slice(a, b)) for a, b in chunks]
    total = sum(p.loss for p in parts)
    (chunk_grad,) = torch.autograd.grad(total, hidden)
    assert total.item() == pytest.approx(whole.loss.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(chunk_grad, whole_grad, rtol=1e-4, atol=1e-7)
    assert whole_grad.abs().sum() > 0

    merged = merge_metrics([p.metrics for p in parts])
    assert set(merged) == set(whole.metrics)
    for key, metric in whole.metrics.items():
        assert merged[key].sum.item() == pytest.approx(metric.sum.item(), rel=1e-5, abs=1e-6), key
        assert merged[key].count.item() == pytest.approx(metric.count.item(), rel=1e-6), key


def test_sequence_ratio_needs_sequence_aligned_chunks(gen):
    """Why gspo declares separable="sequence": a chunk cutting a sequence sees a wrong ratio."""
    objective = get_objective("gspo", clip_low=0.5, clip_high=0.5)
    case = make_case(gen, lens=(4, 6), masked=(), old_spread=0.5)
    stats = stats_for(objective, case)
    batch = case["batch"]
    whole = objective.loss(stats, batch).loss
    straddling = sum(objective.loss(stats[a:b], batch.token_slice(a, b)).loss for a, b in [(0, 6), (6, 10)])
    aligned = sum(objective.loss(stats[a:b], batch.token_slice(a, b)).loss for a, b in [(0, 4), (4, 10)])
    assert aligned.item() == pytest.approx(whole.item(), rel=1e-6)
    assert straddling.item() != pytest.approx(whole.item(), rel=1e-3)
