"""The Python entry points beside the command line: the same loop and evaluation, no argv.

    import denser
    from denser import TrainConfig

    run = denser.train(TrainConfig(model="tiny", steps=2), objective="grpo", task="addition")
    run = denser.train(objective=my_objective_instance, task=my_task_instance, model="tiny", steps=2)
    result = denser.evaluate(run, tasks=["addition"], samples=8, temperature=0.6, top_p=0.95)

:func:`train` runs :class:`~denser.trainers.loop.Trainer`, exactly what ``denser train`` runs, and
returns the run directory (``config.yaml``, ``metrics.jsonl``, ``checkpoints/step-*/model``).
:func:`evaluate` runs what ``denser eval`` runs and returns its JSON as a dict. Errors are the
command line's: a ``ValueError`` naming the problem, raised before any compute.

An objective or task of your own is registered by importing the module that defines it (its
``@register_objective`` / ``@register_task`` decorators run on import), or passed as an instance.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

from denser.analysis.evaluation import EvalSettings, evaluate_model
from denser.objectives import Objective, get_objective
from denser.tasks import Task
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer

__all__ = ["evaluate", "train"]


def train(config: TrainConfig | None = None, objective: str | Objective | None = None, task: str | Task | None = None,
          *, log: Callable[[str], Any] = print, **overrides: Any) -> Path:
    """Train and return the run directory.

    Args:
        config: the run settings, taken as they are; ``overrides`` replace its fields
            (``denser.train(model="tiny", steps=2)``). Default: ``TrainConfig.for_objective(objective)``,
            the defaults with the objective's ``run_defaults()`` (``dapo``: dynamic sampling and overlong
            shaping), which ``overrides`` replace too.
        objective: a registered name (``"grpo"``), an instance (``get_objective("sdpo", alpha=1.0)``
            or your registered class's), or None for ``config.objective``.
        task: a registered name or ``file:PATH``, a :class:`~denser.tasks.Task` instance, or None for
            ``config.task`` (empty: the default task).
        log: where progress lines go.

    Raises ``ValueError`` for bad settings (before any compute), ``TrainingStopped`` when the run
    stopped itself (too many non-finite updates; a checkpoint was written).
    """
    cfg = config if config is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"denser.train: config must be a TrainConfig, got {type(cfg).__name__}")
    if isinstance(objective, str):
        objective = get_objective(objective)
    elif objective is not None and not isinstance(objective, Objective):
        raise ValueError(f"denser.train: objective must be a registered name or an Objective instance, got "
                         f"{type(objective).__name__}")
    if config is None:  # the objective's run defaults where the overrides set none (as the command line)
        named = objective if objective is not None else get_objective(overrides.get("objective") or cfg.objective)
        cfg = TrainConfig.for_objective(named)
    if objective is not None:
        if not objective.name:
            raise ValueError(f"denser.train: {type(objective).__qualname__} is not registered; decorate it with "
                             "@register_objective('name') so that runs can record and resume it")
        overrides["objective"] = objective.name
    if isinstance(task, str):
        overrides["task"] = task
        task = None
    elif task is not None and not isinstance(task, Task):
        raise ValueError(f"denser.train: task must be a task name or a Task instance, got {type(task).__name__}")
    try:
        cfg = dataclasses.replace(cfg, **overrides)
    except TypeError as e:  # an unknown field
        known = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
        raise ValueError(f"denser.train: {e}; TrainConfig fields: {known}") from None
    summary = Trainer(cfg, objective, task=task, log=log).train()
    return Path(summary["run_dir"])


def evaluate(model: str | Path = "default", tasks: Sequence[str] | None = None, *, samples: int = 0,
             k: Sequence[int] = (), temperature: float = 1.0, top_p: float = 1.0, greedy: bool = True,
             eval_size: int = 32, max_new_tokens: int = 24, seed: int = 0, batch_size: int = 64,
             dtype: str = "float32", device: str | None = None, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """``denser eval`` from Python: greedy accuracy, and with ``samples=n`` mean@n, pass@k and maj@k
    (``k`` default 1, 2, 4, ... up to n, and n), each ``{"mean", "stderr"}`` per task (see
    :mod:`denser.analysis.evaluation`). ``model`` is a name, a model or checkpoint directory or a run."""
    settings = EvalSettings(eval_size=eval_size, max_new_tokens=max_new_tokens, greedy=greedy, samples=samples,
                            ks=list(k), temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                            dtype=dtype)
    return evaluate_model(str(model), list(tasks) if tasks else None, settings, device=device, log=log)
