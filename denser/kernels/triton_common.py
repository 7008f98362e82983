"""Shared pieces of the Triton loss core: the per-tile math and the block sizes.

Both Triton paths (``triton_chunk_math.py``: sweeps over materialised chunk logits;
``triton_onchip.py``: logits tiles computed on chip) see the vocabulary one tile
``z [rows, BLOCK_V]`` at a time, ``z`` already divided by the temperature and ``-inf`` on columns
past the vocabulary. The ``@triton.jit`` helpers here hold the math both paths share, so there
is one copy of every formula (docs/design.md, Contract 1; notation of ``chunk_math.py``):

* ``online_update``: one tile of the single forward sweep. Running per row: the max ``m`` and
  sum ``s = sum exp(z - m)`` of the student (and teacher), ``e = sum exp(z_s - m) z_s`` for the
  entropy ``H = lse - e / s``, the sampled logit ``z_y``, and for the KL end points
  ``kl = sum exp(z_s - m_s) (z_s - z_t)`` (alpha = 1, so ``D = kl / s_s - lse_s + lse_t``) or
  ``kl = sum exp(z_t - m_t) (z_t - z_s)`` (alpha = 0, ``D = kl / s_t - lse_t + lse_s``). Every
  running quantity is rescaled when its max grows, so partial results of disjoint vocabulary
  ranges merge exactly (``merge_partials``).
* ``jsd_update``: one tile of the second pass of 0 < alpha < 1, once both lse are known.
* ``dlogits_tile``: d loss / d z of one tile from the per-row upstream coefficients.

Interpreter note: ``TRITON_INTERPRET=1`` is read when ``@triton.jit`` runs, i.e. when these
modules are imported. Import them after setting it (``tests/test_triton.py`` does). The
interpreter's ``tl.dot`` multiplies bf16 operands as raw integers (triton 3.x), so under the
interpreter the operands are upcast to fp32 first (``UPCAST``); bf16 x bf16 products are exact in
fp32, so this matches what the tensor cores compute.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the mode the kernels below were built in

# Divergence modes of the kernels (constexpr).
DIV_NONE, DIV_REVERSE_KL, DIV_FORWARD_KL, DIV_JSD = 0, 1, 2, 3


def divergence_mode(alpha: float) -> int:
    """alpha = 1: reverse KL(p_s||p_t); alpha = 0: forward KL(p_t||p_s); between: generalised JSD."""
    if alpha == 1.0:
        return DIV_REVERSE_KL
    if alpha == 0.0:
        return DIV_FORWARD_KL
    return DIV_JSD


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs follow torch's TF32 switch (off by default)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by bf16/fp16 operands


# ------------------------------------------------------------------------------------ block sizes


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch parameters of both Triton paths.

    ``sweep_*``: the chunked sweeps (``sweep_rows`` rows x ``sweep_block_v`` columns per tile).
    On-chip path (``triton_onchip``): logits tiles ``[block_n, fwd_block_v]`` in forward and ``[block_n, block_v]`` in
    the two backward kernels, reduced over H in steps of ``block_k`` (``tl.dot`` needs every dim
    >= 16). ``target_programs``: the forward and dH kernels split the vocabulary until about this
    many programs run. ``scratch_bytes``: cap of each fp32 accumulation buffer of the on-chip
    backward (dH and dW are accumulated in waves of rows that fit).

    The CUDA defaults compile for sm_90 without register spills (``ptxas -v`` with triton 3.9:
    forward 229-243 registers, backward 144-238 at 8 warps); they are a starting point, not
    tuned on a GPU. Override any field with ``DENSER_TRITON_BLOCKS='{"fwd_block_v": 64}'``.
    """

    sweep_rows: int = 1
    sweep_block_v: int = 2048
    sweep_warps: int = 8
    block_n: int = 64
    fwd_block_v: int = 128
    block_v: int = 64
    block_k: int = 64
    warps: int = 8
    stages: int = 3
    target_programs: int = 528
    scratch_bytes: int = 256 << 20


# The interpreter runs every program in Python: few, small tiles. Tests override further.
INTERPRETER_BLOCKS = Blocks(sweep_rows=4, sweep_block_v=32, sweep_warps=1, block_n=16, fwd_block_v=16, block_v=16,
                            block_k=16, warps=1, stages=1, target_programs=2, scratch_bytes=1 << 20)


