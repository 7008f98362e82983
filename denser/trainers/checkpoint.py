"""Atomic, self-verifying checkpoints that run no code when loaded.

A checkpoint ``<run>/checkpoints/step-000012/`` holds the model (``save_pretrained``, safetensors,
loadable by ``AutoModelForCausalLM.from_pretrained``), the tokenizer, and ``state/``:

    train_state.safetensors   every tensor of the training state: optimizer moments, RNG streams
    train_state.json          everything else (optimizer param groups, scheduler, RNG positions),
                              with ``{"__tensor__": key}`` where a tensor of the file above belongs
    teacher.safetensors       the EMA teacher's weights (objectives with a teacher)
    trainer_state.json        step, metrics rows written, skip counters

Under FSDP each process writes its own shards instead (``trainers/sharded_checkpoint.py``):
``state/shards/`` holds the policy's weights, the AdamW moments and the EMA teacher (torch's
distributed checkpoint, one file per process), ``train_state`` keeps the scheduler and RNG streams,
and ``model/`` the configuration and tokenizer, with the weights exported into the final checkpoint.

Nothing is pickled: loading a checkpoint reads tensors and JSON and can run no code, so a run
directory from a shared drive or a download is safe to ``--resume``. Checkpoints of earlier
versions (``state/train_state.pt``, a pickle) are refused with one line, never unpickled.

Writing: every file goes into ``.tmp-step-000012-*/`` and is fsynced; then the ``COMPLETE`` marker
records the size and SHA-256 of every file (a JSON manifest); then the directory is renamed into
place (one atomic rename) and its parent fsynced. A kill or a full disk at any point before the
rename leaves only a temporary directory, which is never loaded and is removed by the next save;
the previous checkpoint is untouched. Older checkpoints beyond ``keep_last`` are removed after a
save. Reading for a resume (:func:`latest_checkpoint` with ``verify=True``) checks the manifest
and falls back to the previous checkpoint when the newest one was truncated, corrupted or lost a
file on the way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from denser.trainers.io import atomic_write_text, fsync_dir, fsync_file
from denser.trainers.state_codec import (  # the errors and the state encoding (re-exported: ckpt.CheckpointError)
    CheckpointError,
    DamagedCheckpointError,
    LegacyCheckpointError,
    decode_state,
    encode_state,
)

__all__ = ["CheckpointError", "DamagedCheckpointError", "LegacyCheckpointError", "checkpoint_dir", "checkpoint_step",
           "complete_checkpoints", "decode_state", "encode_state", "file_digest", "incomplete_checkpoints",
           "latest_checkpoint", "load_train_state", "manifest", "new_tmp", "prune", "read_manifest", "rng_state",
           "save_checkpoint", "set_rng_state", "verify_checkpoint"]

COMPLETE = "COMPLETE"
STEP_RE = re.compile(r"^step-(\d+)$")
OLD_RE = re.compile(r"^\.old-step-(\d+)-")
TMP_PREFIX = ".tmp-step-"
OLD_PREFIX = ".old-step-"
FORMAT = 2  # 1: state/train_state.pt (a pickle) and a COMPLETE marker holding the step only
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
TRAINER_STATE = "trainer_state.json"
STATE_FILES = (STATE_TENSORS, STATE_JSON, TRAINER_STATE)
LEGACY_STATE = "train_state.pt"
HASH = "sha256"  # hardware-accelerated on current x86 and ARM CPUs; `sha256sum` checks it by hand
HASH_BLOCK = 1 << 22


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


# -------------------------------------------------------------------------------------- manifest


def file_digest(path: Path) -> str:
    """The SHA-256 of a file, read in 4 MiB blocks (hashlib releases the GIL: files hash in parallel)."""
    h = hashlib.new(HASH)
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _digests(root: Path, rels: list[str]) -> list[str]:
    if len(rels) <= 1:
        return [file_digest(root / r) for r in rels]
    with ThreadPoolExecutor(max_workers=min(8, len(rels), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda r: file_digest(root / r), rels))


def manifest(root: Path, step: int) -> dict[str, Any]:
    """What ``COMPLETE`` records: the format, the step and the size and hash of every file under
    ``root`` (but ``COMPLETE`` itself)."""
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != COMPLETE)
    digests = _digests(root, rels)
    files = {r: {"size": (root / r).stat().st_size, HASH: d} for r, d in zip(rels, digests)}
    return {"format": FORMAT, "step": step, "hash": HASH, "files": files}


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    """The manifest in ``COMPLETE``, or None for a checkpoint of the earlier format (the step only)."""
    marker = Path(ckpt) / COMPLETE
    try:
        text = marker.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DamagedCheckpointError(f"checkpoint {ckpt} is damaged: its {COMPLETE} marker cannot be read ({e})") from None
    if text.strip().isdigit():
        return None
    try:
        data = json.loads(text)
        ok = isinstance(data, dict) and isinstance(data.get("files"), dict) and data.get("hash") == HASH
    except ValueError:
        ok = False
    if not ok:
        raise DamagedCheckpointError(f"checkpoint {ckpt} is damaged: its {COMPLETE} marker is not a manifest")
    return data


def verify_checkpoint(ckpt: Path) -> None:
    """Check every file of ``ckpt`` against its manifest (sizes first, then hashes).

    Raises :class:`DamagedCheckpointError` naming the first file that is missing, of the wrong
    size or with the wrong hash, and :class:`LegacyCheckpointError` for a checkpoint of the
    earlier format (a pickled training state, no manifest)."""
    ckpt = Path(ckpt)
    data = read_manifest(ckpt)
    if data is None:
        raise LegacyCheckpointError(_legacy_message(ckpt))
    files = data["files"]
    for rel, info in files.items():
        path = ckpt / rel
        if not path.is_file():
            raise DamagedCheckpointError(f"checkpoint {ckpt} is damaged: {rel} is missing")
        size = path.stat().st_size
        if size != info.get("size"):
            raise DamagedCheckpointError(f"checkpoint {ckpt} is damaged: {rel} has {size} bytes, "
                                         f"its manifest records {info.get('size')} (truncated?)")
    for f in STATE_FILES:
        if f"state/{f}" not in files:
            raise DamagedCheckpointError(f"checkpoint {ckpt} is damaged: its manifest lists no state/{f}")
    rels = list(files)
    for rel, digest in zip(rels, _digests(ckpt, rels)):
        if digest != files[rel].get(HASH):
            raise DamagedCheckpointError(f"checkpoint {ckpt} is damaged: {rel} does not match its {HASH} "
                                         "(corrupted on disk or in transfer)")


def _legacy_message(ckpt: Path) -> str:
    return (f"checkpoint {ckpt} was written by an earlier denser: its training state is a pickle "
            f"(state/{LEGACY_STATE}), and loading a pickle can run arbitrary code, so it is never loaded; "
            f"resume it with the denser version that wrote it, or start a new run from its weights "
            f"(--model {ckpt / 'model'})")


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
                    model_state: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None,
                    merged=None, tmp: Path | None = None, sharded: bool = False) -> Path:
    """Write checkpoint ``step`` atomically and prune old ones; returns its directory.

    ``merged``: a model saved as ``merged/`` beside ``model/`` (a LoRA run's adapter merged into its
    base, ``--merge-lora``), with the tokenizer.
    ``rng``: the RNG states to store (one per process); default this process's :func:`rng_state`.
    ``model_state``, ``optimizer_state``: whole tensors gathered from sharded ones (FSDP), stored
    instead of ``model``'s and ``optimizer``'s own (the checkpoint is then that of one process).
    ``sharded`` (FSDP): the processes have written their shards into ``tmp`` (:func:`new_tmp`, the
    directory they share; ``state/shards/``), which holds the weights, the optimizer and the EMA
    teacher; ``model/`` gets the configuration and tokenizer, and the weights when ``model_state``
    (gathered) is given, the export of a final checkpoint.
    On any error (``OSError`` of a full disk included) the temporary directory is removed, the
    previous checkpoints are untouched, and the error is re-raised.
    """
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_tmp(run_dir, step) if tmp is None else Path(tmp)
    aside = None
    try:
        with quiet_transformers():
            if sharded and model_state is None:  # the weights are in state/shards/ only
                model.config.save_pretrained(tmp / "model")
                model.generation_config.save_pretrained(tmp / "model")
            else:
                model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=model_state)
            tokenizer.save_pretrained(tmp / "model")
            if merged is not None:
                merged.save_pretrained(tmp / "merged", safe_serialization=True)
                tokenizer.save_pretrained(tmp / "merged")
        state = tmp / "state"
        state.mkdir(exist_ok=True)
        if not sharded and optimizer_state is None:
            optimizer_state = optimizer.state_dict()
        tree, tensors = encode_state({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                                      "rng": rng if rng is not None else [rng_state()]})
        save_file(tensors, str(state / STATE_TENSORS))
        (state / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": tree}))
        if teacher_state is not None:
            save_file({k: v.contiguous() for k, v in teacher_state.items()}, str(state / "teacher.safetensors"))
        (state / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        _fsync_tree(tmp)
        atomic_write_text(tmp / COMPLETE, json.dumps(manifest(tmp, step), indent=1))
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


def new_tmp(run_dir, step: int) -> Path:
    """A fresh temporary directory for checkpoint ``step`` (renamed into place when complete)."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step:06d}-", dir=final.parent))


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


