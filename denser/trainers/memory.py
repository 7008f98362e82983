"""What keeps a training process's peak memory down besides the loss core (issue 13's profile,
``bench/results/profile-short-workload-cpu-2core-2026-11-29.md``):

- :func:`adamw`: AdamW with ``fused=True`` where the parameters' device supports it (CPU and CUDA in
  torch >= 2.4; TRL's default ``adamw_torch_fused``): one kernel per parameter instead of the
  ``foreach`` path's temporaries (~216 MB per update on the 135M model), falling back to the default;
- :func:`trim_heap`: glibc's ``malloc_trim(0)``, returning the freed heap that glibc otherwise keeps
  after an update's activations are released (0.5-1.7 GB on the short workload); a no-op elsewhere;
- :func:`set_mmap_threshold`: glibc's ``mallopt(M_MMAP_THRESHOLD, n)`` (what the environment variable
  ``MALLOC_MMAP_THRESHOLD_`` sets): allocations of at least ``n`` bytes come from ``mmap`` and go back
  to the system when freed. Lowers the peak most, but every large tensor then costs fresh page faults;
  opt-in (``bench/results/`` has the measurements).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterable

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    """glibc, or None (musl, macOS, Windows: none of the functions below exist there)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> bool:
    """Give the heap's free pages back to the system (glibc ``malloc_trim(0)``); False where unavailable."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def set_mmap_threshold(nbytes: int) -> bool:
    """Serve allocations of at least ``nbytes`` with ``mmap`` (glibc ``mallopt``; it also turns off glibc's
    dynamic threshold); False where unavailable or refused."""
    if nbytes <= 0:
        raise ValueError(f"set_mmap_threshold: nbytes must be > 0, got {nbytes}")
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1)


def adamw(params: Iterable[torch.nn.Parameter], *, fused: bool = True, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, fused=True, **kwargs)`` where the parameters' device and dtype allow it
    (and ``fused``), else the default (``foreach``) implementation. The update is AdamW's either way
    (equal up to rounding)."""
    params = list(params)
    if not fused:
        return torch.optim.AdamW(params, **kwargs)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kwargs)
