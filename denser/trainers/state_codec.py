"""The training state of a checkpoint as tensors and JSON (nothing pickled), and the checkpoint errors.

:func:`encode_state` turns an optimizer, scheduler and RNG state into a JSON tree plus a flat dict
of tensors (safetensors); :func:`decode_state` inverts it and can build nothing but numbers,
strings, lists, tuples, dicts, tensors and numeric numpy arrays, so loading runs no code.
:mod:`denser.trainers.checkpoint` writes and reads them (and re-exports these names).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (full disk, missing files)."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files do not match its manifest (truncated, corrupted, missing)."""


class LegacyCheckpointError(CheckpointError):
    """A checkpoint of an earlier format whose training state is a pickle: never loaded."""


_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__")
_NDARRAY_KINDS = "biuf"  # numeric arrays only (numpy's RNG key is uint32)


def encode_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(tree, tensors)``: ``obj`` as JSON-able data and a flat dict of tensors for safetensors.

    Handles what optimizer, scheduler and RNG states hold: None, bool, int, float, str, lists,
    tuples, dicts (any JSON-able keys: the optimizer's state is keyed by int), tensors and
    numeric numpy arrays. A tensor becomes ``{"__tensor__": key}``; any other type is a
    :class:`CheckpointError`, so nothing that would need pickling is ever written.
    """
    tensors: dict[str, torch.Tensor] = {}

    def _fresh_key(path: str) -> str:
        key = path or "root"
        while key in tensors:  # a dict key holding a dot could collide with a nested path
            key += "+"
        return key

    def enc(x: Any, path: str) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, torch.Tensor):
            key = _fresh_key(path)
            t = x.detach().to("cpu")
            if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.contiguous().clone()  # a view: its own storage (safetensors refuses shared memory)
            tensors[key] = t
            return {"__tensor__": key}
        if isinstance(x, np.ndarray):
            if x.dtype.kind not in _NDARRAY_KINDS:
                raise CheckpointError(f"cannot store a numpy array of dtype {x.dtype} at {path!r} in a checkpoint")
            key = _fresh_key(path)
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.uint8).copy())
            return {"__ndarray__": key, "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, np.generic):
            return enc(x.item(), path)
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and k not in _MARKERS for k in x):
                return {k: enc(v, f"{path}.{k}" if path else k) for k, v in x.items()}
            return {"__dict__": [[enc(k, f"{path}.key{i}"), enc(v, f"{path}.{k}" if path else str(k))]
                                 for i, (k, v) in enumerate(x.items())]}
        raise CheckpointError(f"cannot store a {type(x).__name__} at {path!r} in a checkpoint "
                              "(only tensors, numbers, strings and lists/tuples/dicts of them)")

    return enc(obj, ""), tensors


def decode_state(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`; a malformed tree is a :class:`CheckpointError`."""

    def dec(x: Any) -> Any:
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            raise CheckpointError(f"unexpected {type(x).__name__} in the training state")
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            dtype = np.dtype(str(x["dtype"]))
            if dtype.kind not in _NDARRAY_KINDS:
                raise CheckpointError(f"numpy dtype {dtype} is not allowed in the training state")
            raw = tensors[x["__ndarray__"]].numpy().tobytes()
            return np.frombuffer(raw, dtype=dtype).reshape([int(n) for n in x["shape"]]).copy()
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {_hashable(dec(k)): dec(v) for k, v in x["__dict__"]}
        return {k: dec(v) for k, v in x.items()}

    try:
        return dec(tree)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"the training state is malformed ({type(e).__name__}: {e})") from None


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key
