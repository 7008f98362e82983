"""Validated options shared by every backend of the loss core."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# The backends of ``token_stats`` / ``fused_loss`` (their docstrings say what each one does):
#   reference       materialised fp32 [N, V] logits and autograd: the ground truth
#   chunked         PyTorch, tokens in chunks, logits recomputed in backward; any device
#   triton          CUDA: triton_chunked when its buffers fit in free memory, else triton_onchip
#   triton_chunked  the chunked driver with the per-chunk vocabulary math in Triton
#   triton_onchip   Triton kernels that compute logits tiles on chip and never store them
#   auto            triton on CUDA, else chunked
BACKENDS = ("auto", "reference", "chunked", "triton", "triton_chunked", "triton_onchip")
IGNORE_INDEX = -100
# Floor of the top-k tail mass 1 - sum_{v in top-k} p_v: keeps log(tail) and its gradient finite
# when the top-k support holds (numerically) all the mass. Every backend uses the same floor.
TAIL_FLOOR_LOG = -1e-6  # the log-mass of the support is clamped to at most this before log(1 - exp(.))


@dataclass(frozen=True)
class CoreOptions:
    """Which statistics the loss core computes, and how: the one option set of every backend.

    An objective's ``core_options()`` returns one (``need_entropy``, ``need_divergence``,
    ``alpha``, ``topk``, ``add_tail``); ``fused_loss`` then sets ``temperature`` from its call.
    ``need_divergence``: the objective distils from a teacher (``teacher_hidden`` required);
    ``alpha``: 0 = KL(teacher || student), 1 = KL(student || teacher), between = generalised JSD;
    ``topk``: distil on the student's top-k ids, with a tail bucket when ``add_tail``.
    """

    temperature: float = 1.0
    alpha: float = 0.5
    topk: int | None = None
    add_tail: bool = True
    need_entropy: bool = False
    need_divergence: bool = False
    ignore_index: int = IGNORE_INDEX


def _fail(msg: str):
    raise ValueError(msg)


def check_scalar_options(*, temperature, alpha, topk, vocab: int, backend: str, chunk_size, has_teacher: bool) -> None:
    if backend not in BACKENDS:
        _fail(f"backend={backend!r} is unknown; use one of {', '.join(repr(b) for b in BACKENDS)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        _fail(f"temperature={temperature!r} must be a finite number > 0 (use 1.0 for plain softmax)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 <= float(alpha) <= 1.0):
        _fail(
            f"alpha={alpha!r} must be in [0, 1]: 0 = forward KL(teacher||student), "
            "1 = reverse KL(student||teacher), between = generalised JSD"
        )
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int) or not (1 <= topk <= vocab):
            _fail(f"topk={topk!r} must be an int in [1, vocab size {vocab}], or None for the full vocabulary")
        if not has_teacher:
            _fail("topk only applies to the teacher divergence, but no teacher was given; pass teacher_hidden (or teacher_logits) or drop topk")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        _fail(f"chunk_size={chunk_size!r} must be a positive int, or None for the backend's default")


def check_targets(targets: Tensor, n: int, vocab: int, ignore_index: int) -> None:
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.shape[0] != n:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        _fail(f"targets must be a 1-D tensor of {n} token ids (one per row of hidden), got {shape}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.dtype.is_complex:
        _fail(f"targets must hold integer token ids, got dtype {targets.dtype}; cast with targets.long()")
    if n == 0:
        return
    valid = (targets == ignore_index) | ((targets >= 0) & (targets < vocab))
    if not bool(valid.all()):
        bad = targets[~valid]
        _fail(
            f"targets hold ids outside the vocabulary [0, {vocab}) (e.g. {int(bad[0])}, min {int(bad.min())}, "
            f"max {int(bad.max())}); use {ignore_index} (ignore_index) for tokens without a loss"
        )


def check_linear_inputs(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, ignore_index) -> None:
    """Shapes, dtypes and devices of ``token_stats`` inputs; raises ValueError naming the fix."""
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        _fail(f"hidden must be a 2-D tensor [N, H] of final hidden states (flatten batch and time first), got "
              f"{tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        _fail("weight must be the 2-D lm_head weight [V, H]")
    n, h = hidden.shape
    vocab = weight.shape[0]
    if weight.shape[1] != h:
        _fail(f"hidden is [N={n}, H={h}] but weight is {tuple(weight.shape)}; weight must be [V, {h}] (the lm_head weight, not its transpose)")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        _fail(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating dtype; cast one to the other")
    if hidden.device != weight.device:
        _fail(f"hidden is on {hidden.device} but weight is on {weight.device}; move them to one device")
    if bias is not None and (bias.shape != (vocab,) or bias.device != weight.device):
        _fail(f"bias must be [V={vocab}] on {weight.device}, got {tuple(bias.shape)} on {bias.device}")
    check_targets(targets, n, vocab, ignore_index)
    if targets.device != hidden.device:
        _fail(f"targets are on {targets.device} but hidden is on {hidden.device}; move them to one device")
    if teacher_hidden is None:
        if teacher_weight is not None:
            _fail("teacher_weight was given without teacher_hidden; pass the teacher's hidden states too")
        return
    if not isinstance(teacher_hidden, Tensor) or teacher_hidden.dim() != 2 or teacher_hidden.shape[0] != n:
        _fail(f"teacher_hidden must be [N={n}, H_teacher] (one row per student token), got "
              f"{tuple(teacher_hidden.shape) if isinstance(teacher_hidden, Tensor) else type(teacher_hidden).__name__}")
    tw = weight if teacher_weight is None else teacher_weight
    if tw.dim() != 2:
        _fail("teacher_weight must be a 2-D lm_head weight [V, H_teacher]")
    if tw.shape[0] != vocab:
        _fail(f"the teacher's vocabulary ({tw.shape[0]}) differs from the student's ({vocab}); "
              "token-level distillation needs one shared tokenizer and vocabulary")
    if teacher_hidden.shape[1] != tw.shape[1]:
        which = "weight (shared with the student)" if teacher_weight is None else "teacher_weight"
        _fail(f"teacher_hidden has width {teacher_hidden.shape[1]} but {which} is {tuple(tw.shape)}; "
              "pass the teacher's own lm_head as teacher_weight if its hidden size differs")
    if teacher_hidden.dtype != tw.dtype or teacher_hidden.device != tw.device or tw.device != hidden.device:
        _fail(f"teacher_hidden ({teacher_hidden.dtype}, {teacher_hidden.device}) and its weight ({tw.dtype}, {tw.device}) "
              f"must share dtype and sit on the student's device ({hidden.device})")
    if teacher_bias is not None and teacher_bias.shape != (vocab,):
        _fail(f"teacher_bias must be [V={vocab}], got {tuple(teacher_bias.shape)}")
