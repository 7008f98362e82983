"""The per-chunk vocabulary math in Triton: sweeps over one chunk of materialised logits (backend ``triton_chunked``).

Drop-in for ``denser.kernels.chunk_math``: ``forward_sweep`` and ``backward_sweep`` have the same
signatures and results, so the chunk drivers (``chunked.py`` for ``token_stats``, ``fused.py``
for ``fused_loss``) run either module. Each program owns ``sweep_rows`` rows of the chunk and
walks the vocabulary once in tiles of ``sweep_block_v`` columns:

* forward: one pass with online max/sum gives lse_s, the sampled log-prob, the entropy, lse_t
  and, for alpha in {0, 1}, the divergence; 0 < alpha < 1 needs both lse before log m is known,
  so the same program walks the row a second time for the JSD. Only per-row scalars are written.
* backward: one pass that turns the per-row upstream gradients (logp, entropy, divergence, and the
  top-k driver's ``g_lse``) into d loss / d logits and writes it over the student logits in place.

Memory: the chunk's fp32 logits (owned by the driver) and O(rows) scalars; nothing else.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from denser.kernels.chunk_math import SweepOut
from denser.kernels.options import CoreOptions
from denser.kernels.triton_common import (
    DIV_NONE,
    alpha_constants,
    default_blocks,
    divergence_mode,
    dlogits_tile,
    jsd_update,
    online_update,
    upstream_coefficients,
)

# rows of the forward kernel's output buffer [6, c] (literals in the kernel: Triton reads no globals)
_LOGP, _LSE_S, _ENT, _LSE_T, _DIV, _AUX = range(6)


@triton.jit
def _load_scaled(ptr, rows, row_ok, stride, cols, col_ok, inv_t):
    """``[R, BV]`` tile of one chunk's raw logits, divided by T, ``-inf`` past the vocabulary."""
    z = tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :],
                mask=row_ok[:, None] & col_ok, other=0.0).to(tl.float32)
    return tl.where(col_ok, z * inv_t, float("-inf"))


