"""The per-chunk vocabulary math of the chunked backends, in PyTorch (backend ``chunked``).

A *sweep* sees one chunk of logits ``[c, V]`` at a time. The forward sweep turns the student's
(and teacher's) logits into per-token scalars; the backward sweep turns per-token upstream
gradients into the gradient with respect to the chunk's raw logits. ``triton_chunk_math.py``
implements the same two functions in Triton (backend ``triton_chunked``) with the same
signatures, so the chunk drivers in ``chunked.py`` and ``fused.py`` serve both.

Notation (docs/design.md): z = logits / T, p = softmax(z), lse = logsumexp(z), g the upstream grads.

    d logp / dz  = onehot(y) - p_s
    d H    / dz  = -p_s (log p_s + H)
    d D    / dz  = p_s - p_t                            alpha = 0 (forward KL)
                 = p_s (log p_s - log p_t - D)          alpha = 1 (reverse KL)
                 = p_s (g - aux), g = (1-a) log(p_s/m)  0 < alpha < 1, aux = sum p_s g
    d lse  / dz  = p_s                                  (used by the top-k divergence)

so every gradient is ``p_s * (k1 * log p_s + k2 * X + c0) + g_logp * onehot(y)`` with per-row
scalars k1, k2, c0 and X = log p_t (alpha = 1) or log m (0 < alpha < 1), minus ``g_div * p_t``
at alpha = 0. The generalised JSD uses D = (1-a) sum p_s log p_s + a sum p_t log p_t - sum m log m.

On CPU the cost of these sweeps is memory traffic and page faults, not arithmetic: every
``[c, V]`` temporary lives in a reusable workspace and the ops run in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from denser.kernels.options import CoreOptions

TINY = torch.finfo(torch.float32).tiny


@dataclass
class SweepOut:
    """Per-token results of a forward sweep, all ``[c]`` fp32 (None when not computed)."""

    logp: Tensor
    lse_s: Tensor
    entropy: Tensor | None = None
    lse_t: Tensor | None = None
    divergence: Tensor | None = None
    aux: Tensor | None = None  # alpha = 1: D; 0 < alpha < 1: (1-a) sum p_s log(p_s / m)
    cache: dict | None = None  # [c, V] tiles of the forward (log p_s, p_s, ...) for a backward on the same chunk


def _buf(ws: dict | None, name: str, like: Tensor) -> Tensor:
    """A ``like``-shaped fp32 scratch tensor, reused across chunks (the last chunk is shorter)."""
    if ws is None:
        return torch.empty(like.shape, device=like.device, dtype=torch.float32)
    t = ws.get(name)
    if t is None or t.shape[0] < like.shape[0] or t.shape[1:] != like.shape[1:] or t.device != like.device:
        t = ws[name] = torch.empty(like.shape, device=like.device, dtype=torch.float32)
    return t[: like.shape[0]]


def _log_softmax(z: Tensor, out: Tensor) -> tuple[Tensor, Tensor]:
    """log-softmax into ``out`` and the row lse (one fused ATen pass instead of logsumexp's four)."""
    torch.ops.aten._log_softmax.out(z, -1, False, out=out)
    return out, z[:, 0] - out[:, 0]


def _rowdot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    return torch.mul(a, b, out=scratch).sum(-1)


def _scaled_copy(z: Tensor, temperature: float, out: Tensor) -> Tensor:
    if temperature == 1.0 and z.dtype == torch.float32:
        return z
    return torch.mul(z, 1.0 / temperature, out=out)


def forward_sweep(z_s: Tensor, z_t: Tensor | None, targets: Tensor, opts: CoreOptions, full_divergence: bool,
                  ws: dict | None = None, keep: bool = False) -> SweepOut:
    """Statistics of one chunk. ``z_s``/``z_t``: raw logits ``[c, V]`` (left untouched).

    ``full_divergence``: compute the full-vocabulary D_alpha (False for top-k, where the driver
    computes the divergence on the support from ``lse_s`` and ``lse_t``).
    ``keep``: leave the tiles the backward needs in ``out.cache`` (``fused_loss`` runs the backward
    sweep on the same chunk right after, so nothing is recomputed).
    """
    cache: dict[str, Tensor] = {}
    out = _forward(z_s, z_t, targets, opts, full_divergence, ws, cache)
    if keep:
        out.cache = cache
    return out


def _forward(z_s, z_t, targets, opts: CoreOptions, full_divergence: bool, ws, cache: dict) -> SweepOut:
    valid = targets != opts.ignore_index
    safe_y = torch.where(valid, targets, torch.zeros_like(targets)).long()
    zs = _scaled_copy(z_s, opts.temperature, _buf(ws, "zs", z_s))
    logps, lse_s = _log_softmax(zs, _buf(ws, "logps", z_s))
    cache["logps"] = logps
    logp = torch.where(valid, logps.gather(1, safe_y[:, None]).squeeze(1), 0.0)
    out = SweepOut(logp=logp, lse_s=lse_s)
    need_div = z_t is not None and full_divergence
    if not opts.need_entropy and not need_div:
        if z_t is not None:
            out.lse_t = torch.logsumexp(_scaled_copy(z_t, opts.temperature, _buf(ws, "zt", z_t)), dim=-1)
        return out

    scratch = _buf(ws, "scratch", z_s)
    ps = cache["ps"] = torch.exp(logps, out=_buf(ws, "ps", z_s))
    s_plogp = _rowdot(ps, logps, scratch)  # sum p_s log p_s = -H
    if opts.need_entropy:
        out.entropy = torch.where(valid, -s_plogp, 0.0)
    if z_t is None:
        return out
    zt = _scaled_copy(z_t, opts.temperature, _buf(ws, "zt", z_t))
    if not need_div:
        out.lse_t = torch.logsumexp(zt, dim=-1)
        return out
    logpt, out.lse_t = _log_softmax(zt, _buf(ws, "logpt", z_t))
    cache["logpt"] = logpt
    a = opts.alpha
    if a == 1.0:
        div = s_plogp - _rowdot(ps, logpt, scratch)
        out.aux = div
    else:
        pt = cache["pt"] = torch.exp(logpt, out=_buf(ws, "pt", z_t))
        t_plogp = _rowdot(pt, logpt, scratch)
        if a == 0.0:
            div = t_plogp - _rowdot(pt, logps, scratch)
        else:
            m = torch.lerp(ps, pt, a, out=_buf(ws, "m", z_t))
            # m underflows to 0 where both p_s and p_t do (peaked logits): clamp so 0 * log m stays 0
            log_m = cache["log_m"] = torch.log(m.clamp_min_(TINY), out=scratch)
            s_plogm = _rowdot(ps, log_m, cache.pop("pt"))  # p_t's buffer is scratch from here
            m_logm = m.mul_(log_m).sum(-1)
            div = (1.0 - a) * s_plogp + a * t_plogp - m_logm
            out.aux = (1.0 - a) * (s_plogp - s_plogm)
    out.divergence = torch.where(valid, div, 0.0)
    return out


def _teacher_logprobs(z_t: Tensor, saved: SweepOut, opts: CoreOptions) -> Tensor:
    zt = z_t if z_t.dtype == torch.float32 else z_t.float()
    if opts.temperature != 1.0:
        zt.mul_(1.0 / opts.temperature)
    return zt.sub_(saved.lse_t[:, None])


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
    ws: dict | None = None,
) -> Tensor:
    """d loss / d raw logits ``[c, V]`` fp32 of one chunk, from per-token upstream gradients.

    ``g_div`` is the gradient of the *full-vocabulary* divergence; ``g_lse`` an extra coefficient
    on d lse_s / dz = p_s (the top-k divergence's dependence on the normaliser). ``saved`` holds
    ``lse_s`` (and ``entropy``, ``lse_t``, ``aux`` where used). Consumes ``z_s`` and ``z_t``: the
    result is written into ``z_s``'s storage when it is fp32.
    """
    valid = (targets != opts.ignore_index).float()
    zero = torch.zeros_like(saved.lse_s)
    g_logp = zero if g_logp is None else g_logp.float() * valid
    ge = None if g_ent is None else g_ent.float() * valid
    gd = None if (g_div is None or z_t is None) else g_div.float() * valid
    c0 = -g_logp  # per-row constant inside p_s * (...)
    if g_lse is not None:
        c0 = c0 + g_lse.float() * valid

    cache = saved.cache or {}
    logps = cache.get("logps")
    if logps is None:  # recompute log p_s from the chunk's logits, in their storage
        zs = z_s if z_s.dtype == torch.float32 else z_s.float()
        if opts.temperature != 1.0:
            zs.mul_(1.0 / opts.temperature)
        logps = zs.sub_(saved.lse_s[:, None])
    ps = cache.get("ps")
    if ps is None:
        ps = torch.exp(logps, out=_buf(ws, "ps", logps))
    if ge is None and gd is None:
        dz = ps.mul_(c0[:, None])
    else:
        a = opts.alpha
        k1 = torch.zeros_like(c0)  # coefficient of log p_s
        if ge is not None:
            k1 = k1 - ge
            c0 = c0 - ge * saved.entropy
        teacher_term = None  # X of the docstring, or p_t at alpha = 0
        if gd is not None:
            if a == 0.0:
                c0 = c0 + gd
                teacher_term = cache.get("pt")
                if teacher_term is None:
                    teacher_term = _teacher_logprobs(z_t, saved, opts).exp_()
            else:
                k1 = k1 + (gd if a == 1.0 else (1.0 - a) * gd)
                c0 = c0 - gd * saved.aux
                teacher_term = cache.get("logpt" if a == 1.0 else "log_m")
                if teacher_term is None:
                    teacher_term = _teacher_logprobs(z_t, saved, opts)
                    if a != 1.0:  # log m = log((1-a) p_s + a p_t)
                        teacher_term = torch.lerp(ps, teacher_term.exp_(), a, out=teacher_term).clamp_min_(TINY).log_()
        inner = logps.mul_(k1[:, None])  # in place: log p_s is not needed after this
        if gd is not None and a != 0.0:
            inner.addcmul_(teacher_term, (gd if a == 1.0 else (1.0 - a) * gd)[:, None], value=-1.0)
        dz = inner.add_(c0[:, None]).mul_(ps)
        if gd is not None and a == 0.0:
            dz.addcmul_(teacher_term, gd[:, None], value=-1.0)
    safe_y = torch.where(valid.bool(), targets, torch.zeros_like(targets)).long()
    dz.scatter_add_(1, safe_y[:, None], g_logp[:, None])
    if opts.temperature != 1.0:
        dz.div_(opts.temperature)
    return dz