def default_blocks(device: torch.device) -> Blocks:
    """Block sizes for ``device``; ``DENSER_TRITON_BLOCKS='{"block_v": 256}'`` overrides fields (tuning)."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        blocks = Blocks(target_programs=4 * sms)
    else:
        blocks = INTERPRETER_BLOCKS
    override = os.environ.get("DENSER_TRITON_BLOCKS")
    if override:
        blocks = replace(blocks, **json.loads(override))
    return blocks


# ----------------------------------------------------------------------------------- tile helpers


@triton.jit
def dot_acc(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation (operands upcast under the interpreter)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def online_update(zs, zt, col_ok, cols, y, m_s, s_s, e_s, zy, m_t, s_t, kl,
                  NEED_ENT: tl.constexpr, HAS_T: tl.constexpr, KL_MODE: tl.constexpr):
    """Fold one tile into the running per-row statistics (see the module docstring).

    ``zs``/``zt``: ``[R, BV]`` scaled logits, ``-inf`` where ``col_ok`` is False; every tile has at
    least one valid column, so the running max is finite after the first tile. ``KL_MODE``:
    ``DIV_REVERSE_KL`` or ``DIV_FORWARD_KL`` accumulate ``kl``; anything else leaves it.
    """
    m_new = tl.maximum(m_s, tl.max(zs, 1))
    scale_s = tl.exp(m_s - m_new)
    ps = tl.exp(zs - m_new[:, None])  # unnormalised, 0 on masked columns
    s_s = s_s * scale_s + tl.sum(ps, 1)
    zs0 = tl.where(col_ok, zs, 0.0)
    zy += tl.sum(tl.where(cols[None, :] == y[:, None], zs0, 0.0), 1)
    if NEED_ENT:
        e_s = e_s * scale_s + tl.sum(ps * zs0, 1)
    if HAS_T:
        mt_new = tl.maximum(m_t, tl.max(zt, 1))
        scale_t = tl.exp(m_t - mt_new)
        pt = tl.exp(zt - mt_new[:, None])
        s_t = s_t * scale_t + tl.sum(pt, 1)
        zt0 = tl.where(col_ok, zt, 0.0)
        if KL_MODE == 1:  # reverse KL: sum_v p_s,v (z_s,v - z_t,v), unnormalised
            kl = kl * scale_s + tl.sum(ps * (zs0 - zt0), 1)
        if KL_MODE == 2:  # forward KL: sum_v p_t,v (z_t,v - z_s,v), unnormalised
            kl = kl * scale_t + tl.sum(pt * (zt0 - zs0), 1)
        m_t = mt_new
    return m_new, s_s, e_s, zy, m_t, s_t, kl


@triton.jit
def _log_mixture(lps, lpt, log1m_a, log_a):
    """log m = log((1 - a) p_s + a p_t) = logaddexp(log p_s + log(1 - a), log p_t + log a)."""
    x = lps + log1m_a
    w = lpt + log_a
    hi = tl.maximum(x, w)
    return hi + tl.log(1.0 + tl.exp(-tl.abs(x - w)))


@triton.jit
def jsd_update(zs, zt, col_ok, lse_s, lse_t, kl_sm, kl_tm, log1m_a, log_a):
    """Second pass of 0 < alpha < 1: add sum p_s (log p_s - log m) and sum p_t (log p_t - log m)."""
    lps = tl.where(col_ok, zs - lse_s[:, None], 0.0)
    lpt = tl.where(col_ok, zt - lse_t[:, None], 0.0)
    lm = _log_mixture(lps, lpt, log1m_a, log_a)
    kl_sm += tl.sum(tl.where(col_ok, tl.exp(lps) * (lps - lm), 0.0), 1)
    kl_tm += tl.sum(tl.where(col_ok, tl.exp(lpt) * (lpt - lm), 0.0), 1)
    return kl_sm, kl_tm


@triton.jit
def dlogits_tile(zs, zt, col_ok, cols, y, lse_s, lse_t, ent, aux, c_y, c_p, c_e, c_d,
                 one_m_a, log1m_a, log_a, NEED_ENT: tl.constexpr, DIV_MODE: tl.constexpr):
    """d loss / d z of one tile (z = logits / T; the caller applies 1/T and the row mask).

    Per row: ``c_y`` = g_logp, ``c_p`` = g_lse - g_logp, ``c_e`` = g_entropy, ``c_d`` = g_divergence,
    already zero on ignored rows. With p = p_s, log p = z - lse_s:

        dz = p * (c_p - c_e (log p + H) + c_d t) + c_y onehot(y)  [- c_d p_t  when alpha = 0]

    t = 1 (alpha = 0), log p_s - log p_t - D (alpha = 1), (1 - a) log(p_s / m) - aux (JSD).
    """
    lps = tl.where(col_ok, zs - lse_s[:, None], 0.0)
    inner = tl.zeros_like(lps) + c_p[:, None]
    if NEED_ENT:
        inner -= c_e[:, None] * (lps + ent[:, None])
    if DIV_MODE == 1:
        lpt = tl.where(col_ok, zt - lse_t[:, None], 0.0)
        inner += c_d[:, None] * (lps - lpt - aux[:, None])
    if DIV_MODE == 2:
        inner += c_d[:, None]
    if DIV_MODE == 3:
        lpt = tl.where(col_ok, zt - lse_t[:, None], 0.0)
        lm = _log_mixture(lps, lpt, log1m_a, log_a)
        inner += c_d[:, None] * (one_m_a * (lps - lm) - aux[:, None])
    dz = tl.where(col_ok, tl.exp(lps), 0.0) * inner
    if DIV_MODE == 2:
        dz -= c_d[:, None] * tl.where(col_ok, tl.exp(zt - lse_t[:, None]), 0.0)
    dz += tl.where(cols[None, :] == y[:, None], c_y[:, None], 0.0)
    return dz


# ------------------------------------------------------------------------------ host-side helpers


def alpha_constants(alpha: float) -> tuple[float, float, float]:
    """(1 - a, log(1 - a), log a) for the JSD kernels (placeholders at the end points)."""
    if 0.0 < alpha < 1.0:
        return 1.0 - alpha, math.log1p(-alpha), math.log(alpha)
    return 1.0 - alpha, 0.0, 0.0


def upstream_coefficients(targets, ignore_index: int, g_logp, g_ent, g_div, g_lse, n: int, device):
    """Per-row coefficients ``[4, n]`` fp32 (c_y, c_p, c_e, c_d) of ``dlogits_tile``, zero on ignored rows."""
    valid = (targets != ignore_index).float()
    coef = torch.zeros(4, n, device=device, dtype=torch.float32)
    if g_logp is not None:
        coef[0] = g_logp.float() * valid
        coef[1] = -coef[0]
    if g_lse is not None:
        coef[1] += g_lse.float() * valid
    if g_ent is not None:
        coef[2] = g_ent.float() * valid
    if g_div is not None:
        coef[3] = g_div.float() * valid
    return coef