@triton.jit
def _sweep_forward_kernel(
    zs_ptr, zt_ptr, y_ptr, out_ptr,
    n_rows, V, stride_s, stride_t, inv_t, ignore_index, alpha, one_m_a, log1m_a, log_a,
    NEED_ENT: tl.constexpr, HAS_T: tl.constexpr, DIV_MODE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    valid = row_ok & (y != ignore_index)
    m_s = tl.full((ROWS,), float("-inf"), tl.float32)
    m_t = tl.full((ROWS,), float("-inf"), tl.float32)
    s_s = tl.zeros((ROWS,), tl.float32)
    s_t = tl.zeros((ROWS,), tl.float32)
    e_s = tl.zeros((ROWS,), tl.float32)
    zy = tl.zeros((ROWS,), tl.float32)
    kl = tl.zeros((ROWS,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < V)[None, :]
        zs = _load_scaled(zs_ptr, rows, row_ok, stride_s, cols, col_ok, inv_t)
        zt = zs  # placeholder when there is no teacher (never read)
        if HAS_T:
            zt = _load_scaled(zt_ptr, rows, row_ok, stride_t, cols, col_ok, inv_t)
        m_s, s_s, e_s, zy, m_t, s_t, kl = online_update(zs, zt, col_ok, cols, y, m_s, s_s, e_s, zy, m_t, s_t, kl,
                                                        NEED_ENT, HAS_T, DIV_MODE)
    lse_s = m_s + tl.log(s_s)
    tl.store(out_ptr + 0 * n_rows + rows, tl.where(valid, zy - lse_s, 0.0), mask=row_ok)
    tl.store(out_ptr + 1 * n_rows + rows, lse_s, mask=row_ok)
    if NEED_ENT:
        tl.store(out_ptr + 2 * n_rows + rows, tl.where(valid, lse_s - e_s / s_s, 0.0), mask=row_ok)
    if HAS_T:
        lse_t = m_t + tl.log(s_t)
        tl.store(out_ptr + 3 * n_rows + rows, lse_t, mask=row_ok)
        if DIV_MODE == 1:  # reverse KL; the gradient's aux is D itself
            div = kl / s_s - lse_s + lse_t
            tl.store(out_ptr + 4 * n_rows + rows, tl.where(valid, div, 0.0), mask=row_ok)
            tl.store(out_ptr + 5 * n_rows + rows, div, mask=row_ok)
        if DIV_MODE == 2:  # forward KL
            div = kl / s_t - lse_t + lse_s
            tl.store(out_ptr + 4 * n_rows + rows, tl.where(valid, div, 0.0), mask=row_ok)
        if DIV_MODE == 3:  # JSD: second walk over the row, now that both lse are known
            kl_sm = tl.zeros((ROWS,), tl.float32)
            kl_tm = tl.zeros((ROWS,), tl.float32)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                col_ok = (cols < V)[None, :]
                zs = _load_scaled(zs_ptr, rows, row_ok, stride_s, cols, col_ok, inv_t)
                zt = _load_scaled(zt_ptr, rows, row_ok, stride_t, cols, col_ok, inv_t)
                kl_sm, kl_tm = jsd_update(zs, zt, col_ok, lse_s, lse_t, kl_sm, kl_tm, log1m_a, log_a)
            div = one_m_a * kl_sm + alpha * kl_tm
            tl.store(out_ptr + 4 * n_rows + rows, tl.where(valid, div, 0.0), mask=row_ok)
            tl.store(out_ptr + 5 * n_rows + rows, one_m_a * kl_sm, mask=row_ok)


@triton.jit
def _sweep_backward_kernel(
    zs_ptr, zt_ptr, dz_ptr, y_ptr, row_ptr, coef_ptr,
    n_rows, V, stride_s, stride_t, stride_d, inv_t, ignore_index, one_m_a, log1m_a, log_a,
    NEED_ENT: tl.constexpr, DIV_MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """``row_ptr``: [4, n] lse_s, lse_t, entropy, aux; ``coef_ptr``: [4, n] c_y, c_p, c_e, c_d."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    lse_s = tl.load(row_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(row_ptr + n_rows + rows, mask=row_ok, other=0.0)
    ent = tl.load(row_ptr + 2 * n_rows + rows, mask=row_ok, other=0.0)
    aux = tl.load(row_ptr + 3 * n_rows + rows, mask=row_ok, other=0.0)
    c_y = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    c_p = tl.load(coef_ptr + n_rows + rows, mask=row_ok, other=0.0)
    c_e = tl.load(coef_ptr + 2 * n_rows + rows, mask=row_ok, other=0.0)
    c_d = tl.load(coef_ptr + 3 * n_rows + rows, mask=row_ok, other=0.0)
    keep = (row_ok & (y != ignore_index))[:, None]
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < V)[None, :]
        zs = _load_scaled(zs_ptr, rows, row_ok, stride_s, cols, col_ok, inv_t)
        zt = zs  # placeholder when the divergence has no gradient (never read)
        if DIV_MODE != 0:
            zt = _load_scaled(zt_ptr, rows, row_ok, stride_t, cols, col_ok, inv_t)
        dz = dlogits_tile(zs, zt, col_ok, cols, y, lse_s, lse_t, ent, aux, c_y, c_p, c_e, c_d,
                          one_m_a, log1m_a, log_a, NEED_ENT, DIV_MODE)
        dz = tl.where(keep, dz * inv_t, 0.0)
        tl.store(dz_ptr + rows[:, None].to(tl.int64) * stride_d + cols[None, :], dz, mask=row_ok[:, None] & col_ok)


def _rows_last_contiguous(z: Tensor) -> Tensor:
    return z if z.stride(-1) == 1 else z.contiguous()


def forward_sweep(z_s: Tensor, z_t: Tensor | None, targets: Tensor, opts: CoreOptions, full_divergence: bool,
                  ws: dict | None = None, keep: bool = False) -> SweepOut:
    """Statistics of one chunk; same contract as ``chunk_math.forward_sweep``. ``z_s``/``z_t`` are not
    modified; ``ws`` (the PyTorch sweeps' workspace) and ``keep`` are accepted and unused: the
    backward kernel recomputes its tiles from the logits in one pass."""
    c, vocab = z_s.shape
    z_s = _rows_last_contiguous(z_s)
    has_t = z_t is not None
    z_t = _rows_last_contiguous(z_t) if has_t else z_s
    mode = divergence_mode(opts.alpha) if (has_t and full_divergence) else DIV_NONE
    out = torch.empty(6, c, device=z_s.device, dtype=torch.float32)
    if c > 0:
        blk = default_blocks(z_s.device)
        one_m_a, log1m_a, log_a = alpha_constants(opts.alpha)
        _sweep_forward_kernel[(triton.cdiv(c, blk.sweep_rows),)](
            z_s, z_t, targets, out, c, vocab, z_s.stride(0), z_t.stride(0), 1.0 / opts.temperature,
            opts.ignore_index, opts.alpha, one_m_a, log1m_a, log_a,
            NEED_ENT=opts.need_entropy, HAS_T=has_t, DIV_MODE=mode,
            ROWS=blk.sweep_rows, BLOCK_V=blk.sweep_block_v, num_warps=blk.sweep_warps,
        )
    res = SweepOut(logp=out[_LOGP], lse_s=out[_LSE_S])
    if opts.need_entropy:
        res.entropy = out[_ENT]
    if has_t:
        res.lse_t = out[_LSE_T]
        if mode != DIV_NONE:
            res.divergence = out[_DIV]
            res.aux = out[_AUX] if opts.alpha > 0.0 else None
    return res


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
    """d loss / d raw logits ``[c, V]`` fp32; same contract as ``chunk_math.backward_sweep``.

    Written over ``z_s`` in place when it is fp32 with unit column stride (the drivers' buffers);
    ``z_t`` is only read. ``ws`` is accepted and unused.
    """
    c, vocab = z_s.shape
    device = z_s.device
    in_place = z_s.dtype == torch.float32 and z_s.stride(-1) == 1
    dz = z_s if in_place else torch.empty(c, vocab, device=device, dtype=torch.float32)
    if c == 0:
        return dz
    use_div = g_div is not None and z_t is not None
    use_ent = g_ent is not None and saved.entropy is not None
    mode = divergence_mode(opts.alpha) if use_div else DIV_NONE
    z_t = _rows_last_contiguous(z_t) if use_div else z_s
    zero = torch.zeros(c, device=device, dtype=torch.float32)
    pick = lambda t, used: t.float() if (used and t is not None) else zero  # noqa: E731
    row = torch.stack([
        saved.lse_s.float(),
        pick(saved.lse_t, use_div),
        pick(saved.entropy, use_ent),
        pick(saved.aux, use_div and mode != 2),
    ]).contiguous()
    coef = upstream_coefficients(targets, opts.ignore_index, g_logp, g_ent if use_ent else None,
                                 g_div if use_div else None, g_lse, c, device)
    blk = default_blocks(device)
    one_m_a, log1m_a, log_a = alpha_constants(opts.alpha)
    _sweep_backward_kernel[(triton.cdiv(c, blk.sweep_rows),)](
        z_s, z_t, dz, targets, row, coef, c, vocab, z_s.stride(0), z_t.stride(0), dz.stride(0),
        1.0 / opts.temperature, opts.ignore_index, one_m_a, log1m_a, log_a,
        NEED_ENT=use_ent, DIV_MODE=mode, ROWS=blk.sweep_rows, BLOCK_V=blk.sweep_block_v,
        num_warps=blk.sweep_warps,
    )
    return dz
