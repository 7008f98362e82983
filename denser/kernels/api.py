"""Public entry points of the loss core: ``token_stats``, ``token_stats_from_logits``, ``fused_loss``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from denser.kernels import reference
from denser.kernels.options import IGNORE_INDEX, CoreOptions, check_linear_inputs, check_scalar_options, check_targets
from denser.kernels.stats import LossOutput, TokenStats

if TYPE_CHECKING:  # pragma: no cover
    from denser.objectives.base import Objective, PolicyBatch


def triton_usable(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or anywhere under ``TRITON_INTERPRET=1`` (slowly)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> a Triton path on CUDA, ``chunked`` elsewhere; ``triton`` -> the best Triton path."""
    if backend == "auto":
        if device.type == "cuda" and triton_usable(device):
            return "triton"
        return "chunked"
    if backend.startswith("triton") and not triton_usable(device):
        raise ValueError(
            f"backend={backend!r} needs a CUDA device and the triton package (or TRITON_INTERPRET=1 to run the "
            f"kernels on CPU for testing); the inputs are on {device}. Use backend='chunked' or 'auto'."
        )
    return backend


def _teacher_head(weight, bias, teacher_hidden, teacher_weight, teacher_bias):
    """The teacher's inputs, detached (stop-gradient); its head defaults to the student's."""
    if teacher_hidden is None:
        return None, None, None
    if teacher_weight is None:
        teacher_weight, teacher_bias = weight, (bias if teacher_bias is None else teacher_bias)
    return (teacher_hidden.detach(), teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach())


def _impl(backend: str):
    if backend == "reference":
        return reference.token_stats
    if backend == "chunked":
        from denser.kernels import chunked

        return chunked.token_stats
    from denser.kernels import triton_ops

    return triton_ops.token_stats_impl(backend)


