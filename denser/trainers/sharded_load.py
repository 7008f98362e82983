"""Sharded loading: under FSDP each process reads only its own slices of a model's weights.

Without it every process of an FSDP run loads the whole model and then keeps its shard, so each
process's load peak is the whole model, however many processes share it: a model that fits only
when sharded cannot be loaded. With it (what ``Trainer`` and ``denser continual`` do under FSDP for
a model stored as safetensors: the embedded model, any Hugging Face directory, a checkpoint):

1. :func:`load_empty` builds the model from its ``config.json`` with its parameters on the meta
   device (no storage; buffers such as the rotary frequencies are computed as usual) and remembers
   where its weights are (:class:`WeightsFile`: ``model.safetensors`` or the shards of an index);
2. ``Sharding.shard`` shards it as any model (``fully_shard`` only records each parameter's
   placement), then calls :func:`materialize`: every process allocates its local shards and copies
   into them the rows it owns, read from the memory-mapped file (``safe_open(...).get_slice``), one
   parameter at a time. No process ever holds a whole parameter it does not own, no collective
   runs, and processes need nothing from each other (each reads the file itself: a shared or copied
   filesystem).

A model built this way has no values until it is sharded; what must read whole weights before
that (the hash of a ``--teacher-path`` model that a run records) reads them from the file one
tensor at a time (:func:`full_tensor`). What would change weights before sharding
(``--teacher-init-alpha`` mixing two models, a LoRA base) loads the whole model instead, as before.

``denser bench fsdp --load`` measures the per-process load peak with and without (docs/fsdp.md).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_ATTR = "_denser_weights"  # an empty model's WeightsFile (in its __dict__; copied by deepcopy)
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class WeightsFile:
    """Where an empty model's weights are: ``files[name]`` is the safetensors file holding
    parameter ``name`` (names as the model's ``state_dict`` has them); ``dtype`` is the model's."""

    root: str
    files: tuple[tuple[str, str], ...]
    dtype: torch.dtype
    later: bool = False  # no file: the values come from a sharded checkpoint (trainers/sharded_checkpoint.py)

    def file_of(self, name: str) -> str | None:
        return dict(self.files).get(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """Parameter ``name`` (rows ``[start, stop)`` of its first dimension only, when given), in the
        model's dtype; read from the memory-mapped file, so only those rows are paged in."""
        from safetensors import safe_open

        file = self.file_of(name)
        if file is None:
            raise KeyError(name)
        with safe_open(str(Path(self.root) / file), framework="pt") as f:
            t = f.get_slice(name)[rows[0]:rows[1]] if rows is not None else f.get_tensor(name)
        return t.to(self.dtype)


def weights_file(path: str | Path) -> WeightsFile | None:
    """The safetensors weights of model directory ``path`` (one file, or the shards an index names);
    None when it has none (a ``pytorch_model.bin``: load it whole)."""
    path = Path(path)
    if (path / INDEX).is_file():
        names = json.loads((path / INDEX).read_text()).get("weight_map", {})
        files = sorted(names.items())
    elif (path / SINGLE).is_file():
        from safetensors import safe_open

        with safe_open(str(path / SINGLE), framework="pt") as f:
            files = sorted((k, SINGLE) for k in f.keys())
    else:
        return None
    return WeightsFile(str(path), tuple(files), torch.float32)


def can_load_empty(path: str | Path) -> bool:
    return Path(path).is_dir() and weights_file(path) is not None


def from_config(path: str | Path, dtype: torch.dtype | str, *, meta: bool) -> nn.Module:
    """The model of directory ``path`` from its configuration alone: parameters on the meta device
    (``meta``) or randomly initialised, for weights read afterwards (a sharded checkpoint's)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(str(path))
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with init_empty_weights(include_buffers=False) if meta else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped under init_empty_weights: the output layer would be a parameter of its own
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    if meta:
        model.__dict__[_ATTR] = WeightsFile(str(path), (), dtype, later=True)
    return model.eval()


def load_empty(path: str | Path, dtype: torch.dtype | str) -> nn.Module:
    """The model of directory ``path`` with parameters on the meta device (:func:`materialize`
    fills this process's shards after ``fully_shard``); ``dtype`` as ``load_model`` takes it."""
    path = Path(path)
    source = weights_file(path)
    if source is None:
        raise ValueError(f"{path} holds no safetensors weights; sharded loading reads safetensors only")
    model = from_config(path, dtype, meta=True)
    dtype = next(model.parameters()).dtype
    stored = {name for name, _ in source.files}
    missing = [n for n in model.state_dict() if n not in stored and not _tied_name(model, n, stored)]
    if missing:
        raise ValueError(f"{path}: its weights lack {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                         f"(a model of another architecture than its config.json names?)")
    model.__dict__[_ATTR] = WeightsFile(source.root, source.files, dtype)
    return model.eval()


def is_empty(model: nn.Module) -> bool:
    """Whether ``model`` was built by :func:`load_empty` (or :func:`from_config` on the meta device)
    and not filled yet."""
    return _ATTR in model.__dict__ and any(p.is_meta for p in model.parameters())


def _tied_name(model: nn.Module, name: str, stored: set[str]) -> str | None:
    """The stored name of a parameter that ``name`` is tied to (the output layer tied to the input
    embeddings: saved once, under the embeddings' name), or None."""
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    if target is None:
        return None
    return next((n for n, p in params.items() if p is target and n in stored), None)


def full_tensor(model: nn.Module, name: str) -> Tensor:
    """State-dict entry ``name`` of an empty model, read whole from its file (one tensor at a time)."""
    source: WeightsFile = model.__dict__[_ATTR]
    stored = {n for n, _ in source.files}
    return source.read(name if name in stored else _tied_name(model, name, stored))


def _rows(param: Any) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a parameter's first dimension this process holds (FSDP2's
    ``Shard(0)``: ``torch.chunk`` over the mesh), checked against its local shard."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return 0, param.shape[0] if param.dim() else 0
    (placement,) = param.placements
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ValueError(f"sharded loading reads row slices; a parameter is placed as {placement}")
    n, world, rank = param.shape[0], param.device_mesh.size(), param.device_mesh.get_local_rank()
    chunk = -(-n // world)
    start, stop = min(rank * chunk, n), min((rank + 1) * chunk, n)
    if param.to_local().shape[0] != stop - start:
        raise ValueError(f"a shard of {param.to_local().shape[0]} rows where rows {start}:{stop} of {n} were expected")
    return start, stop


@torch.no_grad()
def materialize(root: nn.Module, model: nn.Module, device: torch.device) -> None:
    """Give every parameter of the sharded ``root`` (containing the empty ``model``) its storage on
    ``device`` and copy this process's rows of each from the model's weights file."""
    from torch.distributed.tensor import DTensor

    source: WeightsFile = model.__dict__[_ATTR]
    stored = {n for n, _ in source.files}
    buffers = {n: b.clone() for n, b in root.named_buffers() if not b.is_meta}  # to_empty would lose them
    root.to_empty(device=device)
    for n, b in root.named_buffers():
        if n in buffers:
            b.copy_(buffers[n])
    if source.later:  # storage only: a sharded checkpoint's values are loaded next
        del model.__dict__[_ATTR]
        return
    prefix = next(n for n, m in root.named_modules() if m is model)
    prefix = f"{prefix}." if prefix else ""
    done: set[int] = set()
    for name, param in root.named_parameters(remove_duplicate=False):
        if id(param) in done:
            continue
        done.add(id(param))
        key = name[len(prefix):] if name.startswith(prefix) else name
        key = key if key in stored else _tied_name(model, key, stored)
        if key is None:
            raise ValueError(f"{source.root}: no stored weights for parameter {name}")
        local = param.to_local() if isinstance(param, DTensor) else param
        start, stop = _rows(param)
        if local.numel():
            local.copy_(source.read(key, (start, stop)) if param.dim() else source.read(key))
    del model.__dict__[_ATTR]
