"""The Python entry points beside the command line: the same loop, evaluation and continual runs, no argv.

    import denser
    from denser import TrainConfig

    run = denser.train(TrainConfig(model="tiny", steps=2), objective="grpo", task="addition")
    run = denser.train(objective=my_objective_instance, task=my_task_instance, model="tiny", steps=2)
    result = denser.evaluate(run, tasks=["addition"], samples=8)
    record = denser.continual(objective="grpo", tasks=["addition", "compare"], model="tiny", steps_per_task=2)

:func:`train` resolves its arguments with :func:`~denser.trainers.resolve.resolve_run`, as ``denser train``
resolves its flags (``denser.train(objective="dapo")`` has DAPO's dynamic sampling, as the command line),
runs :class:`~denser.trainers.loop.Trainer` and returns the run directory (``config.yaml``, ``metrics.jsonl``,
``checkpoints/step-*/model``). :func:`evaluate` runs what ``denser eval`` runs and returns its JSON as a
dict; :func:`continual` runs what ``denser continual`` runs and returns ``continual.json``'s dict. Errors
are the command line's: a ``ValueError`` naming the problem, raised before any compute.

An objective or task of your own is registered by importing the module that defines it (its
``@register_objective`` / ``@register_task`` decorators run on import), or passed as an instance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from denser.analysis.evaluation import EvalSettings, evaluate_model
from denser.continual import continual
from denser.objectives import Objective
from denser.tasks import Task
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer
from denser.trainers.resolve import ResolvedRun, resolve_run

__all__ = ["continual", "evaluate", "train"]


def train(config: TrainConfig | ResolvedRun | None = None, objective: str | Objective | None = None,
          task: str | Task | None = None, *, log: Callable[[str], Any] = print, **overrides: Any) -> Path:
    """Train and return the run directory.

    Args:
        config: the run settings (its None fields: not set, as a flag left off), a
            :class:`~denser.trainers.resolve.ResolvedRun`, or None (the defaults); ``overrides`` replace
            its fields (``denser.train(model="tiny", steps=2)``). The objective's ``run_defaults()``
            (``dapo``: dynamic sampling and overlong shaping) apply where neither sets a value.
        objective: a registered name (``"grpo"``), an instance (``get_objective("sdpo", alpha=1.0)``
            or your registered class's), or None for ``config.objective``.
        task: a registered name or ``file:PATH``, a :class:`~denser.tasks.Task` instance, or None for
            ``config.task`` (empty: the default task).
        log: where progress lines go.

    Raises ``ValueError`` for bad settings (before any compute), ``TrainingStopped`` when the run
    stopped itself (too many non-finite updates; a checkpoint was written).
    """
    if isinstance(config, ResolvedRun):
        if objective is not None or task is not None or overrides:
            raise ValueError("denser.train: a ResolvedRun is decided already; pass the settings to resolve_run")
        run = config
    else:
        if config is not None and not isinstance(config, TrainConfig):
            raise ValueError(f"denser.train: config must be a TrainConfig, got {type(config).__name__}")
        try:
            run = resolve_run(config, objective, task, **overrides)
        except ValueError as e:
            raise ValueError(f"denser.train: {e}") from None
    summary = Trainer(run, log=log).train()
    return Path(summary["run_dir"])


def evaluate(model: str | Path = "default", tasks: Sequence[str] | None = None, *, samples: int | None = None,
             k: Sequence[int] = (), temperature: float | None = None, top_p: float | None = None,
             greedy: bool = True, eval_size: int | None = None, max_new_tokens: int | None = None,
             seed: int | None = None, batch_size: int = 64, dtype: str | None = None, device: str | None = None,
             log: Callable[[str], Any] = print) -> dict[str, Any]:
    """``denser eval`` from Python: greedy accuracy, and with ``samples=n`` mean@n, pass@k and maj@k
    (``k`` default 1, 2, 4, ... up to n, and n), each ``{"mean", "stderr"}`` per task (see
    :mod:`denser.analysis.evaluation`). ``model`` is a name, a model or checkpoint directory or a run.
    A setting left None is ``denser train``'s eval default, or, for a run directory, the run's own
    (:class:`~denser.analysis.evaluation.EvalSettings`)."""
    settings = EvalSettings(eval_size=eval_size, max_new_tokens=max_new_tokens, greedy=greedy, samples=samples,
                            ks=list(k), temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size,
                            dtype=dtype)
    return evaluate_model(str(model), list(tasks) if tasks else None, settings, device=device, log=log)
