"""Crash-safe file writes, shared by the run directory, checkpoints and the continual runner.

``atomic_write_text`` writes through a temporary file in the same directory, fsyncs it and
renames it into place: a kill at any moment leaves either the old file or the new one, never half
of one. The ``fsync_*`` helpers make what was written survive a power cut before a rename relies
on it (checkpoints: every file, then the directory).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically: a temporary file, fsync, one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's written data to disk (nothing when it does not exist)."""
    if not os.path.exists(path):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def remove_run_files(run_dir: str | os.PathLike, names: Iterable[str]) -> None:
    """``--overwrite``: delete the files and folders a run writes (``names``, relative to
    ``run_dir``), never anything else in the directory."""
    for name in names:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
