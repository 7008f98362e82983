"""Experiment trackers (TensorBoard, trackio, W&B, MLflow) through accelerate's tracking API.

``--report-to tensorboard,wandb`` (``TrainConfig.report_to``; ``none`` by default) sends a run to
those trackers; ``metrics.jsonl`` is written either way. A :class:`Tracker` holds one tracker run:

- at its first log it calls ``accelerator.init_trackers(project, config=...)`` with the run's
  config (``config.yaml``) flattened to ``key/sub_key: value`` pairs, the hyper-parameters;
- every metrics row (the rows of ``metrics.jsonl``: reward, loss, the objective's metrics, timings,
  and ``eval_accuracy`` where an eval ran) goes to ``accelerator.log(row, step=row["step"])``;
- a few completions of every step (:data:`SAMPLES_PER_STEP`, with prompt and reward) go as text:
  a markdown table in TensorBoard (``add_text``), a table in W&B and trackio, a text artifact in MLflow.

Where the data goes: TensorBoard event files in ``<run>/tensorboard/<project>/``
(``tensorboard --logdir runs``); W&B, trackio and MLflow where their own settings say (``WANDB_*``,
``TRACKIO_*``, ``MLFLOW_TRACKING_URI``), as project ``--tracker-project`` (MLflow: experiment),
the run named after its directory.

``tracker.scoped(prefix, step_offset)`` is a view of the same tracker run that prefixes every key
and shifts every step: ``denser continual`` logs its whole sequence as one run, each stage's
trainer through a view (``stage1/addition/reward_mean``, ...), steps counted over the sequence.

The tracker packages are optional extras (``pip install 'denser[track]'`` for TensorBoard, or
``denser[wandb]``, ``denser[mlflow]``, ``denser[trackio]``); :func:`report_to_problems` names a
missing one before any compute. accelerate itself is imported when the first tracker starts: the
config check runs at command-line start-up, which should not wait for it.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Sequence

import torch

#: ``--report-to`` name -> (module that must be importable, the extra that installs it)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "track"),
    "trackio": (("trackio",), "trackio"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
}
#: completions of each step logged as text
SAMPLES_PER_STEP = 4
TENSORBOARD_DIR = "tensorboard"  # inside the run directory

__all__ = ["SAMPLES_PER_STEP", "TRACKERS", "Tracker", "flatten_config", "parse_report_to", "report_to_problems"]


def parse_report_to(text: str) -> list[str]:
    """``"tensorboard,wandb"`` -> ``["tensorboard", "wandb"]``; ``"none"`` or ``""`` -> ``[]``.
    Raises ``ValueError`` naming an unknown tracker or a missing package."""
    problems = report_to_problems(text)
    if problems:
        raise ValueError("; ".join(problems))
    return _names(text)


def _names(text: str) -> list[str]:
    names = []
    for part in str(text).split(","):
        name = part.strip().lower()
        if name and name != "none" and name not in names:
            names.append(name)
    return names


def report_to_problems(text: str) -> list[str]:
    """What is wrong with a ``--report-to`` value (unknown names, uninstalled packages), one
    sentence each with the fix; empty when it is fine."""
    if not isinstance(text, str):
        return []  # TrainConfig's type check reports it
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    if "none" in parts and len(parts) > 1:
        return [f"--report-to {text!r}: 'none' cannot be combined with trackers"]
    problems = []
    for name in _names(text):
        if name not in TRACKERS:
            problems.append(f"--report-to: unknown tracker {name!r}; choose from none, {', '.join(TRACKERS)} "
                            "(comma-separated)")
            continue
        modules, extra = TRACKERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            problems.append(f"--report-to {name}: the {modules[0]} package is not installed; "
                            f"pip install 'denser[{extra}]' (or pip install {modules[0]}), or leave {name} out")
    return problems


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2], "d": None}`` -> ``{"a/b": 1, "c": "[1, 2]", "d": "none"}``:
    the value types every tracker takes as hyper-parameters (bool, int, float, str)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}/"))
        elif value is None:
            flat[name] = "none"
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class _TrackerRun:
    """The accelerate side of one tracker run, shared by a :class:`Tracker` and its scoped views."""

    def __init__(self, names: list[str], run_dir: Path, project: str, run_name: str, config: dict, cpu: bool):
        self.names, self.run_dir, self.project, self.run_name = names, Path(run_dir), project, run_name
        self.config, self.cpu = config, cpu
        self.accelerator = None
        self.finished = False

    def start(self):
        if self.accelerator is None:
            # imported here for start-up time (see the module docstring)
            from accelerate import Accelerator
            from accelerate.utils import ProjectConfiguration

            project = ProjectConfiguration(project_dir=str(self.run_dir),
                                           logging_dir=str(self.run_dir / TENSORBOARD_DIR))
            self.accelerator = Accelerator(cpu=self.cpu, log_with=self.names, project_config=project)
            self.accelerator.init_trackers(self.project, config=flatten_config(self.config), init_kwargs={
                "wandb": {"name": self.run_name}, "trackio": {"name": self.run_name},
                "mlflow": {"run_name": self.run_name}})
        return self.accelerator


class Tracker:
    """One tracker run, or none (``report_to`` empty: every method does nothing).

    Args:
        report_to: tracker names (a list, or ``"tensorboard,wandb"``).
        run_dir: the run directory (TensorBoard writes into ``<run_dir>/tensorboard``).
        project: the trackers' project (W&B/trackio project, MLflow experiment, TensorBoard folder).
        run_name: the tracker run's name (default: the run directory's name).
        config: the run config, logged (flattened) as hyper-parameters.
        cpu: the process runs on the CPU (as the trainer's ``Accelerator(cpu=...)``).
    """

    def __init__(self, report_to: str | Sequence[str], run_dir: str | Path, *, project: str = "denser",
                 run_name: str | None = None, config: dict | None = None, cpu: bool = False):
        names = parse_report_to(report_to) if isinstance(report_to, str) else parse_report_to(",".join(report_to))
        run_dir = Path(run_dir)
        self._run = _TrackerRun(names, run_dir, project, run_name or run_dir.resolve().name, config or {}, cpu)
        self.prefix, self.step_offset, self._owner = "", 0, True

    @classmethod
    def for_run(cls, cfg, run_dir: Path, config: dict) -> Tracker:
        """The tracker of a ``denser train`` run: ``cfg.report_to`` and ``cfg.tracker_project``."""
        return cls(cfg.report_to, run_dir, project=cfg.tracker_project, config=config,
                   cpu=cfg.cpu or not torch.cuda.is_available())

    @property
    def active(self) -> bool:
        return bool(self._run.names)

    @property
    def names(self) -> list[str]:
        return list(self._run.names)

    def scoped(self, prefix: str, step_offset: int = 0) -> Tracker:
        """A view of this tracker run: keys get ``prefix``, steps ``+ step_offset``; its
        :meth:`finish` does nothing (the run belongs to this tracker)."""
        view = object.__new__(Tracker)
        view._run, view._owner = self._run, False
        view.prefix, view.step_offset = self.prefix + prefix, self.step_offset + int(step_offset)
        return view

    def log(self, row: dict[str, Any], step: int | None = None) -> None:
        """Log the numbers of ``row`` (a metrics row; ``step`` defaults to ``row["step"]``)."""
        if not self.active:
            return
        step = int(row["step"] if step is None else step)
        values = {f"{self.prefix}{k}": float(v) if isinstance(v, float) else v for k, v in row.items()
                  if k not in ("step", "processes") and isinstance(v, (int, float)) and not isinstance(v, bool)
                  and (not isinstance(v, float) or math.isfinite(v))}
        if values:
            self._run.start().log(values, step=step + self.step_offset)

    def log_samples(self, step: int, task, rows: Sequence[dict], completions: Sequence[str], scores: Sequence) -> None:
        """The first :data:`SAMPLES_PER_STEP` completions of a step, with their prompt (the task's
        last chat message for the row) and reward, as text under ``<prefix>samples``."""
        if not self.active:
            return
        k = min(SAMPLES_PER_STEP, len(completions))
        columns = ["prompt", "completion", "reward"]
        data = [[_last_message(task.prompt(rows[i])), completions[i], float(scores[i].score)] for i in range(k)]
        self.log_table("samples", columns, data, step)

    def log_table(self, name: str, columns: list[str], data: list[list[Any]], step: int) -> None:
        """A small table as each tracker shows text best: TensorBoard a markdown table
        (``add_text``), W&B and trackio a table, MLflow a markdown artifact."""
        if not self.active:
            return
        accelerator = self._run.start()
        if not accelerator.is_main_process:
            return
        tag, step = f"{self.prefix}{name}", step + self.step_offset
        markdown = _markdown_table(columns, data)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.tracker.add_text(tag, markdown, global_step=step)
                tracker.tracker.flush()
            elif tracker.name == "wandb":
                tracker.log_table(tag, columns=columns, data=data, step=step)
            elif tracker.name == "trackio":
                import trackio  # an optional extra, present when this tracker runs

                tracker.log({tag: trackio.Table(columns=columns, data=data)}, step=step)
            elif tracker.name == "mlflow":
                import mlflow  # an optional extra, present when this tracker runs

                mlflow.log_text(markdown, f"{tag}/step-{step:06d}.md")

    def finish(self) -> None:
        """Close the tracker run (once; a scoped view leaves it open)."""
        run = self._run
        if self._owner and run.accelerator is not None and not run.finished:
            run.finished = True
            run.accelerator.end_training()


def _last_message(messages) -> str:
    return str(messages[-1]["content"]) if messages else ""


def _markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    def cell(v) -> str:
        text = f"{v:.3g}" if isinstance(v, float) else str(v)
        text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>").replace("\t", " ")
        # other control characters (a random model emits them) would break the table's lines: escaped
        return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text) or " "

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)

