"""Backend ``triton_onchip``: logits tiles computed on chip, never written to device memory.

Every kernel here computes ``z = (hidden @ weight.T + bias) / T`` one ``[block_n, block_v]`` tile
at a time with ``tl.dot`` over H (fp32 accumulation), uses it, and drops it. Memory is the inputs,
the gradients, per-token scalars and bounded fp32 accumulation buffers: O(N x H + V x H).

Forward (``_forward_kernel``): programs own (a block of tokens, a range of the vocabulary) and fold
their tiles into running per-token statistics (``triton_common.online_update``). The partial
statistics of the vocabulary ranges are merged exactly in ``merge_partials`` (splitting the
vocabulary keeps the GPU busy when there are few token blocks). 0 < alpha < 1 needs both lse
before log m is known: a second kernel (``_jsd_kernel``) recomputes the tiles for the JSD.

Backward: two deterministic kernels, each recomputing the tiles and d loss / d z
(``triton_common.dlogits_tile``) from the saved per-token lse, entropy and aux:

* ``_dhidden_kernel``: a program owns a block of tokens (and a vocabulary range) and accumulates
  dH[rows, :] += dz @ W[cols, :] in an fp32 buffer it alone writes (no atomics);
* ``_dweight_kernel``: a program owns a block of vocabulary rows, walks all tokens and accumulates
  dW[cols, :] += dz.T @ hidden[rows, :] (and dbias) the same way.

So the backward recomputes the logits twice (once per kernel) instead of using atomics: results
are bitwise reproducible, and neither fp32 accumulator ever has to hold all of dH or dW at once
(they run in waves of at most ``Blocks.scratch_bytes``), which is what keeps the path within
"inputs + gradients + a few hundred MiB" at 64k tokens and a 152k vocabulary. Top-k is not
implemented here: ``token_stats`` sends it to the chunked Triton path.

One file on purpose (over the usual length): one op in Liger-Kernel's order, the kernels, then the
host functions that launch them, then the autograd Function, all sharing one tile layout.
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from denser.kernels import chunked, triton_chunk_math
from denser.kernels.options import CoreOptions
from denser.kernels.stats import TokenStats
from denser.kernels.triton_common import (
    DIV_FORWARD_KL,
    DIV_JSD,
    DIV_NONE,
    DIV_REVERSE_KL,
    INTERPRETED,
    Blocks,
    alpha_constants,
    default_blocks,
    divergence_mode,
    dlogits_tile,
    dot_acc,
    dot_precision,
    jsd_update,
    online_update,
    upstream_coefficients,
)

# ----------------------------------------------------------------------------------------- kernels


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, K, stride_h, stride_w, inv_t,
                 HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[BLOCK_N, BLOCK_V]`` tile of (hidden @ weight.T + bias) / T in fp32, ``-inf`` where not ``col_ok``."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_h
    w_cols = w_ptr + cols[None, :].to(tl.int64) * stride_w
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + ks[:, None], mask=col_ok & k_ok[:, None], other=0.0)  # [BLOCK_K, BLOCK_V]
        acc = dot_acc(h, w, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols[None, :], mask=col_ok, other=0.0).to(tl.float32)
    return tl.where(col_ok, acc * inv_t, float("-inf"))


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, y_ptr, part_ptr,
    N, V, K, KT, v_per_split, stride_h, stride_w, stride_th, stride_tw, inv_t, ignore_index,
    NEED_ENT: tl.constexpr, HAS_T: tl.constexpr, KL_MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial statistics of (token block, vocabulary range) -> ``part[7, S, N]``:
    m_s, s_s, e_s, z_y, m_t, s_t, kl (see ``online_update``)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s_s = tl.zeros((BLOCK_N,), tl.float32)
    s_t = tl.zeros((BLOCK_N,), tl.float32)
    e_s = tl.zeros((BLOCK_N,), tl.float32)
    zy = tl.zeros((BLOCK_N,), tl.float32)
    kl = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < v_hi)[None, :]
        zs = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, K, stride_h, stride_w, inv_t,
                          HAS_BIAS, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        zt = zs  # placeholder without a teacher (never read)
        if HAS_T:
            zt = _logits_tile(th_ptr, tw_ptr, tb_ptr, rows, row_ok, cols, col_ok, KT, stride_th, stride_tw, inv_t,
                              T_HAS_BIAS, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        m_s, s_s, e_s, zy, m_t, s_t, kl = online_update(zs, zt, col_ok, cols, y, m_s, s_s, e_s, zy, m_t, s_t, kl,
                                                        NEED_ENT, HAS_T, KL_MODE)
    out = part_ptr + pid_s * N + rows
    field = tl.num_programs(1) * N
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + field, s_s, mask=row_ok)
    tl.store(out + 2 * field, e_s, mask=row_ok)
    tl.store(out + 3 * field, zy, mask=row_ok)
    tl.store(out + 4 * field, m_t, mask=row_ok)
    tl.store(out + 5 * field, s_t, mask=row_ok)
    tl.store(out + 6 * field, kl, mask=row_ok)


@triton.jit
def _jsd_kernel(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, row_ptr, part_ptr,
    N, V, K, KT, v_per_split, stride_h, stride_w, stride_th, stride_tw, inv_t, log1m_a, log_a,
    HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Second pass of 0 < alpha < 1 -> ``part[2, S, N]``: sum p_s log(p_s/m), sum p_t log(p_t/m)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    lse_s = tl.load(row_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(row_ptr + N + rows, mask=row_ok, other=0.0)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    kl_sm = tl.zeros((BLOCK_N,), tl.float32)
    kl_tm = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < v_hi)[None, :]
        zs = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, K, stride_h, stride_w, inv_t,
                          HAS_BIAS, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        zt = _logits_tile(th_ptr, tw_ptr, tb_ptr, rows, row_ok, cols, col_ok, KT, stride_th, stride_tw, inv_t,
                          T_HAS_BIAS, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
        kl_sm, kl_tm = jsd_update(zs, zt, col_ok, lse_s, lse_t, kl_sm, kl_tm, log1m_a, log_a)
    out = part_ptr + pid_s * N + rows
    tl.store(out, kl_sm, mask=row_ok)
    tl.store(out + tl.num_programs(1) * N, kl_tm, mask=row_ok)


@triton.jit
def _dlogits(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, y, keep, rows, row_ok, cols, col_ok,
             lse_s, lse_t, ent, aux, c_y, c_p, c_e, c_d,
             K, KT, stride_h, stride_w, stride_th, stride_tw, inv_t, one_m_a, log1m_a, log_a,
             NEED_ENT: tl.constexpr, DIV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr,
             PRECISION: tl.constexpr, UPCAST: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Recompute one tile's logits and return d loss / d raw logits ``[BLOCK_N, BLOCK_V]`` fp32."""
    zs = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, K, stride_h, stride_w, inv_t,
                      HAS_BIAS, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    zt = zs  # placeholder when the divergence has no gradient (never read)
    if DIV_MODE != 0:
        zt = _logits_tile(th_ptr, tw_ptr, tb_ptr, rows, row_ok, cols, col_ok, KT, stride_th, stride_tw, inv_t,
                          T_HAS_BIAS, PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_K)
    dz = dlogits_tile(zs, zt, col_ok, cols, y, lse_s, lse_t, ent, aux, c_y, c_p, c_e, c_d,
                      one_m_a, log1m_a, log_a, NEED_ENT, DIV_MODE)
    return tl.where(keep[:, None] & col_ok, dz * inv_t, 0.0)


