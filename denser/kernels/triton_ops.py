"""Entry point of the Triton backends: ``token_stats_impl(backend)`` and the path choice.

Two Triton paths compute the same statistics as ``reference`` (docs/design.md, Contract 1):

``triton_chunked``  tokens in chunks; each chunk's logits come from one cuBLAS matmul into an fp32
                    ``[chunk, V]`` buffer and one Triton sweep per direction does the vocabulary
                    math (``triton_chunk_math.py``; the chunk driver is ``chunked.py``, and
                    ``fused.py`` for ``fused_loss``). Memory O(chunk x V) plus an fp32 dW
                    accumulator (V x H). Fastest: the matmuls run at cuBLAS speed.
``triton_onchip``   logits tiles computed on chip, never written to device memory
                    (``triton_onchip.py``). Memory O(N x H + V x H) with bounded fp32 accumulation
                    buffers; it recomputes the logits in backward (twice: once for dH, once for
                    dW) so it is slower.
``triton``          picks one of the two from the free device memory (``choose_triton_path``):
                    the chunked path when its buffers fit, else the on-chip path.

Top-k runs on the chunked path only (the on-chip backend forwards it there with a warning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from denser.kernels import chunked, triton_chunk_math, triton_onchip
from denser.kernels.options import CoreOptions
from denser.kernels.stats import TokenStats
from denser.kernels.triton_common import default_blocks

# Share of the free device memory the chunked path may plan to use (the rest is headroom for the
# allocator's fragmentation and for whatever else the step allocates meanwhile).
FREE_MEMORY_SHARE = 0.8


def chunked_token_stats(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias,
                        opts: CoreOptions, chunk_size=None) -> TokenStats:
    """Backend ``triton_chunked``: the shared chunk driver with the Triton sweeps."""
    return chunked.token_stats(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias, opts,
                               chunk_size, sweep_impl=triton_chunk_math)


# ------------------------------------------------------------------------------------ path choice


@dataclass
class PathChoice:
    """Why ``triton`` picked a path: the estimates in bytes beyond the inputs and their gradients."""

    path: str
    free_bytes: int | None
    chunked_bytes: int
    onchip_bytes: int
    chunk_size: int

    def as_dict(self) -> dict:
        return asdict(self)


def free_device_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device, counting the caching allocator's reserved-but-unused blocks."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def memory_estimates(n: int, h: int, v: int, *, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                     teacher: bool = True, need_weight_grad: bool = True, chunk_size: int | None = None) -> dict:
    """Working memory of each path in bytes, beyond inputs, outputs and returned gradients."""
    elem = torch.empty((), dtype=dtype).element_size()
    chunk = min(max(n, 1), chunk_size or chunked.default_chunk_size(v, device))
    models = 2 if teacher else 1
    # per chunk: matmul output (input dtype) + its fp32 copy per model, and the dz cast for dH/dW
    tiles = chunk * v * (models * (elem + 4) + elem)
    chunked_bytes = tiles + (v * h * 4 if need_weight_grad else 0)
    blocks = default_blocks(device)
    per_token = n * 4 * 16  # saved statistics, coefficients and forward partials
    onchip_bytes = 2 * blocks.scratch_bytes + per_token
    return dict(chunked_bytes=int(chunked_bytes), onchip_bytes=int(onchip_bytes), chunk_size=int(chunk))


def explain_triton_path(n: int, h: int, v: int, device: torch.device | str, *, dtype: torch.dtype = torch.bfloat16,
                        teacher: bool = True, need_weight_grad: bool = True, chunk_size: int | None = None,
                        free_bytes: int | None = None) -> PathChoice:
    """``choose_triton_path`` with its reasons (for the benchmark table and for logs)."""
    device = torch.device(device)
    est = memory_estimates(n, h, v, device=device, dtype=dtype, teacher=teacher,
                           need_weight_grad=need_weight_grad, chunk_size=chunk_size)
    free = free_bytes if free_bytes is not None else free_device_bytes(device)
    if free is None:  # not CUDA (the interpreter): no memory signal, take the faster path
        path = "triton_chunked"
    else:
        path = "triton_chunked" if est["chunked_bytes"] <= FREE_MEMORY_SHARE * free else "triton_onchip"
    return PathChoice(path=path, free_bytes=free, **est)


def choose_triton_path(n: int, h: int, v: int, device: torch.device | str, **kwargs) -> str:
    """``"triton_chunked"`` when its O(chunk x V + V x H) buffers fit in the free device memory
    (it runs the matmuls on cuBLAS and is the faster path), else ``"triton_onchip"``
    (O(N x H + V x H), logits never stored). Keyword arguments as ``explain_triton_path``."""
    return explain_triton_path(n, h, v, device, **kwargs).path


def fused_loss_path(backend: str, hidden, weight, teacher_hidden=None, chunk_size: int | None = None) -> str:
    """Which Triton path ``fused_loss`` should run for ``backend``: ``triton_chunked`` (the chunk
    driver of ``fused.py`` with ``triton_chunk_math``, gradients in forward) or ``triton_onchip``
    (no chunk logits to take gradients in forward from: ``token_stats`` + ``objective.loss``)."""
    if backend != "triton":
        return backend
    return choose_triton_path(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.device, dtype=hidden.dtype,
                              teacher=teacher_hidden is not None, need_weight_grad=weight.requires_grad,
                              chunk_size=chunk_size)


def auto_token_stats(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias,
                     opts: CoreOptions, chunk_size=None) -> TokenStats:
    """Backend ``triton``: the path ``choose_triton_path`` picks for these inputs (top-k: chunked)."""
    path = "triton_chunked"
    if opts.topk is None:
        path = choose_triton_path(hidden.shape[0], hidden.shape[1], weight.shape[0], hidden.device,
                                  dtype=hidden.dtype, teacher=teacher_hidden is not None,
                                  need_weight_grad=weight.requires_grad, chunk_size=chunk_size)
    return token_stats_impl(path)(hidden, weight, targets, bias, teacher_hidden, teacher_weight, teacher_bias,
                                  opts, chunk_size)


def token_stats_impl(backend: str):
    """The ``token_stats`` implementation of a Triton backend (signature of ``chunked.token_stats``)."""
    if backend == "triton_chunked":
        return chunked_token_stats
    if backend == "triton_onchip":
        return triton_onchip.token_stats
    if backend == "triton":
        return auto_token_stats
    raise ValueError(f"backend={backend!r} is not a Triton backend; use 'triton', 'triton_chunked' or 'triton_onchip'")
