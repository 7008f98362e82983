"""Per-chunk vocabulary sweeps in PyTorch: the math every chunked backend shares.

A *sweep* sees one chunk of logits ``[c, V]`` at a time. The forward sweep turns the student's
(and teacher's) logits into per-token scalars; the backward sweep turns per-token upstream
gradients into the gradient with respect to the chunk's raw logits. The Triton backend
implements the same two functions (``denser.kernels.triton_ops``) with the same signatures, so
the chunk drivers in ``chunked.py`` and ``fused.py`` serve both.

Notation (DESIGN.md): z = logits / T, p = softmax(z), lse = logsumexp(z), g the upstream grads.

    d logp / dz  = onehot(y) - p_s
    d H    / dz  = -p_s (log p_s + H)
    d D    / dz  = p_s - p_t                            alpha = 0 (forward KL)
                 = p_s (log p_s - log p_t - D)          alpha = 1 (reverse KL)
                 = p_s (g - aux), g = (1-a) log(p_s/m)  0 < alpha < 1, aux = sum p_s g
    d lse  / dz  = p_s                                  (used by the top-k divergence)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from denser.kernels.options import CoreOptions


@dataclass
class SweepOut:
    """Per-token results of a forward sweep, all ``[c]`` fp32 (None when not computed)."""

    logp: Tensor
    lse_s: Tensor
    entropy: Tensor | None = None
    lse_t: Tensor | None = None
    divergence: Tensor | None = None
    aux: Tensor | None = None  # sum_u p_s,u g_u of the divergence gradient (alpha in (0, 1]); D itself at alpha = 1


def _scaled(z: Tensor, temperature: float) -> Tensor:
    z = z.float()
    return z / temperature if temperature != 1.0 else z


def forward_sweep(z_s: Tensor, z_t: Tensor | None, targets: Tensor, opts: CoreOptions, full_divergence: bool) -> SweepOut:
    """Statistics of one chunk. ``z_s``/``z_t``: raw logits ``[c, V]``; ``z_t`` may be None.

    ``full_divergence``: compute the full-vocabulary D_alpha (False for top-k, where the driver
    computes the divergence on the support from ``lse_s`` and ``lse_t``).
    """
    valid = targets != opts.ignore_index
    safe_y = torch.where(valid, targets, torch.zeros_like(targets)).long()
    zs = _scaled(z_s, opts.temperature)
    lse_s = torch.logsumexp(zs, dim=-1)
    logp = torch.where(valid, zs.gather(1, safe_y[:, None]).squeeze(1) - lse_s, 0.0)
    out = SweepOut(logp=logp, lse_s=lse_s)
    if not opts.need_entropy and z_t is None:
        return out

    # log p_s; in place only when zs is already a copy (the drivers reuse z_s after the sweep)
    logps = zs.sub_(lse_s[:, None]) if zs.data_ptr() != z_s.data_ptr() else zs - lse_s[:, None]
    ps = logps.exp()
    if opts.need_entropy:
        out.entropy = torch.where(valid, -(ps * logps).sum(-1), 0.0)
    if z_t is None:
        return out
    zt = _scaled(z_t, opts.temperature)
    out.lse_t = torch.logsumexp(zt, dim=-1)
    if not full_divergence:
        return out
    logpt = zt.sub_(out.lse_t[:, None]) if zt.data_ptr() != z_t.data_ptr() else zt - out.lse_t[:, None]
    a = opts.alpha
    if a == 0.0:
        div = (logpt.exp() * (logpt - logps)).sum(-1)
    elif a == 1.0:
        div = (ps * (logps - logpt)).sum(-1)
        out.aux = div
    else:
        log_m = torch.logaddexp(logps + math.log1p(-a), logpt + math.log(a))
        kl_sm = (ps * (logps - log_m)).sum(-1)
        kl_tm = (logpt.exp() * (logpt - log_m)).sum(-1)
        div = (1.0 - a) * kl_sm + a * kl_tm
        out.aux = (1.0 - a) * kl_sm
    out.divergence = torch.where(valid, div, 0.0)
    return out


def backward_sweep(
    z_s: Tensor,
    z_t: Tensor | None,
    targets: Tensor,
    saved: SweepOut,
    g_logp: Tensor | None,
    g_ent: Tensor | None,
    g_div: Tensor | None,
    g_lse: Tensor | None,
    opts: CoreOptions,
) -> Tensor:
    """d loss / d raw logits ``[c, V]`` fp32 of one chunk, from per-token upstream gradients.

    ``g_div`` is the gradient of the *full-vocabulary* divergence; ``g_lse`` an extra coefficient
    on d lse_s / dz = p_s (the top-k divergence's dependence on the normaliser). ``saved`` holds
    ``lse_s`` (and ``entropy``, ``lse_t``, ``divergence``, ``aux`` where used). The result may
    reuse ``z_s``'s storage when ``z_s`` is fp32.
    """
    valid = targets != opts.ignore_index
    vf = valid.float()
    zeros = torch.zeros_like(saved.lse_s)
    g_logp = zeros if g_logp is None else g_logp.float() * vf
    coef = -g_logp  # coefficient of p_s
    if g_lse is not None:
        coef = coef + g_lse.float() * vf

    logps = _scaled(z_s, opts.temperature).sub_(saved.lse_s[:, None])  # reuses z_s storage when fp32 and T=1
    ps = logps.exp()
    # dz = p_s * (coef + g_ent*(-(log p_s + H)) + g_div*(divergence term)) + g_logp * onehot(y)
    inner = coef[:, None].expand_as(ps).clone() if (g_ent is None and g_div is None) else None
    if inner is None:
        inner = torch.zeros_like(ps).add_(coef[:, None])
        if g_ent is not None:
            ge = g_ent.float() * vf
            inner.addcmul_(logps + saved.entropy[:, None], ge[:, None], value=-1.0)
        if g_div is not None and z_t is not None:
            gd = g_div.float() * vf
            a = opts.alpha
            logpt = _scaled(z_t, opts.temperature).sub_(saved.lse_t[:, None])
            if a == 0.0:
                # p_s - p_t = p_s * 1 - p_t: the p_t part is added after the product below
                inner.add_(gd[:, None])
            elif a == 1.0:
                inner.addcmul_(logps - logpt - saved.aux[:, None], gd[:, None])
            else:
                log_m = torch.logaddexp(logps + math.log1p(-a), logpt + math.log(a))
                g = (logps - log_m).mul_(1.0 - a).sub_(saved.aux[:, None])
                inner.addcmul_(g, gd[:, None])
    dz = inner.mul_(ps)
    if g_div is not None and z_t is not None and opts.alpha == 0.0:
        dz.sub_(logpt.exp_().mul_((g_div.float() * vf)[:, None]))
    safe_y = torch.where(valid, targets, torch.zeros_like(targets)).long()
    dz.scatter_add_(1, safe_y[:, None], g_logp[:, None])
    if opts.temperature != 1.0:
        dz.div_(opts.temperature)
    return dz
