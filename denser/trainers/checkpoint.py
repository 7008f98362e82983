"""Atomic checkpoints: written to a temporary directory, then renamed into place.

A checkpoint ``<run>/checkpoints/step-000012/`` holds the model (``save_pretrained``, safetensors,
loadable by ``AutoModelForCausalLM.from_pretrained``), the tokenizer, and ``state/``: optimizer,
scheduler, RNG streams, the EMA teacher and ``trainer_state.json`` (step, metrics rows written).
A ``COMPLETE`` marker is the last file written before the rename, so a directory without it (a
kill during the write) is never loaded. Older checkpoints beyond ``keep_last`` are removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE"


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir, step: int, *, model, tokenizer, optimizer, scheduler, trainer_state: dict,
                    teacher_state: dict[str, torch.Tensor] | None, keep_last: int) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones; returns its directory."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:06d}-", dir=final.parent))
    try:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        state = tmp / "state"
        state.mkdir()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   state / "train_state.pt")
        if teacher_state is not None:
            save_file({k: v.contiguous() for k, v in teacher_state.items()}, str(state / "teacher.safetensors"))
        (state / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        _fsync_tree(tmp)
        (tmp / COMPLETE).write_text(str(step))
        if final.exists():  # a re-save of the same step (e.g. the final checkpoint)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune(run_dir, keep_last)
    return final


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def complete_checkpoints(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def prune(run_dir, keep_last: int) -> None:
    root = Path(run_dir) / "checkpoints"
    for p in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step-*"):  # leftovers of a killed write
        shutil.rmtree(p, ignore_errors=True)


def load_train_state(ckpt: Path) -> tuple[dict, dict, dict[str, torch.Tensor] | None]:
    """``(train_state {optimizer, scheduler, rng}, trainer_state, teacher_state or None)``."""
    state = torch.load(ckpt / "state" / "train_state.pt", weights_only=False)
    trainer_state = json.loads((ckpt / "state" / "trainer_state.json").read_text())
    teacher_file = ckpt / "state" / "teacher.safetensors"
    teacher = load_file(str(teacher_file)) if teacher_file.exists() else None
    return state, trainer_state, teacher