def latest_checkpoint(run_dir, *, verify: bool = False, note: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint of a run, or None.

    ``verify=True`` (what ``--resume`` uses) checks it against its manifest; a damaged one is
    reported with ``note`` (one line) and the previous one is tried. Raises
    :class:`DamagedCheckpointError` when complete checkpoints exist but none is intact, and
    :class:`LegacyCheckpointError` when the newest intact-looking one has a pickled state."""
    found = complete_checkpoints(run_dir)
    if not verify:
        return found[-1] if found else None
    damaged = []
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except DamagedCheckpointError as e:
            damaged.append(str(e))
            if note is not None:
                note(f"{e}; trying the previous checkpoint")
            continue
        return path
    if damaged:
        only = "the only checkpoint" if len(damaged) == 1 else f"all {len(damaged)} checkpoints"
        raise DamagedCheckpointError(f"{only} of {run_dir} damaged: {damaged[0]}; there is nothing intact to "
                                     "resume from: restore the checkpoint from a copy, or start over with --overwrite")
    return None


def checkpoint_of(path: str | os.PathLike) -> Path | None:
    """``path`` itself when it is a checkpoint (it has ``model/``), else the newest intact checkpoint of
    the run directory ``path`` (verified against its manifest); None when it has none. What the commands
    that read one checkpoint (``merge-lora``, ``export``) accept."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{path}: no such directory; give a denser run directory or one of its checkpoints")
    return p if (p / "model").is_dir() else latest_checkpoint(p, verify=True)


