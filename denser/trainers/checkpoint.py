"""Atomic checkpoints: written to a temporary directory, then renamed into place.

A checkpoint ``<run>/checkpoints/step-000012/`` holds the model (``save_pretrained``, safetensors,
loadable by ``AutoModelForCausalLM.from_pretrained``), the tokenizer, and ``state/``: optimizer,
scheduler, the RNG streams of every process, the EMA teacher and ``trainer_state.json`` (step,
metrics rows written, skip counters). Every file is written into ``.tmp-step-000012-*/`` and
fsynced, then a ``COMPLETE`` marker, then the directory is renamed into place (one atomic rename)
and its parent fsynced. A kill or a full disk at any point before the rename leaves only a
temporary directory, which is never loaded and is removed by the next save; the previous
checkpoint is untouched. Older checkpoints beyond ``keep_last`` are removed after a save.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from denser.trainers.io import atomic_write_text, fsync_dir, fsync_file

COMPLETE = "COMPLETE"
STEP_RE = re.compile(r"^step-(\d+)$")
OLD_RE = re.compile(r"^\.old-step-(\d+)-")
TMP_PREFIX = ".tmp-step-"
OLD_PREFIX = ".old-step-"
STATE_FILES = ("train_state.pt", "trainer_state.json")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read (full disk, missing files)."""


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step of a checkpoint directory (``step-000012`` -> 12, also for ``.old-step-000012-*``)."""
    name = Path(path).name
    m = STEP_RE.match(name) or OLD_RE.match(name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory (step-NNNNNN)")
    return int(m.group(1))


# ----------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG stream of this process: python, numpy, torch CPU and CUDA."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any] | list[dict[str, Any]], rank: int = 0) -> None:
    """Restore :func:`rng_state`; ``state`` may be a list with one entry per process (``rank`` picks)."""
    if isinstance(state, (list, tuple)):
        if rank >= len(state):
            raise CheckpointError(f"the checkpoint holds RNG states of {len(state)} process(es), not of process {rank}; "
                                  "resume with the number of processes the run was started with")
        state = state[rank]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------- write


@contextlib.contextmanager
def quiet_transformers():
    """No "Writing model shards" / "Loading weights" progress bars in a training log."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def save_checkpoint(run_dir, step: int, *, model, tokenizer, optimizer, scheduler, trainer_state: dict,
                    teacher_state: dict[str, torch.Tensor] | None, keep_last: int,
                    rng: dict[str, Any] | list[dict[str, Any]] | None = None,
                    model_state: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones; returns its directory.

    ``rng``: the RNG states to store (one per process); default this process's :func:`rng_state`.
    ``model_state``, ``optimizer_state``: whole tensors gathered from sharded ones (FSDP), stored
    instead of ``model``'s and ``optimizer``'s own (the checkpoint is then that of one process).
    On any error (``OSError`` of a full disk included) the temporary directory is removed, the
    previous checkpoints are untouched, and the error is re-raised.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step:06d}-", dir=final.parent))
    aside = None
    try:
        with quiet_transformers():
            model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=model_state)
            tokenizer.save_pretrained(tmp / "model")
        state = tmp / "state"
        state.mkdir()
        optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": rng if rng is not None else [rng_state()]}, state / "train_state.pt")
        if teacher_state is not None:
            save_file({k: v.contiguous() for k, v in teacher_state.items()}, str(state / "teacher.safetensors"))
        (state / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        _fsync_tree(tmp)
        atomic_write_text(tmp / COMPLETE, str(step))
        if final.exists():  # a re-save of the same step: move the old one aside, never delete it first
            aside = final.parent / f"{OLD_PREFIX}{step:06d}-{tmp.name[len(TMP_PREFIX) + 7:]}"
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    prune(run_dir, keep_last)
    return final


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fsync_file(path)
    for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(path)


# ---------------------------------------------------------------------------------------- find


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE).is_file()


def complete_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first.

    A directory without ``COMPLETE`` is never listed. A step whose re-save was killed between its
    two renames is found in its ``.old-step-*`` directory.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and _is_complete(p):
            found[int(m.group(1))] = p
    for p in root.iterdir():
        m = OLD_RE.match(p.name)
        if m and _is_complete(p):
            found.setdefault(int(m.group(1)), p)
    return [found[s] for s in sorted(found)]


def incomplete_checkpoints(run_dir) -> list[Path]:
    """Leftovers of interrupted writes (never loaded; removed by the next save)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and (p.name.startswith(TMP_PREFIX) or (STEP_RE.match(p.name) and not _is_complete(p))))


def latest_checkpoint(run_dir) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; remove leftovers of interrupted writes."""
    root = Path(run_dir) / "checkpoints"
    complete = complete_checkpoints(run_dir)
    for p in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f"{OLD_PREFIX}*"):
        m = OLD_RE.match(p.name)
        if m and _is_complete(checkpoint_dir(run_dir, int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------- read


def load_train_state(ckpt: Path) -> tuple[dict, dict, dict[str, torch.Tensor] | None]:
    """``(train_state {optimizer, scheduler, rng}, trainer_state, teacher_state or None)``."""
    ckpt = Path(ckpt)
    missing = [f for f in STATE_FILES if not (ckpt / "state" / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is missing state/{', state/'.join(missing)}; it cannot be resumed from")
    state = torch.load(ckpt / "state" / "train_state.pt", weights_only=False)
    trainer_state = json.loads((ckpt / "state" / "trainer_state.json").read_text())
    teacher_file = ckpt / "state" / "teacher.safetensors"
    teacher = load_file(str(teacher_file)) if teacher_file.exists() else None
    return state, trainer_state, teacher
