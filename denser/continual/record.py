"""The record of a continual run (``<run>/continual.json``) and what ``--resume`` reads from it.

The record is rewritten after every measured stage (``stages``, ``accuracy_matrix``; at the end
``metrics`` and ``status: complete``). While stage k trains, it also says so: ``in_progress`` =
``{"stage": k, "task": ..., "dir": "stages/NN-task"}``, written before the stage's trainer starts
and removed when the stage's measurement is recorded. So ``--resume`` knows where a stopped run was:

- stages ``0..done`` measured, nothing in progress (every record of denser before issue 16 reads
  this way): stage ``done + 1`` starts from its beginning (its directory, if any, is replaced);
- stage ``done + 1`` in progress: its trainer resumes its own directory from the newest complete
  checkpoint (none yet: from its beginning; a finished stage whose measurement was interrupted: no
  training left, the measurement is done again).

The finished record of a stopped and resumed run equals the record of a run never stopped, but
for wall-clock times, ``command`` and ``config.resume``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from denser.analysis.report import write_run_report
from denser.continual.config import ContinualConfig
from denser.trainers.config import TrainConfig
from denser.trainers.io import remove_run_files
from denser.trainers.tracking import TENSORBOARD_DIR

FORMAT_VERSION = 1
# what a continual run writes
RUN_FILES = ("continual.json", "report.md", "plots", "responses", "stages", "teacher_probe", TENSORBOARD_DIR)
IN_PROGRESS = "in_progress"


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def finite(x):
    """NaN/inf -> None, recursively (continual.json is strict JSON)."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def prepare_run_dir(run_dir: Path, identity: dict[str, Any], *, resume: bool, overwrite: bool,
                    log: Callable[[str], Any]) -> dict | None:
    """Create the run directory; return the previous record when resuming.

    ``identity``: what a resumed run must share with the record (objective, tasks, model)."""
    path = run_dir / "continual.json"
    if (run_dir / "config.yaml").exists():
        raise ValueError(f"{run_dir} holds a `denser train` run; choose another --output-dir")
    if path.exists() and not (resume or overwrite):
        raise ValueError(f"{run_dir} already holds a continual run; pass --resume to continue it, "
                         "--overwrite to replace it, or choose another --output-dir")
    if overwrite:  # only what a continual run writes, never the rest of the directory
        remove_run_files(run_dir, RUN_FILES)
    previous = None
    if path.exists() and resume:
        previous = json.loads(path.read_text())
        diffs = [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in identity.items() if previous.get(k) != v]
        if diffs:
            raise ValueError(f"--resume: {run_dir} holds a different continual run ({'; '.join(diffs)})")
    elif resume:
        log(f"--resume: no continual run in {run_dir}; starting from stage 0")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "responses").mkdir(exist_ok=True)
    return previous


def record_header(objective, cfg: TrainConfig, ccfg: ContinualConfig, command: str | None) -> dict:
    """A new record: what the run is, nothing measured yet."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": "denser.continual",
        "objective": objective.name,
        "objective_args": dataclasses.asdict(objective),
        "model": cfg.model,
        "train_tasks": list(ccfg.tasks),
        "heldout_tasks": list(ccfg.eval_tasks),
        "columns": list(ccfg.tasks) + list(ccfg.eval_tasks),
        "continual": dataclasses.asdict(ccfg),
        "config": dataclasses.asdict(cfg),
        "eval": {"eval_size": cfg.eval_size, "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy",
                 "sampled": ({"samples": cfg.eval_samples, "temperature": cfg.eval_temperature,
                              "top_p": cfg.eval_top_p, "seed": cfg.seed, "stages": ccfg.sampled_eval_stages}
                             if cfg.eval_samples and ccfg.sampled_eval_stages != "none" else None),
                 "similarity": "difflib.SequenceMatcher ratio vs the initial model's response",
                 "kl": "mean per-token KL(current || initial) on the current model's greedy responses",
                 "ngram": 3},
        "command": command,
        "status": "running",
        "stages": [],
        "accuracy_matrix": [],
        "metrics": None,
    }


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: after stage ``done`` (measured); ``in_stage``: stage
    ``done + 1`` had started, and its trainer resumes its own directory."""

    done: int
    in_stage: bool


def resume_point(previous: dict, stage_dir: Callable[[int, str], Path], tasks: list[str],
                 log: Callable[[str], Any]) -> ResumePoint:
    """What a previous record (with at least stage 0 measured) says about where to continue."""
    done = len(previous["stages"]) - 1
    started = previous.get(IN_PROGRESS) or None
    if started is None or done >= len(tasks):
        return ResumePoint(done, False)
    k = done + 1
    if started.get("stage") != k or started.get("task") != tasks[k - 1]:
        log(f"--resume: the record says stage {started.get('stage')} ({started.get('task')}) was in progress, not "
            f"stage {k} ({tasks[k - 1]}); stage {k} starts from its beginning")
        return ResumePoint(done, False)
    return ResumePoint(done, stage_dir(k, tasks[k - 1]).is_dir())


def mark_in_progress(run_dir: Path, record: dict, stage: int, task: str, stage_dir: Path) -> None:
    """Record (continual.json only, no report) that ``stage`` is training in ``stage_dir``."""
    record[IN_PROGRESS] = {"stage": stage, "task": task, "dir": stage_dir.relative_to(run_dir).as_posix()}
    write_json(run_dir / "continual.json", finite(record))


def save_record(run_dir: Path, record: dict, log: Callable[[str], Any]) -> None:
    """``continual.json`` and the report rendered from it."""
    write_json(run_dir / "continual.json", finite(record))
    try:
        write_run_report(run_dir, record=record)
    except Exception as e:  # a plotting problem must not lose a training run
        log(f"warning: could not render the report of {run_dir}: {type(e).__name__}: {e}")