def token_stats(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    topk: int | None = None,
    add_tail: bool = True,
    need_entropy: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> TokenStats:
    """Per-token statistics of ``softmax((hidden @ weight.T + bias) / temperature)``.

    Args:
        hidden: ``[N, H]`` final hidden states of the N (packed) completion tokens.
        weight: ``[V, H]`` lm_head weight; ``bias``: optional ``[V]``.
        targets: ``[N]`` sampled token ids; ``ignore_index`` (-100) marks tokens with no statistics.
        teacher_hidden: ``[N, H_t]`` the teacher's hidden states at the same tokens; enables
            ``divergence``. Stop-gradient. ``teacher_weight``/``teacher_bias`` default to the
            student's ``weight`` and ``bias`` (self-distillation shares the head).
        alpha: 0 = KL(teacher || student), 1 = KL(student || teacher), between = generalised JSD.
        topk: distil on the student's top-k ids only, with a tail bucket (``add_tail``) or
            renormalised over the support.
        backend: ``reference`` | ``chunked`` | ``triton`` | ``auto`` (triton on CUDA, else chunked).
        chunk_size: tokens per chunk for the chunked backends (default: sized to ~64 MiB of logits).

    Returns:
        ``TokenStats`` with ``logp`` ``[N]``, ``entropy`` ``[N]`` or None, ``divergence`` ``[N]`` or None,
        fp32, differentiable with respect to ``hidden``, ``weight`` and ``bias``.
    """
    check_linear_inputs(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, ignore_index)
    check_scalar_options(temperature=temperature, alpha=alpha, topk=topk, vocab=weight.shape[0], backend=backend,
                         chunk_size=chunk_size, has_teacher=teacher_hidden is not None)
    teacher_hidden, teacher_weight, teacher_bias = _teacher_head(weight, bias, teacher_hidden, teacher_weight,
                                                                 teacher_bias)
    opts = CoreOptions(float(temperature), float(alpha), topk, bool(add_tail), bool(need_entropy),
                       teacher_hidden is not None, ignore_index)
    impl = _impl(resolve_backend(backend, hidden.device))
    return impl(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, opts, chunk_size)


def token_stats_from_logits(
    logits: Tensor,
    targets: Tensor,
    *,
    teacher_logits: Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    topk: int | None = None,
    add_tail: bool = True,
    need_entropy: bool = False,
    backend: str = "reference",
    chunk_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> TokenStats:
    """The same statistics from already materialised ``[N, V]`` logits (reference math).

    Use it when the logits exist anyway; ``token_stats(hidden, weight, ...)`` is the route that
    never materialises them.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise ValueError("logits must be a 2-D tensor [N, V]; flatten batch and time first")
    if backend not in ("reference", "auto"):
        raise ValueError(
            f"token_stats_from_logits works on materialised logits, so backend={backend!r} saves nothing; "
            "use backend='reference', or token_stats(hidden, weight, ...) for the memory-saving backends"
        )
    n, vocab = logits.shape
    check_targets(targets, n, vocab, ignore_index)
    if teacher_logits is not None:
        if not isinstance(teacher_logits, Tensor) or teacher_logits.dim() != 2 or teacher_logits.shape[0] != n:
            raise ValueError(f"teacher_logits must be [N={n}, V], got {tuple(getattr(teacher_logits, 'shape', ()))}")
        if teacher_logits.shape[1] != vocab:
            raise ValueError(f"the teacher's vocabulary ({teacher_logits.shape[1]}) differs from the student's ({vocab}); "
                             "token-level distillation needs one shared vocabulary")
    check_scalar_options(temperature=temperature, alpha=alpha, topk=topk, vocab=vocab, backend="reference",
                         chunk_size=chunk_size, has_teacher=teacher_logits is not None)
    opts = CoreOptions(float(temperature), float(alpha), topk, bool(add_tail), bool(need_entropy),
                       teacher_logits is not None, ignore_index)
    return reference.stats_from_logits(logits, targets, teacher_logits, opts)


def fused_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    objective: "Objective",
    batch: "PolicyBatch",
    *,
    bias: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    chunk_size: int | None = None,
) -> LossOutput:
    """``objective.loss(token_stats(...), batch)`` with the gradients computed in forward.

    For a separable objective the core evaluates the loss chunk by chunk while each chunk's
    logits are in memory and accumulates dH and dW right away (four matmuls in all); the returned
    loss's backward only scales them. Other objectives, and ``backend='reference'``, take the
    plain route. Both routes give the same loss, metrics and gradients.
    """
    from denser.kernels import fused

    opts = objective.core_options()
    need_div = bool(opts.get("need_divergence", False))
    if need_div and teacher_hidden is None:
        raise ValueError(
            f"objective {objective.name!r} distils from a teacher (Signal.TEACHER) but teacher_hidden is None; "
            "pass the teacher's hidden states at the completion tokens"
        )
    if not need_div:
        teacher_hidden = teacher_weight = teacher_bias = None
    ignore_index = IGNORE_INDEX
    check_linear_inputs(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, ignore_index)
    topk = opts.get("topk") if need_div else None
    alpha = opts.get("alpha", 0.5)
    check_scalar_options(temperature=temperature, alpha=alpha, topk=topk, vocab=weight.shape[0], backend=backend,
                         chunk_size=chunk_size, has_teacher=need_div)
    if batch.num_tokens != hidden.shape[0]:
        raise ValueError(f"batch has {batch.num_tokens} tokens (seq_ids) but hidden has {hidden.shape[0]} rows")
    teacher_hidden, teacher_weight, teacher_bias = _teacher_head(weight, bias, teacher_hidden, teacher_weight,
                                                                 teacher_bias)
    core = CoreOptions(float(temperature), float(alpha), topk, bool(opts.get("add_tail", True)),
                       bool(opts.get("need_entropy", False)), need_div, ignore_index)
    resolved = resolve_backend(backend, hidden.device)
    if resolved.startswith("triton"):
        from denser.kernels import triton_ops

        # the fully fused path keeps no logits to take gradients in forward from: plain route
        resolved = triton_ops.fused_loss_path(resolved, hidden, weight, teacher_hidden, chunk_size)
    batch = objective.prepare(batch)
    if resolved in ("reference", "triton_fused") or objective.separable is None:
        stats = _impl(resolved)(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, core, chunk_size)
        return objective.loss(stats, batch)
    return fused.fused_loss(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias,
                            objective, batch, core, resolved, chunk_size)