def write_model_dir(out: Path, model, tokenizer, extra: dict[str, str] | None = None) -> Path:
    """``model`` and ``tokenizer`` saved as a ``from_pretrained`` directory at ``out`` (safetensors),
    atomically: written into a temporary sibling, made readable by all as a checkpoint is, renamed
    into place and the rename made durable. ``extra``: more files, name -> text. Refuses an existing
    ``out``."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} exists; remove it or give another --output")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


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


def saved_batch(ckpt: Path) -> tuple[int, int] | None:
    """``(processes, prompts per process)`` of the run that wrote checkpoint ``ckpt`` (its trainer
    state; None for a checkpoint of an earlier denser, which did not record them)."""
    try:
        state = json.loads((Path(ckpt) / "state" / TRAINER_STATE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # load_train_state names the problem
    if not isinstance(state, dict) or "processes" not in state or "prompts_per_step" not in state:
        return None
    return int(state["processes"]), int(state["prompts_per_step"])


def load_train_state(ckpt: Path) -> tuple[dict, dict, dict[str, torch.Tensor] | None]:
    """``(train_state {optimizer, scheduler, rng}, trainer_state, teacher_state or None)``.

    Reads safetensors and JSON only: no code can run. A checkpoint of the earlier format (a
    pickled ``state/train_state.pt``) raises :class:`LegacyCheckpointError` without being read."""
    ckpt = Path(ckpt)
    state_dir = ckpt / "state"
    missing = [f for f in STATE_FILES if not (state_dir / f).is_file()]
    if missing and (state_dir / LEGACY_STATE).exists():
        raise LegacyCheckpointError(_legacy_message(ckpt))
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is missing state/{', state/'.join(missing)}; it cannot be resumed from")
    try:
        meta = json.loads((state_dir / STATE_JSON).read_text())
        trainer_state = json.loads((state_dir / TRAINER_STATE).read_text())
        tensors = load_file(str(state_dir / STATE_TENSORS))
        teacher_file = state_dir / "teacher.safetensors"
        teacher = load_file(str(teacher_file)) if teacher_file.exists() else None
    except (OSError, ValueError, UnicodeDecodeError) as e:  # safetensors raises its own error types too
        raise DamagedCheckpointError(f"checkpoint {ckpt} is damaged: {str(e).splitlines()[0]}") from None
    except Exception as e:  # noqa: BLE001 - safetensors' SafetensorError on a bad header
        raise DamagedCheckpointError(f"checkpoint {ckpt} is damaged: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "state" not in meta:
        raise CheckpointError(f"checkpoint {ckpt}: state/{STATE_JSON} is not a format-{FORMAT} training state")
    state = decode_state(meta["state"], tensors)
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= state.keys():
        raise CheckpointError(f"checkpoint {ckpt}: state/{STATE_JSON} lacks the optimizer, scheduler or RNG state")
    return state, trainer_state, teacher
