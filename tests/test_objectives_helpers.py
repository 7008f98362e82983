"""Shared builders for the objective tests (no tests here): tiny packed batches and the core call."""

from __future__ import annotations

import torch

from denser.kernels import token_stats
from denser.objectives import PolicyBatch

H, V = 6, 11


def make_case(gen: torch.Generator, lens=(3, 5, 1, 4), *, teacher_mask=None, masked=(2,), old_spread=0.3,
              per_token_adv=False, step=0, total_steps=1, micro_batch=0):
    """A packed micro-batch of ``len(lens)`` completions with random hidden states and signals.

    ``masked``: token positions excluded from the loss. ``old_spread``: std of logp - old_logp, so
    ratios fall on both sides of the clip range.
    """
    n, s = sum(lens), len(lens)
    seq_ids = torch.repeat_interleave(torch.arange(s), torch.tensor(lens))
    token_mask = torch.ones(n, dtype=torch.bool)
    for i in masked:
        token_mask[i] = False
    hidden = torch.randn(n, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.7
    teacher_hidden = hidden + 0.8 * torch.randn(n, H, generator=gen)
    targets = torch.randint(0, V, (n,), generator=gen)
    with torch.no_grad():
        logp0 = token_stats(hidden, weight, targets, backend="reference").logp
        teacher_logp = token_stats(teacher_hidden, weight, targets, backend="reference").logp
    old_logp = logp0 + old_spread * torch.randn(n, generator=gen)
    ref_logp = logp0 + 0.5 * torch.randn(n, generator=gen)
    advantages = torch.randn(n if per_token_adv else s, generator=gen)
    if teacher_mask is None:
        teacher_mask = torch.tensor([i % 3 != 1 for i in range(s)])
    batch = PolicyBatch(
        seq_ids=seq_ids, num_seqs=s, global_tokens=float(token_mask.sum()) + 3.0, global_seqs=s + 1.0,
        token_mask=token_mask, rewards=torch.randn(s, generator=gen), advantages=advantages,
        old_logp=old_logp, ref_logp=ref_logp, teacher_mask=teacher_mask, norm_length=7.0,
        step=step, total_steps=total_steps, micro_batch=micro_batch,
        extras={"teacher_logp": teacher_logp},
    )
    return {"hidden": hidden, "weight": weight, "teacher_hidden": teacher_hidden, "targets": targets, "batch": batch}


def stats_for(objective, case, hidden=None, backend="reference"):
    """``token_stats`` with the options the objective asks for."""
    opts = objective.core_options()
    need_div = opts.need_divergence
    return token_stats(
        case["hidden"] if hidden is None else hidden, case["weight"], case["targets"],
        teacher_hidden=case["teacher_hidden"] if need_div else None,
        alpha=opts.alpha, topk=opts.topk if need_div else None,
        add_tail=opts.add_tail, need_entropy=opts.need_entropy, backend=backend,
    )


def loss_and_grad(objective, case, batch=None):
    """(LossOutput, d loss / d hidden) through the reference core, after ``prepare``."""
    hidden = case["hidden"].clone().requires_grad_()
    batch = objective.prepare(case["batch"] if batch is None else batch)
    out = objective.loss(stats_for(objective, case, hidden), batch)
    (grad,) = torch.autograd.grad(out.loss, hidden, allow_unused=True)
    return out, (torch.zeros_like(hidden) if grad is None else grad)