@triton.jit
def _load_rows(y_ptr, row_ptr, coef_ptr, rows, row_ok, N, ignore_index):
    """Per-token inputs of the backward: target, saved statistics, upstream coefficients."""
    y = tl.load(y_ptr + rows, mask=row_ok, other=ignore_index)
    keep = row_ok & (y != ignore_index)
    lse_s = tl.load(row_ptr + rows, mask=row_ok, other=0.0)
    lse_t = tl.load(row_ptr + N + rows, mask=row_ok, other=0.0)
    ent = tl.load(row_ptr + 2 * N + rows, mask=row_ok, other=0.0)
    aux = tl.load(row_ptr + 3 * N + rows, mask=row_ok, other=0.0)
    c_y = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    c_p = tl.load(coef_ptr + N + rows, mask=row_ok, other=0.0)
    c_e = tl.load(coef_ptr + 2 * N + rows, mask=row_ok, other=0.0)
    c_d = tl.load(coef_ptr + 3 * N + rows, mask=row_ok, other=0.0)
    return y, keep, lse_s, lse_t, ent, aux, c_y, c_p, c_e, c_d


@triton.jit
def _dhidden_kernel(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, y_ptr, row_ptr, coef_ptr, dh_ptr,
    n_lo, n_hi, N, V, K, KT, v_per_split, stride_h, stride_w, stride_th, stride_tw, stride_split,
    inv_t, ignore_index, one_m_a, log1m_a, log_a,
    NEED_ENT: tl.constexpr, DIV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dH[rows] += dz @ W over one vocabulary range, into the fp32 buffer ``dh[split, rows - n_lo, :]``.

    The program is the only writer of its rows of its split's buffer: plain loads and stores, no atomics.
    """
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = n_lo + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_hi
    y, keep, lse_s, lse_t, ent, aux, c_y, c_p, c_e, c_d = _load_rows(y_ptr, row_ptr, coef_ptr, rows, row_ok, N,
                                                                     ignore_index)
    dh_rows = dh_ptr + pid_s * stride_split + (rows - n_lo)[:, None].to(tl.int64) * K
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = (cols < v_hi)[None, :]
        dz = _dlogits(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, y, keep, rows, row_ok, cols, col_ok,
                      lse_s, lse_t, ent, aux, c_y, c_p, c_e, c_d, K, KT, stride_h, stride_w, stride_th, stride_tw,
                      inv_t, one_m_a, log1m_a, log_a, NEED_ENT, DIV_MODE, HAS_BIAS, T_HAS_BIAS, PRECISION, UPCAST,
                      BLOCK_N, BLOCK_V, BLOCK_K)
        dz = dz.to(w_ptr.dtype.element_ty)
        w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_w
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            w = tl.load(w_rows + ks[None, :], mask=(cols < v_hi)[:, None] & k_ok[None, :], other=0.0)
            acc = tl.load(dh_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = dot_acc(dz, w, acc, PRECISION, UPCAST)
            tl.store(dh_rows + ks[None, :], acc, mask=row_ok[:, None] & k_ok[None, :])
        # the next tile re-reads these rows, maybe from other threads of the program (another
        # layout): a CTA barrier makes this program's global stores visible to all its threads
        tl.debug_barrier()


@triton.jit
def _dweight_kernel(
    h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, y_ptr, row_ptr, coef_ptr, dw_ptr, db_ptr,
    v_lo, v_hi, N, V, K, KT, stride_h, stride_w, stride_th, stride_tw,
    inv_t, ignore_index, one_m_a, log1m_a, log_a,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    NEED_ENT: tl.constexpr, DIV_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, T_HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[cols] += dz.T @ hidden over all tokens into the fp32 buffer ``dw[cols - v_lo, :]``; dbias[cols]."""
    cols = v_lo + tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_in = cols < v_hi
    col_ok = col_in[None, :]
    dw_rows = dw_ptr + (cols - v_lo)[:, None].to(tl.int64) * K
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        y, keep, lse_s, lse_t, ent, aux, c_y, c_p, c_e, c_d = _load_rows(y_ptr, row_ptr, coef_ptr, rows, row_ok,
                                                                         N, ignore_index)
        dz = _dlogits(h_ptr, w_ptr, b_ptr, th_ptr, tw_ptr, tb_ptr, y, keep, rows, row_ok, cols, col_ok,
                      lse_s, lse_t, ent, aux, c_y, c_p, c_e, c_d, K, KT, stride_h, stride_w, stride_th, stride_tw,
                      inv_t, one_m_a, log1m_a, log_a, NEED_ENT, DIV_MODE, HAS_BIAS, T_HAS_BIAS, PRECISION, UPCAST,
                      BLOCK_N, BLOCK_V, BLOCK_K)
        if NEED_DB:
            db += tl.sum(dz, 0)
        if NEED_DW:
            dzt = tl.trans(dz.to(h_ptr.dtype.element_ty))  # [BLOCK_V, BLOCK_N]
            h_rows = h_ptr + rows[:, None].to(tl.int64) * stride_h
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                h = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                acc = tl.load(dw_rows + ks[None, :], mask=col_in[:, None] & k_ok[None, :], other=0.0)
                acc = dot_acc(dzt, h, acc, PRECISION, UPCAST)
                tl.store(dw_rows + ks[None, :], acc, mask=col_in[:, None] & k_ok[None, :])
            tl.debug_barrier()  # as in _dhidden_kernel: the next token block re-reads these rows
    if NEED_DB:
        tl.store(db_ptr + cols, db, mask=col_in)


# ------------------------------------------------------------------------------------- host side


def _vocab_splits(n_blocks: int, vocab: int, block_v: int, target_programs: int) -> tuple[int, int]:
    """(number of vocabulary ranges, columns per range): enough ranges that n_blocks x ranges
    reaches ``target_programs``; every range is a whole number of tiles and non-empty."""
    want = max(1, min(triton.cdiv(target_programs, max(n_blocks, 1)), triton.cdiv(vocab, block_v)))
    per = triton.cdiv(triton.cdiv(vocab, want), block_v) * block_v
    return triton.cdiv(vocab, per), per


def _check_blocks(blocks: Blocks) -> None:
    for name in ("block_n", "fwd_block_v", "block_v", "block_k"):
        size = getattr(blocks, name)
        if size < 16 or size & (size - 1):
            raise ValueError(f"Blocks.{name}={size} must be a power of two >= 16 (tl.dot tiles)")


def _rowmajor(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class _Launch:
    """The arguments every kernel shares for one call: pointers, sizes, strides, constexprs."""

    def __init__(self, hidden, weight, bias, t_hidden, t_weight, t_bias, opts: CoreOptions, blocks: Blocks):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.has_t = t_hidden is not None
        self.t_hidden = t_hidden if self.has_t else hidden
        self.t_weight = t_weight if self.has_t else weight
        self.t_bias = t_bias
        self.n, self.k = hidden.shape
        self.v = weight.shape[0]
        self.kt = self.t_hidden.shape[1]
        self.opts, self.blocks = opts, blocks
        self.inv_t = 1.0 / opts.temperature
        self.one_m_a, self.log1m_a, self.log_a = alpha_constants(opts.alpha)
        dummy = weight  # never read when the matching HAS_* flag is False
        self.b_arg = bias if bias is not None else dummy
        self.tb_arg = t_bias if t_bias is not None else dummy

    def tensors(self):
        return (self.hidden, self.weight, self.b_arg, self.t_hidden, self.t_weight, self.tb_arg)

    def strides(self):
        return (self.hidden.stride(0), self.weight.stride(0), self.t_hidden.stride(0), self.t_weight.stride(0))

    def consts(self, block_v: int):
        b = self.blocks
        return dict(HAS_BIAS=self.bias is not None, T_HAS_BIAS=self.t_bias is not None,
                    PRECISION=dot_precision(self.hidden.dtype), UPCAST=INTERPRETED,
                    BLOCK_N=b.block_n, BLOCK_V=block_v, BLOCK_K=b.block_k, num_warps=b.warps, num_stages=b.stages)


def merge_partials(part: Tensor, has_teacher: bool, kl_mode: int) -> dict[str, Tensor]:
    """Merge the ``[7, S, N]`` partial statistics of S vocabulary ranges (exact log-sum-exp merge)."""
    m_s, s_s, e_s, zy, m_t, s_t, kl = part.unbind(0)
    top_s = m_s.max(0).values
    w_s = torch.exp(m_s - top_s)
    sum_s = (s_s * w_s).sum(0)
    lse_s = top_s + sum_s.log()
    out = dict(lse_s=lse_s, logp=zy.sum(0) - lse_s, entropy=lse_s - (e_s * w_s).sum(0) / sum_s)
    if not has_teacher:
        return out
    top_t = m_t.max(0).values
    w_t = torch.exp(m_t - top_t)
    sum_t = (s_t * w_t).sum(0)
    out["lse_t"] = lse_t = top_t + sum_t.log()
    if kl_mode == DIV_REVERSE_KL:
        out["divergence"] = (kl * w_s).sum(0) / sum_s - lse_s + lse_t
    elif kl_mode == DIV_FORWARD_KL:
        out["divergence"] = (kl * w_t).sum(0) / sum_t - lse_t + lse_s
    return out


def onchip_forward(hidden, weight, bias, targets, t_hidden, t_weight, t_bias, opts: CoreOptions, blocks: Blocks):
    """Per-token statistics ``dict(logp, lse_s, entropy, lse_t, divergence, aux)`` (absent ones missing)."""
    run = _Launch(hidden, weight, bias, t_hidden, t_weight, t_bias, opts, blocks)
    n, v, dev = run.n, run.v, hidden.device
    mode = divergence_mode(opts.alpha) if run.has_t else DIV_NONE
    kl_mode = mode if mode in (DIV_REVERSE_KL, DIV_FORWARD_KL) else DIV_NONE
    n_blocks = triton.cdiv(n, blocks.block_n)
    splits, per = _vocab_splits(n_blocks, v, blocks.fwd_block_v, blocks.target_programs)
    part = torch.empty(7, splits, n, device=dev, dtype=torch.float32)
    _forward_kernel[(n_blocks, splits)](
        *run.tensors(), targets, part, n, v, run.k, run.kt, per, *run.strides(), run.inv_t, opts.ignore_index,
        NEED_ENT=opts.need_entropy, HAS_T=run.has_t, KL_MODE=kl_mode, **run.consts(blocks.fwd_block_v),
    )
    stats = merge_partials(part, run.has_t, kl_mode)
    if mode == DIV_REVERSE_KL:
        stats["aux"] = stats["divergence"]
    elif mode == DIV_JSD:
        row = torch.stack([stats["lse_s"], stats["lse_t"]]).contiguous()
        part2 = torch.empty(2, splits, n, device=dev, dtype=torch.float32)
        _jsd_kernel[(n_blocks, splits)](
            *run.tensors(), row, part2, n, v, run.k, run.kt, per, *run.strides(), run.inv_t, run.log1m_a, run.log_a,
            **run.consts(blocks.fwd_block_v),
        )
        kl_sm, kl_tm = part2.sum(1).unbind(0)
        stats["aux"] = run.one_m_a * kl_sm
        stats["divergence"] = stats["aux"] + opts.alpha * kl_tm
    valid = targets != opts.ignore_index
    for name in ("logp", "entropy", "divergence"):
        if name in stats:
            stats[name] = torch.where(valid, stats[name], 0.0)
    return stats


def onchip_backward(run: _Launch, targets, row: Tensor, coef: Tensor, mode: int, need_ent: bool,
                   need_h: bool, need_w: bool, need_b: bool):
    """(d_hidden, d_weight, d_bias) from the per-token coefficients; fp32 accumulation in bounded waves."""
    blocks, opts = run.blocks, run.opts
    n, v, k, dev = run.n, run.v, run.k, run.hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    common = (n, v, run.k, run.kt)
    scalars = (run.inv_t, opts.ignore_index, run.one_m_a, run.log1m_a, run.log_a)
    consts = dict(NEED_ENT=need_ent, DIV_MODE=mode, **run.consts(blocks.block_v))
    d_hidden = d_weight = d_bias = None

    if need_h:
        n_blocks = triton.cdiv(n, blocks.block_n)
        splits, per = _vocab_splits(n_blocks, v, blocks.block_v, blocks.target_programs)
        direct = splits == 1 and run.hidden.dtype == torch.float32
        if direct:  # accumulate straight into the fp32 gradient
            d_hidden = torch.zeros(n, k, **f32)
            wave, scratch = n, d_hidden
        else:
            d_hidden = torch.empty_like(run.hidden)
            wave = max(blocks.block_n, blocks.scratch_bytes // (4 * splits * k) // blocks.block_n * blocks.block_n)
            wave = min(wave, n_blocks * blocks.block_n)
            scratch = torch.empty(splits, wave, k, **f32)
        for lo in range(0, n, wave):
            hi = min(n, lo + wave)
            if not direct:
                scratch.zero_()
            _dhidden_kernel[(triton.cdiv(hi - lo, blocks.block_n), splits)](
                *run.tensors(), targets, row, coef, scratch, lo, hi, *common, per, *run.strides(),
                scratch.stride(0) if scratch.dim() == 3 else 0, *scalars, **consts,
            )
            if not direct:
                d_hidden[lo:hi] = scratch[:, : hi - lo].sum(0) if splits > 1 else scratch[0, : hi - lo]
        del scratch  # before the dW buffer exists: peak = one buffer, not both

    if need_w or need_b:
        d_bias = torch.zeros(v, **f32) if need_b else None
        direct = run.weight.dtype == torch.float32 or not need_w
        if direct:
            d_weight = torch.zeros(v, k, **f32) if need_w else None
            wave, scratch = v, d_weight
        else:
            d_weight = torch.empty_like(run.weight)
            wave = max(blocks.block_v, blocks.scratch_bytes // (4 * k) // blocks.block_v * blocks.block_v)
            wave = min(wave, triton.cdiv(v, blocks.block_v) * blocks.block_v)
            scratch = torch.empty(wave, k, **f32)
        for lo in range(0, v, wave):
            hi = min(v, lo + wave)
            if not direct:
                scratch.zero_()
            _dweight_kernel[(triton.cdiv(hi - lo, blocks.block_v),)](
                *run.tensors(), targets, row, coef, scratch if scratch is not None else row,
                d_bias if d_bias is not None else row, lo, hi, *common, *run.strides(), *scalars,
                NEED_DW=need_w, NEED_DB=need_b, **consts,
            )
            if not direct:
                d_weight[lo:hi] = scratch[: hi - lo]
    if d_hidden is not None:
        d_hidden = d_hidden.to(run.hidden.dtype)
    if d_weight is not None:
        d_weight = d_weight.to(run.weight.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(run.bias.dtype)
    return d_hidden, d_weight, d_bias


class OnChipStats(torch.autograd.Function):
    """(logp, entropy, divergence) of ``softmax((hidden @ weight.T + bias) / T)``, logits never stored.

    Saved for backward: the inputs and four fp32 scalars per token (lse_s, lse_t, entropy, aux).
    Outputs that do not reach the loss get no gradient work: no teacher recompute without a
    divergence gradient, no entropy term without an entropy gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, t_hidden, t_weight, t_bias, opts: CoreOptions, blocks: Blocks):
        ctx.set_materialize_grads(False)
        hidden, weight, t_hidden, t_weight = map(_rowmajor, (hidden, weight, t_hidden, t_weight))
        targets = targets.contiguous()
        n = hidden.shape[0]
        empty = hidden.new_empty(0, dtype=torch.float32)
        if n == 0:
            stats = dict(logp=empty, lse_s=empty)
        else:
            stats = onchip_forward(hidden, weight, bias, targets, t_hidden, t_weight, t_bias, opts, blocks)
        entropy = stats.get("entropy") if opts.need_entropy else None
        ctx.save_for_backward(hidden, weight, bias, targets, t_hidden, t_weight, t_bias,
                              stats["lse_s"], stats.get("lse_t"), entropy, stats.get("aux"))
        ctx.opts, ctx.blocks = opts, blocks
        div = stats.get("divergence") if t_hidden is not None else None
        return stats["logp"], empty if entropy is None else entropy, empty if div is None else div

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_div):
        hidden, weight, bias, targets, t_hidden, t_weight, t_bias, lse_s, lse_t, entropy, aux = ctx.saved_tensors
        opts, blocks = ctx.opts, ctx.blocks
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and bias is not None
        n = hidden.shape[0]
        g_ent = g_ent if entropy is not None else None
        g_div = g_div if t_hidden is not None else None
        if n == 0 or (g_logp is None and g_ent is None and g_div is None) or not (need_h or need_w or need_b):
            zeros = lambda t, need: torch.zeros_like(t) if need else None  # noqa: E731
            return (zeros(hidden, need_h), zeros(weight, need_w), zeros(bias, need_b) if bias is not None else None,
                    None, None, None, None, None, None)
        mode = divergence_mode(opts.alpha) if g_div is not None else DIV_NONE
        zero = torch.zeros_like(lse_s)
        row = torch.stack([lse_s, lse_t if mode != DIV_NONE else zero, entropy if g_ent is not None else zero,
                           aux if (aux is not None and mode != DIV_NONE) else zero]).contiguous()
        coef = upstream_coefficients(targets, opts.ignore_index, g_logp, g_ent, g_div, None, n, hidden.device)
        run = _Launch(hidden, weight, bias, t_hidden, t_weight, t_bias, opts, blocks)
        d_hidden, d_weight, d_bias = onchip_backward(run, targets, row, coef, mode, g_ent is not None,
                                                    need_h, need_w, need_b)
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


@functools.cache
def _warn_topk() -> None:
    warnings.warn(
        "backend='triton_onchip' computes the full-vocabulary divergence only; top-k distillation runs on the "
        "chunked Triton path (backend='triton_chunked') instead, with O(chunk x V) memory.",
        stacklevel=3,
    )


def token_stats(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, opts: CoreOptions,
                chunk_size=None, blocks: Blocks | None = None) -> TokenStats:
    """Backend ``triton_onchip`` (same signature as ``chunked.token_stats``; ``chunk_size`` unused).

    Top-k falls back to the chunked Triton path (with a one-time warning).
    """
    if opts.topk is not None:
        _warn_topk()
        return chunked.token_stats(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, opts,
                                   chunk_size, sweep_impl=triton_chunk_math)
    blocks = blocks or default_blocks(hidden.device)
    _check_blocks(blocks)
    logp, entropy, div = OnChipStats.apply(hidden, weight, bias, targets, teacher_hidden, teacher_weight,
                                           teacher_bias, opts, blocks)
    return TokenStats(logp=logp, entropy=entropy if opts.need_entropy else None,
                      divergence=div if teacher_hidden is not None else None)
