"""Public entry points of the loss core: ``token_stats``, ``token_stats_from_logits``, ``fused_loss``."""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import Tensor

from denser.kernels import chunked, fused, reference
from denser.kernels.options import (
    IGNORE_INDEX,
    CoreOptions,
    check_linear_inputs,
    check_scalar_options,
    check_targets,
)
from denser.kernels.protocols import BatchT, LossObjective
from denser.kernels.stats import LossOutput, TokenStats


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
        return chunked.token_stats
    # lazy: triton is optional and slow to import (JIT setup)
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
        backend: one of ``BACKENDS``:
            ``reference``: materialised fp32 ``[N, V]`` logits and autograd (the ground truth);
            ``chunked``: PyTorch, tokens in chunks, logits recomputed in backward, any device;
            ``triton``: CUDA; ``triton_chunked`` when its buffers fit in free memory, else
            ``triton_onchip``; the two can also be named directly:
            ``triton_chunked``: the chunked driver with the per-chunk vocabulary math in Triton;
            ``triton_onchip``: logits tiles computed on chip and never stored, O(N x H + V x H);
            ``auto`` (default): ``triton`` on CUDA, else ``chunked``.
        chunk_size: tokens per chunk for the chunked backends (default: sized to a fixed logits-tile budget per device).

    Returns:
        ``TokenStats`` with ``logp`` ``[N]``, ``entropy`` ``[N]`` or None, ``divergence`` ``[N]`` or None,
        fp32, differentiable with respect to ``hidden``, ``weight`` and ``bias``.
    """
    check_linear_inputs(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, ignore_index)
    check_scalar_options(temperature=temperature, alpha=alpha, topk=topk, vocab=weight.shape[0], backend=backend,
                         chunk_size=chunk_size, has_teacher=teacher_hidden is not None)
    teacher_hidden, teacher_weight, teacher_bias = _teacher_head(weight, bias, teacher_hidden, teacher_weight,
                                                                 teacher_bias)
    opts = CoreOptions(temperature=float(temperature), alpha=float(alpha), topk=topk, add_tail=bool(add_tail),
                       need_entropy=bool(need_entropy), need_divergence=teacher_hidden is not None,
                       ignore_index=ignore_index)
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
    opts = CoreOptions(temperature=float(temperature), alpha=float(alpha), topk=topk, add_tail=bool(add_tail),
                       need_entropy=bool(need_entropy), need_divergence=teacher_logits is not None,
                       ignore_index=ignore_index)
    return reference.stats_from_logits(logits, targets, teacher_logits, opts)


def fused_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    objective: LossObjective[BatchT],
    batch: BatchT,
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

    ``objective`` is anything with the members of ``LossObjective`` (``denser.objectives``'
    ``Objective`` and ``PolicyBatch`` are): its ``core_options()`` says which statistics to
    compute; ``temperature`` comes from this call. For a separable objective the core evaluates
    the loss chunk by chunk while each chunk's logits are in memory and accumulates dH and dW right
    away (four matmuls in all); the returned loss's backward only scales them. Other objectives,
    and the ``reference`` and ``triton_onchip`` backends, take the plain route (``token_stats``,
    then ``objective.loss``). Both routes give the same loss, metrics and gradients.
    """
    opts = objective.core_options()
    if not isinstance(opts, CoreOptions):
        raise TypeError(
            f"objective {objective.name!r}.core_options() must return denser.kernels.CoreOptions, "
            f"got {type(opts).__name__}; build one with CoreOptions(need_entropy=..., need_divergence=..., ...)"
        )
    need_div = opts.need_divergence
    if need_div and teacher_hidden is None:
        raise ValueError(
            f"objective {objective.name!r} distils from a teacher (Signal.TEACHER) but teacher_hidden is None; "
            "pass the teacher's hidden states at the completion tokens"
        )
    if not need_div:
        teacher_hidden = teacher_weight = teacher_bias = None
    core = dataclasses.replace(opts, temperature=temperature, topk=opts.topk if need_div else None)
    check_linear_inputs(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, core.ignore_index)
    check_scalar_options(temperature=core.temperature, alpha=core.alpha, topk=core.topk, vocab=weight.shape[0],
                         backend=backend, chunk_size=chunk_size, has_teacher=need_div)
    core = dataclasses.replace(core, temperature=float(core.temperature), alpha=float(core.alpha))
    if batch.num_tokens != hidden.shape[0]:
        raise ValueError(f"batch has {batch.num_tokens} tokens (seq_ids) but hidden has {hidden.shape[0]} rows")
    teacher_hidden, teacher_weight, teacher_bias = _teacher_head(weight, bias, teacher_hidden, teacher_weight,
                                                                 teacher_bias)
    resolved = resolve_backend(backend, hidden.device)
    if resolved.startswith("triton"):
        # lazy: triton is optional and slow to import (JIT setup)
        from denser.kernels import triton_ops

        # the on-chip path keeps no logits to take gradients in forward from: plain route
        resolved = triton_ops.fused_loss_path(resolved, hidden, weight, teacher_hidden, chunk_size)
    batch = objective.prepare(batch)
    if resolved in ("reference", "triton_onchip") or objective.separable is None:
        stats = _impl(resolved)(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, core, chunk_size)
        return objective.loss(stats, batch)
    return fused.fused_loss(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias,
                            objective, batch, core, resolved, chunk_size)
