"""Backend ``chunked``: tokens in chunks, logits recomputed in backward, any device.

Forward walks the tokens chunk by chunk: one ``[c, V]`` logits tile per model, a vocabulary
sweep, per-token scalars kept. Backward recomputes each chunk's logits, turns the upstream
per-token gradients into d logits with the backward sweep, and accumulates dH, dW (fp32) and
dbias. Peak memory is O(chunk x V), independent of N.

The per-chunk vocabulary math (a forward and a backward sweep over one ``[c, V]`` logits tile)
lives in ``chunk_math.py`` (PyTorch) or ``triton_chunk_math.py`` (Triton, backend
``triton_chunked``); the driver here serves both (its ``sweep_impl`` argument).
"""

from __future__ import annotations

import torch
from torch import Tensor

from denser.kernels import chunk_math, reference
from denser.kernels.chunk_math import SweepOut
from denser.kernels.options import CoreOptions
from denser.kernels.stats import TokenStats

# Bytes of one fp32 [chunk, V] logits tile the default chunk size aims for.
DEFAULT_TILE_BYTES = {"cpu": 12 << 20, "cuda": 256 << 20}


def default_chunk_size(vocab: int, device: torch.device) -> int:
    budget = DEFAULT_TILE_BYTES.get(device.type, 64 << 20)
    return int(max(16, min(8192, budget // (4 * vocab))))


def chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, ws: dict | None = None, name: str = "z_s") -> Tensor:
    """Raw logits of one chunk in fp32 (matmul in the input dtype, fp32 accumulation on GPU).

    With a workspace ``ws`` fp32 logits are written into a buffer reused across chunks: a fresh
    ``[c, V]`` allocation per chunk costs page faults that dominate the CPU sweeps.
    """
    if ws is not None and h.dtype == torch.float32:
        buf = ws.get(name)
        rows, vocab = h.shape[0], weight.shape[0]
        if buf is None or buf.shape[0] < rows or buf.shape[1] != vocab or buf.device != h.device:
            buf = ws[name] = torch.empty(rows, vocab, device=h.device, dtype=torch.float32)
        out = buf[:rows]
        if bias is None:
            return torch.mm(h, weight.t(), out=out)
        return torch.addmm(bias, h, weight.t(), out=out)
    z = h @ weight.t()
    if bias is not None:
        z = z + bias
    return z.float()



# ----------------------------------------------------------------------------------------- top-k


def topk_divergence(z_s: Tensor, z_t: Tensor, out, opts: CoreOptions, requires_grad: bool):
    """D_alpha on the student's top-k support, from the chunk's raw logits and the sweep's lse.

    Returns ``(div [c], support [c, k], zsk leaf, lse leaf)``. With ``requires_grad`` the leaves
    (scaled logits at the support and lse_s) carry a graph so the caller can get
    d D / d zsk (scattered into d logits) and d D / d lse_s (a coefficient on p_s).
    """
    support = z_s.topk(opts.topk, dim=-1).indices
    zsk = (z_s.gather(1, support).float() / opts.temperature).detach().requires_grad_(requires_grad)
    lse = out.lse_s.detach().clone().requires_grad_(requires_grad)
    lpt = z_t.gather(1, support).float() / opts.temperature - out.lse_t[:, None]
    with torch.enable_grad() if requires_grad else torch.no_grad():
        ls, lt = reference.restrict_to_support(zsk - lse[:, None], lpt, opts.add_tail)
        div = reference.divergence_from_logprobs(ls, lt, opts.alpha)  # masking applied by the caller
    return div, support, zsk, lse


def topk_grads(z_s, z_t, targets, out, g_div, opts):
    """(d zsk scattered later, d lse) for one chunk in backward: re-run the support math with autograd."""
    div, support, zsk, lse = topk_divergence(z_s, z_t, out, opts, requires_grad=True)
    valid = (targets != opts.ignore_index).float()
    d_zsk, d_lse = torch.autograd.grad(div, (zsk, lse), g_div.float() * valid)
    return support, d_zsk, d_lse


# ------------------------------------------------------------------------------------ autograd fn


class _ChunkedStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, t_hidden, t_weight, t_bias, opts: CoreOptions, chunk: int, sweep_impl):
        n = hidden.shape[0]
        f32 = dict(device=hidden.device, dtype=torch.float32)
        logp = torch.empty(n, **f32)
        lse_s = torch.empty(n, **f32)
        entropy = torch.empty(n, **f32) if opts.need_entropy else None
        teacher = t_hidden is not None
        lse_t = torch.empty(n, **f32) if teacher else None
        div = torch.empty(n, **f32) if teacher else None
        aux = torch.empty(n, **f32) if teacher and opts.topk is None and opts.alpha > 0 else None
        ws: dict = {}  # [c, V] buffers reused across chunks
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            z_s = chunk_logits(hidden[a:b], weight, bias, ws, "z_s")
            z_t = chunk_logits(t_hidden[a:b], t_weight, t_bias, ws, "z_t") if teacher else None
            out = sweep_impl.forward_sweep(z_s, z_t, targets[a:b], opts, full_divergence=teacher and opts.topk is None, ws=ws)
            logp[a:b], lse_s[a:b] = out.logp, out.lse_s
            if entropy is not None:
                entropy[a:b] = out.entropy
            if teacher:
                lse_t[a:b] = out.lse_t
                if opts.topk is None:
                    div[a:b] = out.divergence
                    if aux is not None:
                        aux[a:b] = out.aux
                else:
                    d, *_ = topk_divergence(z_s, z_t, out, opts, requires_grad=False)
                    div[a:b] = torch.where(targets[a:b] != opts.ignore_index, d, 0.0)
            del z_s, z_t, out
        ctx.save_for_backward(hidden, weight, bias, targets, t_hidden, t_weight, t_bias, lse_s, entropy, lse_t, div, aux)
        ctx.opts, ctx.chunk, ctx.sweep_impl = opts, chunk, sweep_impl
        outs = (logp, entropy if entropy is not None else logp.new_empty(0), div if div is not None else logp.new_empty(0))
        return outs

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_div):
        hidden, weight, bias, targets, t_hidden, t_weight, t_bias, lse_s, entropy, lse_t, div, aux = ctx.saved_tensors
        opts, chunk, sweep_impl = ctx.opts, ctx.chunk, ctx.sweep_impl
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        g_ent = g_ent if entropy is not None else None
        g_div = g_div if div is not None else None
        d_hidden = torch.empty_like(hidden) if need_h else None
        d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        d_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if (need_b and bias is not None) else None
        ws: dict = {}
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            sl = slice(a, b)
            saved = SweepOut(
                logp=lse_s[sl], lse_s=lse_s[sl],
                entropy=None if entropy is None else entropy[sl],
                lse_t=None if lse_t is None else lse_t[sl],
                divergence=None if div is None else div[sl],
                aux=None if aux is None else aux[sl],
            )
            z_s = chunk_logits(hidden[sl], weight, bias, ws, "z_s")
            with torch.no_grad():
                z_t = chunk_logits(t_hidden[sl], t_weight, t_bias, ws, "z_t") if (t_hidden is not None and g_div is not None) else None
            g_lse = support = d_zsk = None
            g_div_full = None
            if g_div is not None and opts.topk is not None:
                support, d_zsk, g_lse = topk_grads(z_s, z_t, targets[sl], saved, g_div[sl], opts)
            elif g_div is not None:
                g_div_full = g_div[sl]
            dz = sweep_impl.backward_sweep(
                z_s, z_t if g_div_full is not None else None, targets[sl], saved,
                g_logp[sl], None if g_ent is None else g_ent[sl], g_div_full, g_lse, opts, ws=ws,
            )
            if support is not None:
                dz.scatter_add_(1, support, d_zsk / opts.temperature)
            del z_s, z_t
            if need_h:
                d_hidden[sl] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                d_weight.addmm_(dz.t(), hidden[sl].float())
            if d_bias is not None:
                d_bias += dz.sum(0)
            del dz
        d_weight = None if d_weight is None else d_weight.to(weight.dtype)
        d_bias = None if d_bias is None else d_bias.to(bias.dtype)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None, None


def token_stats(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, opts: CoreOptions,
                chunk_size=None, sweep_impl=chunk_math) -> TokenStats:
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    logp, entropy, div = _ChunkedStats.apply(
        hidden, weight, bias, targets, teacher_hidden, teacher_weight, teacher_bias, opts, chunk, sweep_impl
    )
    return TokenStats(
        logp=logp,
        entropy=entropy if opts.need_entropy else None,
        divergence=div if teacher_hidden is not None else None,
    )
