"""fused_loss (gradients in forward) equals objective.loss(token_stats(...)) on the reference:
loss, metrics and gradients, for every built-in objective and for a user objective that uses
all three statistics; sequence-separable objectives with sequences straddling chunk bounds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from denser.kernels import CoreOptions, LossOutput, Metric, fused_loss
from denser.kernels.fused import chunk_bounds
from denser.objectives import Objective, PolicyBatch, Signal, get_objective, register_objective, unregister_objective

N, H, V, S = 53, 17, 97, 7


def _case(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, 12, 1, 9, 15, 6, 7])  # sums to N; several straddle a chunk of 5 or 8
    seq_ids = torch.repeat_interleave(torch.arange(S), lengths)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[4] = -100
    return dict(
        hidden=torch.randn(N, H, generator=g).to(dtype),
        weight=(torch.randn(V, H, generator=g) * 0.4).to(dtype),
        bias=(torch.randn(V, generator=g) * 0.3).to(dtype),
        teacher=torch.randn(N, H, generator=g).to(dtype),
        targets=targets,
        batch=PolicyBatch(
            seq_ids=seq_ids, num_seqs=S, global_tokens=float(N - 1), global_seqs=float(S),
            token_mask=targets != -100, rewards=torch.rand(S, generator=g), advantages=torch.randn(S, generator=g),
            old_logp=-torch.rand(N, generator=g) * 4 - 2, ref_logp=-torch.rand(N, generator=g) * 4 - 2,
            teacher_mask=torch.tensor([True, True, False, True, True, False, True]), norm_length=16.0,
            global_teacher_tokens=float(N - 8), global_teacher_seqs=5.0,
            extras={"teacher_logp": -torch.rand(N, generator=g) * 5},
        ),
    )


def _run(case, objective, backend, chunk_size, temperature):
    leaves = {k: case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    batch = dataclasses.replace(case["batch"], extras=dict(case["batch"].extras))
    teacher = case["teacher"] if objective.core_options().need_divergence else None
    out = fused_loss(leaves["hidden"], leaves["weight"], case["targets"], objective, batch, bias=leaves["bias"],
                     teacher_hidden=teacher, temperature=temperature, backend=backend, chunk_size=chunk_size)
    out.loss.backward()
    return out, {k: v.grad for k, v in leaves.items()}


OBJECTIVES = [
    ("grpo", {}), ("grpo", {"kl_coef": 0.1, "entropy_coef": 0.01, "use_old_logp": True}),
    ("dr_grpo", {}), ("dapo", {"use_old_logp": True}), ("gspo", {}),
    ("sdpo", {"distill_mode": "full", "alpha": 0.3}), ("sdpo", {"distill_mode": "full", "alpha": 0.0, "use_old_logp": True}),
    ("sdpo", {"distill_mode": "topk", "topk": 6, "alpha": 1.0}), ("sdpo", {"distill_mode": "sampled_token", "alpha": 1.0}),
    ("sdpo", {"distill_mode": "full", "mask_ratio": 0.3}),
    ("hybrid", {"lam": 0.4, "distill_mode": "full"}), ("hybrid_adv", {"lam": 0.5}),
]


@pytest.mark.parametrize("name, fields", OBJECTIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OBJECTIVES)])
@pytest.mark.parametrize("chunk_size, temperature", [(5, 1.0), (8, 0.8)])
def test_fused_equals_plain_route(name, fields, chunk_size, temperature):
    case = _case(hash((name, chunk_size)) % 1000)
    objective = get_objective(name, **fields)
    ref_out, ref_grads = _run(case, objective, "reference", None, temperature)
    out, grads = _run(case, objective, "chunked", chunk_size, temperature)
    assert torch.allclose(out.loss, ref_out.loss, rtol=1e-5, atol=1e-6), (out.loss, ref_out.loss)
    assert out.metrics.keys() == ref_out.metrics.keys()
    for k in ref_out.metrics:
        a, b = out.metrics[k], ref_out.metrics[k]
        assert torch.allclose(a.sum.float(), b.sum.float(), rtol=1e-4, atol=1e-5), k
        assert torch.allclose(a.count.float(), b.count.float()), k
    for k in ref_grads:
        rel = ((grads[k] - ref_grads[k]).norm() / ref_grads[k].norm().clamp_min(1e-12)).item()
        assert rel < 1e-4, (k, rel)


@register_objective("_test_all_stats")
class AllStats(Objective):
    """A user objective that uses logp, entropy and divergence non-linearly."""

    alpha: float = 0.3
    separable = "token"

    def signals(self):
        return frozenset({Signal.ADVANTAGES, Signal.TEACHER, Signal.ENTROPY})

    def core_options(self):
        return CoreOptions(need_entropy=True, need_divergence=True, alpha=self.alpha)

    def loss(self, stats, batch):
        adv = batch.token_advantages()
        per_token = -adv * stats.logp.exp() + 0.1 * stats.entropy ** 2 + torch.sqrt(stats.divergence + 1e-3)
        per_token = torch.where(batch.token_mask, per_token, 0.0)
        return LossOutput(per_token.sum() / batch.global_tokens, {"div": Metric.of(stats.divergence, batch.token_mask)})


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_user_objective_through_fused_core(alpha, dtype):
    case = _case(7 + int(alpha * 10), dtype)
    objective = AllStats(alpha=alpha)
    ref_out, ref_grads = _run(case, objective, "reference", None, 1.0)
    out, grads = _run(case, objective, "chunked", 6, 1.0)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert abs(out.loss.item() - ref_out.loss.item()) <= tol * max(1.0, abs(ref_out.loss.item()))
    for k in ref_grads:
        rel = ((grads[k].float() - ref_grads[k].float()).norm() / ref_grads[k].float().norm()).item()
        assert rel < (1e-4 if dtype == torch.float32 else 5e-2), (k, rel)


def test_sequence_chunks_end_on_sequence_boundaries():
    case = _case(0)
    bounds = chunk_bounds(case["batch"], N, 8, "sequence")
    starts = set(torch.nonzero(torch.diff(case["batch"].seq_ids)).flatten().add(1).tolist()) | {0}
    assert bounds[0][0] == 0 and bounds[-1][1] == N
    assert all(a in starts for a, _ in bounds)
    assert all(b1 == a2 for (_, b1), (a2, _) in zip(bounds, bounds[1:]))
    assert any(b - a > 8 for a, b in bounds)  # the 12- and 15-token sequences get a chunk of their own
    with pytest.raises(ValueError, match="seq_ids non-decreasing"):
        chunk_bounds(PolicyBatch(seq_ids=torch.tensor([0, 1, 0]), num_seqs=2, global_tokens=3.0, global_seqs=2.0), 3, 2, "sequence")


def test_fused_needs_teacher_when_objective_distils():
    case = _case(1)
    with pytest.raises(ValueError, match="teacher_hidden is None"):
        fused_loss(case["hidden"], case["weight"], case["targets"], get_objective("sdpo"), case["batch"])


@dataclasses.dataclass
class _Tokens:
    """A batch that is not a ``PolicyBatch``: only what ``fused_loss`` needs (``TokenBatch``)."""

    seq_ids: torch.Tensor
    weight: torch.Tensor  # [N] per-token loss weight

    @property
    def num_tokens(self) -> int:
        return self.seq_ids.numel()

    def token_slice(self, start, stop):
        return _Tokens(self.seq_ids[start:stop], self.weight[start:stop])


class _WeightedNLL:
    """An objective that is not an ``Objective`` subclass: only the members of ``LossObjective``."""

    name = "weighted_nll"
    separable = "token"

    def core_options(self):
        return CoreOptions(need_entropy=True)

    def prepare(self, batch):
        return batch

    def loss(self, stats, batch):
        per_token = -batch.weight * stats.logp + 0.05 * stats.entropy
        return LossOutput(per_token.sum(), {"nll": Metric.of(-stats.logp, batch.weight > 0)})


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_duck_typed_objective_and_batch_match_materialised_logits(temperature):
    case = _case(11)
    g = torch.Generator().manual_seed(12)
    valid = case["targets"] != -100
    batch = _Tokens(case["batch"].seq_ids, torch.rand(N, generator=g) * valid)
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    out = fused_loss(hidden, weight, case["targets"], _WeightedNLL(), batch, temperature=temperature,
                     backend="chunked", chunk_size=6)
    out.loss.backward()
    # independent reference: full logits, log_softmax, entropy by definition
    h_ref, w_ref = case["hidden"].clone().requires_grad_(), case["weight"].clone().requires_grad_()
    logp_all = torch.log_softmax((h_ref @ w_ref.t()) / temperature, dim=-1)
    logp = logp_all.gather(1, case["targets"].clamp_min(0)[:, None]).squeeze(1) * valid
    entropy = -(logp_all.exp() * logp_all).sum(-1) * valid
    want = (-batch.weight * logp + 0.05 * entropy).sum()
    want.backward()
    assert torch.allclose(out.loss, want, rtol=1e-5, atol=1e-5), (out.loss, want)
    assert torch.allclose(hidden.grad, h_ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(weight.grad, w_ref.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out.metrics["nll"].sum, (-logp * (batch.weight > 0)).sum(), rtol=1e-5)


def test_core_options_must_be_the_kernels_type():
    case = _case(2)

    class DictOptions(_WeightedNLL):
        def core_options(self):
            return {"need_entropy": True}

    batch = _Tokens(case["batch"].seq_ids, torch.ones(N))
    with pytest.raises(TypeError, match="must return denser.kernels.CoreOptions"):
        fused_loss(case["hidden"], case["weight"], case["targets"], DictOptions(), batch)


def teardown_module(module):
    unregister_objective("_test_all_stats")
