"""The run directory of ``denser train``: ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/``.

:meth:`RunDir.check` refuses a directory that holds another run and, with ``--resume``, finds
the checkpoint to resume from; it writes nothing, so a run that fails its checks before any
compute leaves no trace. :meth:`RunDir.init` then creates the directory and its
``config.yaml``. ``metrics.jsonl`` holds one JSON row per rollout batch (and the eval rows); a
checkpoint records how many rows were written before it, and a resume cuts the file back to
that many (:meth:`RunDir.truncate_metrics`), so the rows of steps after the checkpoint (or half
a row of a killed write) never count twice. Only the main process writes; every process keeps
the row count, and ``barrier`` (``accelerator.wait_for_everyone``) keeps them in step.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Callable

import yaml

from denser.trainers import checkpoint as ckpt
from denser.trainers.io import atomic_write_text, fsync_file, remove_run_files

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "tensorboard")  # what a run directory holds (and --overwrite removes)
# Differences between a run's config.yaml and a --resume that make it another run.
RESUME_MUST_MATCH = ("objective", "model", "task")
# Settings that may differ on a --resume without a note.
RESUME_MAY_CHANGE = frozenset({"resume", "overwrite", "progress", "output_dir", "reward_workers"})


class RunDir:
    """One run's directory. ``log`` prints a message (on the main process only)."""

    def __init__(self, path: str | Path, *, is_main: bool = True, log: Callable[[str], Any] = print,
                 barrier: Callable[[], Any] = lambda: None, world: int = 1,
                 broadcast: Callable[[Any], Any] = lambda obj: obj, gather: Callable[[Any], list] = lambda obj: [obj]):
        """``world`` processes; ``broadcast(obj)``: the main process's ``obj`` on every process;
        ``gather(obj)``: every process's ``obj``, in rank order, on every process (collectives)."""
        self.path = Path(path)
        self.is_main, self.log, self.barrier = is_main, log, barrier
        self.world, self.broadcast, self.gather = world, broadcast, gather
        self.metrics_rows = 0  # rows of metrics.jsonl written so far (on every process)
        self._shared: bool | None = None  # shared(): asked once

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def note(self, message: str) -> None:
        """A message every process would print alike: printed once, by the main process."""
        if self.is_main:
            self.log(message)

    def check(self, run_config: dict[str, Any], *, resume: bool, overwrite: bool, steps: int) -> Path | None:
        """Refuse a directory that holds another run; with ``resume``, the checkpoint to resume from.

        ``run_config`` is what :meth:`init` will write to config.yaml. Writes nothing."""
        run = self.path
        if run.exists() and not run.is_dir():
            raise ValueError(f"--output-dir {run} is a file, not a directory")
        holds = [n for n in RUN_FILES if (run / n).exists()]
        if holds and not resume and not overwrite:
            raise ValueError(f"{run} already holds a run ({', '.join(holds)}); pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --output-dir")
        if not resume:
            return None
        existing = run / "config.yaml"
        if existing.exists():
            self._check_same_run(existing, run_config)
        for p in ckpt.incomplete_checkpoints(run):
            self.note(f"--resume: ignoring {p} (an interrupted checkpoint write; removed at the next save)")
        latest = self._verified_latest(run)
        if latest is None:
            self.note(f"--resume: no complete checkpoint in {run}; starting from step 0")
            return None
        step = ckpt.checkpoint_step(latest)
        if step > steps:
            raise ValueError(f"--resume: the newest checkpoint {latest} is at step {step}, beyond --steps {steps}; "
                             f"pass --steps {step} or more")
        return latest

    def _verify(self, run: Path) -> Path | None | ValueError:
        """The newest checkpoint that matches its manifest (damaged ones are named and skipped), or
        the error to raise (damaged or pickled, an older denser's)."""
        try:
            return ckpt.latest_checkpoint(run, verify=True, note=lambda m: self.note(f"--resume: {m}"))
        except ckpt.CheckpointError as e:
            return ValueError(f"--resume: {e}")

    def _sees_main_probe(self, run: Path) -> bool:
        """Whether this process sees a file the main process writes in ``run`` (a collective): true on
        a filesystem they share, false on a node's own disk (or where ``run`` does not exist yet)."""
        probe = run / f".denser-probe-{uuid.uuid4().hex}" if self.is_main and run.is_dir() else None
        if probe is not None:
            probe.write_text("")
        name = self.broadcast(probe.name if probe is not None else None)
        seen = self.is_main or (name is not None and (run / name).exists())
        self.barrier()  # every process looked for the probe
        if probe is not None:
            probe.unlink()
        return seen

    def shared(self) -> bool:
        """Whether every process sees the run directory the main process writes (asked once, a
        collective): FSDP checkpoints are then written by every process into one directory, else
        gathered and written by the main one."""
        if self._shared is None:
            if self.is_main:
                self.path.mkdir(parents=True, exist_ok=True)
            self.barrier()
            self._shared = self.world <= 1 or all(self.gather(self._sees_main_probe(self.path)))
        return self._shared

    def _verified_latest(self, run: Path) -> Path | None:
        """:meth:`_verify`, done once: the main process hashes the checkpoint's files and the others
        take its verdict when they see the same files (a probe file the main process writes in the
        run directory is visible to them: a shared filesystem); a process that does not (a node's
        own disk) verifies what it will read itself. Every process must end on the same checkpoint."""
        if self.world <= 1:
            verdict = self._verify(run)
        else:
            shared = self._sees_main_probe(run)
            main = self.broadcast(self._verify(run) if self.is_main else None)
            verdict = main if shared else self._verify(run)
            seen = self.gather(verdict.name if isinstance(verdict, Path) else None)
            if not isinstance(verdict, ValueError) and len(set(seen)) > 1:
                verdict = ValueError(f"--resume: the processes see different newest intact checkpoints in {run} "
                                     f"({', '.join(str(x) for x in seen)}, in rank order): give every machine "
                                     "the same checkpoints")
        if isinstance(verdict, ValueError):  # before any compute
            raise verdict
        return verdict

    def _check_same_run(self, existing: Path, new: dict[str, Any]) -> None:
        try:
            old = yaml.safe_load(existing.read_text()) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--resume: cannot read {existing} ({str(e).splitlines()[0]})") from None
        if not isinstance(old, dict):
            raise ValueError(f"--resume: {existing} is not a run config (a mapping)")
        diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_MUST_MATCH if old.get(k) != new.get(k)]
        if diffs:
            raise ValueError(f"--resume: {self.path} holds a different run ({'; '.join(diffs)}); resume with the same "
                             f"objective, model and task (e.g. --config {existing} --resume), or use another "
                             "--output-dir")
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items()
                   if k not in RESUME_MAY_CHANGE and k != "objective_args" and k in old and old[k] != v]
        old_args = old.get("objective_args") or {}
        changed += [f"{k} {old_args.get(k)!r} -> {v!r}" for k, v in new["objective_args"].items()
                    if k in old_args and old_args[k] != v]
        if changed:
            self.note(f"--resume: settings changed since the run started: {'; '.join(changed)}")

    def recorded(self, key: str) -> Any:
        """The value ``key`` has in the run's config.yaml (None when absent or unreadable)."""
        try:
            old = yaml.safe_load((self.path / "config.yaml").read_text()) or {}
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            return None
        return old.get(key) if isinstance(old, dict) else None

    def init(self, run_config: dict[str, Any], *, fresh: bool, overwrite: bool) -> None:
        """Create the directory and its config.yaml (after every check has passed). ``overwrite``
        removes what a run writes (never the rest of the directory); ``fresh`` (no checkpoint to
        resume from) starts metrics.jsonl over."""
        run = self.path
        self.barrier()  # every process has run check() before the main one writes (nothing else may sync them)
        if self.is_main:
            if overwrite:
                remove_run_files(run, RUN_FILES)
            run.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run / "config.yaml", yaml.safe_dump(run_config, sort_keys=False))
            if fresh and self.metrics_path.exists():  # --resume without a checkpoint starts over
                self.metrics_path.unlink()
        self.barrier()

    def append_metrics(self, row: dict[str, Any]) -> None:
        """Append one row to metrics.jsonl (main process) and count it (every process)."""
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.metrics_rows += 1

    def truncate_metrics(self, rows: int) -> None:
        """Keep the first ``rows`` rows of metrics.jsonl: those written before the checkpoint."""
        path = self.metrics_path
        if self.is_main:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) < rows:
                self.log(f"warning: {path} has {len(lines)} rows but the checkpoint counted {rows}; "
                         "rows written before the checkpoint are missing")
            if len(lines) > rows:  # rows of steps after the checkpoint (or half a row of a killed write)
                atomic_write_text(path, "".join(line + "\n" for line in lines[:rows]))
        self.barrier()

    def sync_metrics(self) -> None:
        """Make the rows written so far durable (before a checkpoint counts them)."""
        fsync_file(self.metrics_path)
