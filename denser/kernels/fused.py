"""``fused_loss``: a separable objective evaluated chunk by chunk, gradients computed in forward.

docs/design.md, Contract 1b. ``token_stats`` must recompute logits in backward because it does not
know the loss yet (six matmuls). When the loss is a sum of per-token (or per-sequence) terms
with normalisers fixed in the batch, the core can instead, for each chunk while its logits are
in memory:

    logits -> sweep -> stats -> objective.loss(chunk stats, chunk batch)
           -> autograd on the chunk's [c] scalars gives d loss / d stats
           -> backward sweep: d logits in place -> dH (chunk rows) and dW, dbias accumulate

Four matmuls in all (student and teacher logits, dH, dW). The returned loss's backward only
scales the stored gradients by the incoming scalar.
"""

from __future__ import annotations

import torch

from denser.kernels import chunk_math
from denser.kernels.chunked import chunk_logits, default_chunk_size, topk_divergence
from denser.kernels.options import CoreOptions
from denser.kernels.protocols import LossObjective, TokenBatch
from denser.kernels.stats import LossOutput, TokenStats, merge_metrics


def chunk_bounds(batch: TokenBatch, n: int, chunk: int, separable: str) -> list[tuple[int, int]]:
    """Token ranges of at most ``chunk`` tokens; for sequence-separable objectives every range
    ends on a sequence boundary (a sequence longer than ``chunk`` gets a range of its own)."""
    if separable == "token":
        return [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    seq_ids = batch.seq_ids
    if n > 1 and bool((seq_ids[1:] < seq_ids[:-1]).any()):
        raise ValueError(
            "a sequence-separable objective needs packed tokens with each sequence contiguous and "
            "seq_ids non-decreasing; sort the packed batch by sequence"
        )
    # starts of sequences
    change = torch.nonzero(seq_ids[1:] != seq_ids[:-1]).flatten().add_(1).tolist()
    starts = [0] + change
    ends = change + [n]
    bounds, a = [], 0
    for s, e in zip(starts, ends):
        if e - a > chunk and s > a:
            bounds.append((a, s))
            a = s
    if a < n:
        bounds.append((a, n))
    return bounds


class _ApplyPrecomputedGrads(torch.autograd.Function):
    """A scalar whose backward returns stored gradients scaled by the incoming gradient."""

    @staticmethod
    def forward(ctx, value, grads, *inputs):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        out = [None if gr is None else gr * g.to(gr.dtype) for gr in ctx.grads]
        ctx.grads = None
        return (None, None, *out)


def fused_loss(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, objective: LossObjective,
               batch: TokenBatch, opts: CoreOptions, backend: str, chunk_size: int | None) -> LossOutput:
    """Backend ``chunked`` or ``triton_chunked``: the per-chunk vocabulary math in PyTorch or Triton."""
    if backend == "chunked":
        sweep_impl = chunk_math
    elif backend == "triton_chunked":
        # lazy: triton is optional and slow to import (JIT setup)
        from denser.kernels import triton_chunk_math

        sweep_impl = triton_chunk_math
    else:
        raise ValueError(f"backend={backend!r} has no chunk logits to take gradients in forward from; "
                         "use 'chunked' or 'triton_chunked'")
    n = hidden.shape[0]
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device)
    need_h, need_w = hidden.requires_grad, weight.requires_grad
    need_b = bias is not None and bias.requires_grad
    d_hidden = torch.zeros_like(hidden) if need_h else None
    d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
    d_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_b else None
    teacher = opts.need_divergence
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    metric_parts = []
    h_detached, w_detached = hidden.detach(), weight.detach()
    b_detached = None if bias is None else bias.detach()

    ws: dict = {}  # [c, V] buffers reused across chunks
    for a, b in chunk_bounds(batch, n, chunk, objective.separable):
        y = targets[a:b]
        with torch.no_grad():
            z_s = chunk_logits(h_detached[a:b], w_detached, b_detached, ws, "z_s")
            z_t = chunk_logits(teacher_hidden[a:b], teacher_weight, teacher_bias, ws, "z_t") if teacher else None
            out = sweep_impl.forward_sweep(z_s, z_t, y, opts, full_divergence=teacher and opts.topk is None, ws=ws,
                                       keep=True)
        valid = y != opts.ignore_index
        logp = out.logp.detach().requires_grad_()
        entropy = out.entropy.detach().requires_grad_() if out.entropy is not None else None
        leaves = [logp] + ([entropy] if entropy is not None else [])
        support = zsk = lse_leaf = None
        divergence = None
        if teacher and opts.topk is None:
            divergence = out.divergence.detach().requires_grad_()
            leaves.append(divergence)
        elif teacher:
            div, support, zsk, lse_leaf = topk_divergence(z_s, z_t, out, opts, requires_grad=True)
            with torch.enable_grad():
                divergence = torch.where(valid, div, 0.0)
            leaves += [zsk, lse_leaf]
        with torch.enable_grad():
            result = objective.loss(TokenStats(logp, entropy, divergence), batch.token_slice(a, b))
        if not isinstance(result, LossOutput):
            raise TypeError(f"objective {objective.name!r}.loss must return a LossOutput, got {type(result).__name__}")
        total += result.loss.detach().float()
        metric_parts.append({k: type(m)(m.sum.detach(), m.count.detach()) for k, m in result.metrics.items()})
        if not (need_h or need_w or need_b) or not result.loss.requires_grad:
            continue
        grads = torch.autograd.grad(result.loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
        g_logp = grads[0]
        g_ent = grads[1] if entropy is not None else None
        i = 2 if entropy is not None else 1
        g_div_full = grads[i] if teacher and opts.topk is None else None
        g_lse = d_zsk = None
        if support is not None:
            d_zsk, g_lse = grads[i], grads[i + 1]
        with torch.no_grad():
            dz = sweep_impl.backward_sweep(z_s, z_t if g_div_full is not None else None, y, out,
                                       g_logp, g_ent, g_div_full, g_lse, opts, ws=ws)
            if support is not None:
                dz.scatter_add_(1, support, d_zsk * (valid[:, None].float() / opts.temperature))
            del z_s, z_t
            if need_h:
                d_hidden[a:b] = (dz.to(weight.dtype) @ w_detached).to(hidden.dtype)
            if need_w:
                d_weight.addmm_(dz.t(), h_detached[a:b].float())
            if need_b:
                d_bias += dz.sum(0)
            del dz

    grads = (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
             None if d_bias is None else d_bias.to(bias.dtype))
    inputs = (hidden, weight, bias if bias is not None else torch.zeros((), device=hidden.device))
    loss = _ApplyPrecomputedGrads.apply(total, grads, *inputs)
    return LossOutput(loss=loss, metrics=merge_metrics(metric_parts))
