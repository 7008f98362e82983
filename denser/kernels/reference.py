"""Backend ``reference``: materialised fp32 logits and plain autograd. The ground truth.

Every other backend is tested against this file. It holds ``[N, V]`` logits (several times, with
autograd), so it is only for tests and small shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from denser.kernels.options import TAIL_FLOOR_LOG, CoreOptions
from denser.kernels.stats import TokenStats


def plogp_ratio(logp: Tensor, logq: Tensor) -> Tensor:
    """Elementwise p * (log p - log q), with 0 where p = 0 (log p = -inf), NaN-free gradients."""
    zero = torch.isneginf(logp)
    safe_p = torch.where(zero, torch.zeros_like(logp), logp)
    safe_q = torch.where(zero, torch.zeros_like(logq), logq)
    return torch.where(zero, torch.zeros_like(logp), safe_p.exp() * (safe_p - safe_q))


def divergence_from_logprobs(logp_s: Tensor, logp_t: Tensor, alpha: float) -> Tensor:
    """D_alpha(p_t, p_s) over the last dim of normalised log-probs (the SDPO/TRL/GKD convention).

    alpha = 0: KL(p_t || p_s); alpha = 1: KL(p_s || p_t);
    0 < alpha < 1: (1 - alpha) KL(p_s || m) + alpha KL(p_t || m), m = (1 - alpha) p_s + alpha p_t.
    """
    if alpha == 0.0:
        return plogp_ratio(logp_t, logp_s).sum(-1)
    if alpha == 1.0:
        return plogp_ratio(logp_s, logp_t).sum(-1)
    log_m = torch.logaddexp(logp_s + math.log1p(-alpha), logp_t + math.log(alpha))
    return (1.0 - alpha) * plogp_ratio(logp_s, log_m).sum(-1) + alpha * plogp_ratio(logp_t, log_m).sum(-1)


def restrict_to_support(logp_s_k: Tensor, logp_t_k: Tensor, add_tail: bool) -> tuple[Tensor, Tensor]:
    """Turn full-vocabulary log-probs gathered at a top-k support ``[.., k]`` into two
    distributions over the support: with a tail bucket log(1 - sum p) appended (``[.., k+1]``),
    or renormalised over the support (``[.., k]``)."""
    if add_tail:
        def with_tail(lp: Tensor) -> Tensor:
            mass = torch.logsumexp(lp, dim=-1, keepdim=True).clamp(max=TAIL_FLOOR_LOG)
            return torch.cat([lp, torch.log(-torch.expm1(mass))], dim=-1)

        return with_tail(logp_s_k), with_tail(logp_t_k)
    return (
        logp_s_k - torch.logsumexp(logp_s_k, dim=-1, keepdim=True),
        logp_t_k - torch.logsumexp(logp_t_k, dim=-1, keepdim=True),
    )


def stats_from_logits(logits: Tensor, targets: Tensor, teacher_logits: Tensor | None, opts: CoreOptions) -> TokenStats:
    """Per-token statistics from materialised logits (any dtype; computed in fp32)."""
    z_s = logits.float() / opts.temperature
    logp_all = F.log_softmax(z_s, dim=-1)
    valid = targets != opts.ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    zero = torch.zeros((), device=z_s.device)
    logp = torch.where(valid, logp_all.gather(-1, safe_targets[:, None]).squeeze(-1), zero)

    entropy = None
    if opts.need_entropy:
        entropy = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), zero)

    divergence = None
    if teacher_logits is not None:
        logp_t_all = F.log_softmax(teacher_logits.detach().float() / opts.temperature, dim=-1)
        if opts.topk is None:
            div = divergence_from_logprobs(logp_all, logp_t_all, opts.alpha)
        else:
            support = z_s.detach().topk(opts.topk, dim=-1).indices
            ls, lt = restrict_to_support(logp_all.gather(-1, support), logp_t_all.gather(-1, support), opts.add_tail)
            div = divergence_from_logprobs(ls, lt, opts.alpha)
        divergence = torch.where(valid, div, zero)
    return TokenStats(logp=logp, entropy=entropy, divergence=divergence)


def linear_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    out = hidden.float() @ weight.float().t()
    return out if bias is None else out + bias.float()


def token_stats(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, opts: CoreOptions, chunk_size=None) -> TokenStats:
    teacher_logits = None
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher_logits = linear_logits(teacher_hidden, teacher_weight, teacher_bias)
    return stats_from_logits(linear_logits(hidden, weight, bias), targets, teacher_logits, opts)
