"""Sharded checkpoints: under FSDP each process writes its own shards of the training state.

A checkpoint of an FSDP run (``trainers/checkpoint.py`` describes the directory) keeps the policy's
weights, its AdamW moments and an EMA teacher's weights in ``state/shards/``, written by torch's
distributed checkpoint (``torch.distributed.checkpoint``, DCP): every process writes the slices it
holds (``__<rank>_0.distcp``) and process 0 the metadata that says which file holds which slice of
which tensor. No process gathers a whole tensor, so a checkpoint costs each process what it holds.
The rest is as in any checkpoint: written into a temporary directory, every file (every process's
shards included) in the ``COMPLETE`` manifest with its SHA-256, one atomic rename. The directory must
be shared by the processes (one filesystem: a single machine, or a shared drive across machines);
where it is not (``RunDir.shared``), the run writes gathered checkpoints instead.

``model/`` holds the configuration and tokenizer; the weights themselves, loadable by
``from_pretrained``, are exported (gathered, written by process 0) only into the run's final
checkpoint and the checkpoint a continual stage ends with, or into any checkpoint by
``denser export CHECKPOINT``.

Reading reshards: the state is loaded into the tensors of the resuming run, laid out however it
shards them (another number of FSDP processes, DDP, or one process, which reads whole tensors),
through ``torch.distributed.checkpoint.state_dict``'s ``get_state_dict`` / ``set_state_dict``, which
key the optimizer state by parameter name rather than by position.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SHARDS = "shards"  # under a checkpoint's state/


@dataclass(frozen=True)
class ShardedState:
    """The optimizer or EMA teacher state of a sharded checkpoint, read when a run starts from it
    (``Trainer(optimizer_state=ShardedState(ckpt))``: a resumed continual run's next stage)."""

    path: Path


def shards_dir(ckpt: str | Path) -> Path:
    return Path(ckpt) / "state" / SHARDS


def has_shards(ckpt: str | Path) -> bool:
    """Whether checkpoint ``ckpt`` keeps its training state in per-process shards."""
    return (shards_dir(ckpt) / ".metadata").is_file()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None, teacher: nn.Module | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    states: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        states["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if teacher is not None:
        states["teacher"] = get_model_state_dict(teacher)
    return states


def save_shards(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                teacher: nn.Module | None = None) -> None:
    """Write this process's shards of ``model``'s weights, ``optimizer``'s state and ``teacher``'s
    weights (an EMA teacher) under ``path``. A collective: every process calls it with the same path."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_states(model, optimizer, teacher), storage_writer=dcp.FileSystemWriter(str(path), sync_files=True))


@torch.no_grad()
def load_shards(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                teacher: nn.Module | None = None, weights: bool = True) -> None:
    """Load a sharded state (:func:`save_shards`, any number of processes) into ``model`` (unless
    ``weights`` is False: its optimizer state is still keyed by ``model``'s parameter names), and
    into ``optimizer`` and ``teacher`` when given, as this process holds them (its shards under
    FSDP, whole tensors under DDP or in one process). A collective when a process group is running."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (Path(path) / ".metadata").is_file():
        raise FileNotFoundError(f"{path} holds no sharded state")
    states = _states(model, optimizer, teacher)
    if not weights:
        del states["model"]
    with warnings.catch_warnings():  # one process without a process group reads whole tensors: what we ask
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(states, storage_reader=dcp.FileSystemReader(str(path)), no_dist=not _distributed())
    if weights:
        set_model_state_dict(model, states["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, states["optimizer"])
    if teacher is not None:
        set_model_state_dict(teacher, states["teacher"])


def read_whole(ckpt: str | Path) -> dict[str, Any]:
    """A sharded checkpoint's state as whole tensors, in one process (tests, inspection):
    ``{"model": {name: tensor}, "optimizer": {"state": {name: {...}}, "param_groups": [...]},
    "teacher": {name: tensor}}`` (``teacher`` only for an EMA teacher), keyed by parameter name."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(shards_dir(ckpt)), str(Path(tmp) / "state.pt"))
        return torch.load(Path(tmp) / "state.pt", weights_only=True)


def export(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the weights of sharded checkpoint ``path`` (or of a run directory's newest complete
    checkpoint) as a model directory ``from_pretrained`` loads (default ``<checkpoint>/../export-step-N``),
    in one process: each tensor is read whole from the shards of every process. Atomic (a temporary
    directory renamed into place); the checkpoint itself is not changed."""
    from denser.trainers import checkpoint as ckpt
    from denser.trainers.models import load_model

    found = ckpt.checkpoint_of(path)
    if found is None or not has_shards(found):
        raise ValueError(f"{path}: no sharded checkpoint there (an FSDP run's, with state/{SHARDS}/); a checkpoint "
                         "of one process or DDP holds its model in model/ already")
    ckpt.verify_checkpoint(found)
    out = Path(out) if out else found.parent.parent / f"export-step-{ckpt.checkpoint_step(found):06d}"
    if out.exists():
        raise ValueError(f"{out} exists; remove it or give another --output")
    model, tokenizer = load_model(str(found / "model"), weights=False)
    load_shards(shards_dir(found), model=model)
    return ckpt.write_model_dir(out, model, tokenizer)
