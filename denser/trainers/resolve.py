"""One resolved run: flags, a config file's values or Python arguments -> :class:`ResolvedRun`, once.

    from denser.trainers.resolve import resolve_run
    run = resolve_run(TrainConfig(model="tiny"), "dapo", "addition")   # or resolve_run({"model": "tiny"}, "dapo")
    run.config.dynamic_sampling   # True: dapo's run_defaults(), as `denser train --objective dapo` has it
    Trainer(run).train()

:func:`resolve_run` is the only place a run's settings are decided, before any model loads; what it
returns is what the run does, and what its ``config.yaml`` records:

1. the objective: a registered name (with ``objective_args``) or an instance, its name in ``config.objective``;
2. the objective's ``run_defaults()`` (the ``dapo`` preset's dynamic sampling and overlong shaping) for the
   preset options the user left unset (None: "not set"; a value the user gives, even the default, stays),
   then each preset option's own default (:func:`~denser.trainers.config.preset_options`);
3. the task (a registered name, ``file:PATH``, or a :class:`~denser.tasks.Task` instance) and what defaults
   to it: ``max_new_tokens`` 0 -> the task's ``suggested_max_new_tokens``, ``eval_size`` 0 -> its eval split,
   at most :data:`~denser.trainers.config.EVAL_SIZE_CAP` rows, ``task`` empty -> the task's name;
4. ``old_logp_source`` ``auto`` -> ``forward`` when a step makes several updates or the engine's log-probs are
   not the trainer's (``RolloutEngine.copies_weights``: vllm), else ``engine``; ``rollout_correction`` ``auto``
   -> ``token-truncate`` with such an engine and an objective that uses advantages, else ``off``
   (:mod:`denser.trainers.rollout_correction`);
5. the objective for the run (``objective.for_run(updates_per_step)``) and its teacher (``teacher_spec()``,
   when the objective declares a teacher signal).

Resolving a resolved run's config again gives the same run: a run's ``config.yaml`` passed back with
``--config`` (or as the mapping ``resolve_run`` takes) re-resolves to the config it records.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from denser.engines import EngineSpec, rollout_engine_class
from denser.objectives import DEFAULT_OBJECTIVE, TEACHER_SIGNALS, Objective, Signal, TeacherSpec, get_objective
from denser.plugins import import_plugins
from denser.tasks import DEFAULT_TASK, Task, get_task
from denser.trainers.config import EVAL_SIZE_CAP, TEACHER_MODEL_KEY, TrainConfig, preset_options

__all__ = ["ResolvedRun", "apply_run_defaults", "resolve_eval_size", "resolve_run"]


@dataclass(frozen=True)
class ResolvedRun:
    """A run with every setting decided: what :class:`~denser.trainers.loop.Trainer` runs.

    ``config``: the run settings, nothing left "not set" or "from the task" (what ``config.yaml``
    records); ``objective``: the objective instance for this run (after ``for_run``); ``task``: the
    task instance; ``engine``: the rollout engine ``config.engine`` with its options (``config.yaml``'s
    ``engine_args``); ``teacher``: the objective's teacher spec, or None when it declares no teacher signal."""

    config: TrainConfig
    objective: Objective
    task: Task
    engine: EngineSpec
    teacher: TeacherSpec | None


def resolve_run(config: TrainConfig | Mapping[str, Any] | None = None, objective: str | Objective | None = None,
                task: str | Task | None = None, *, objective_args: Mapping[str, Any] | None = None,
                engine: str | EngineSpec | None = None, engine_args: Mapping[str, Any] | None = None,
                **values: Any) -> ResolvedRun:
    """The :class:`ResolvedRun` of the given settings (see the module docstring for the order).

    Args:
        config: a :class:`~denser.trainers.config.TrainConfig` (its None fields: not set), or a mapping of
            ``TrainConfig`` field values (the flags and config-file keys a user gave; a run's ``config.yaml``
            as loaded, whose ``objective_args`` and ``import`` keys are honoured), or None.
        objective: a registered name, an instance (registered: runs record and resume it by name), or None
            for ``config``'s ``objective`` (default :data:`~denser.objectives.DEFAULT_OBJECTIVE`).
        task: a registered name or ``file:PATH``, a :class:`~denser.tasks.Task` instance, or None for
            ``config``'s ``task`` (empty: the default task).
        objective_args: field values of the objective when it is given by name.
        engine: the rollout engine: a registered name (the run option ``engine``), or an
            :class:`~denser.engines.EngineSpec`, which gives its options too.
        engine_args: the engine's options, option: value, over those a run's ``config.yaml`` records.
        values: ``TrainConfig`` fields that replace ``config``'s.

    Raises ``ValueError`` naming the problem (an unknown field, a bad value, an unknown objective or
    task) before anything is loaded.
    """
    given, obj_args = _given_values(config, objective_args)
    recorded_engine_args, recorded_engine = given.pop("engine_args", None) or {}, given.get("engine")
    if isinstance(engine, EngineSpec):
        if engine_args:
            raise ValueError("engine_args apply to an engine given by name; an EngineSpec holds its options")
        values["engine"] = engine.name
    elif engine is not None:
        values["engine"] = engine
    given.update(values)
    if given.get("engine") != recorded_engine:  # the recorded options are another engine's
        recorded_engine_args = {}
    unknown = sorted(set(given) - {f.name for f in fields(TrainConfig)})
    if unknown:
        close = difflib.get_close_matches(unknown[0], [f.name for f in fields(TrainConfig)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{unknown[0]!r} is not a run option{hint}; TrainConfig fields: "
                         f"{', '.join(f.name for f in fields(TrainConfig))}")
    obj = _objective(objective, given.get("objective"), obj_args)
    if isinstance(task, str):
        given["task"] = task
    elif task is not None and not isinstance(task, Task):
        raise ValueError(f"task must be a task name or a Task instance, got {type(task).__name__}")
    cfg = apply_run_defaults(TrainConfig(**{**given, "objective": obj.name}), obj)
    task_obj = task if isinstance(task, Task) else _load_task(cfg)
    if cfg.reward_workers:  # a task that runs programs scores this many completions at a time
        task_obj.reward_workers = cfg.reward_workers
    changes: dict[str, Any] = {}
    if not cfg.task:
        changes["task"] = task_obj.name
    if cfg.max_new_tokens == 0:
        changes["max_new_tokens"] = int(task_obj.suggested_max_new_tokens)
    if cfg.eval_size == 0:
        changes["eval_size"] = resolve_eval_size(0, len(task_obj.eval))
    # an engine with log-probs of its own (vllm): close to the trainer's, not equal
    own_logps = rollout_engine_class(cfg.engine).copies_weights
    if cfg.old_logp_source == "auto":  # old_logp from a forward of the pre-update policy when the policy moves
        changes["old_logp_source"] = "forward" if cfg.updates_per_step > 1 or own_logps else "engine"
    run_objective = obj.for_run(cfg.updates_per_step)  # several updates per step: old_logp declared
    if cfg.rollout_correction == "auto":  # it weights advantages: an objective without them has nothing to correct
        changes["rollout_correction"] = ("token-truncate" if own_logps and Signal.ADVANTAGES in run_objective.signals()
                                         else "off")
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    if cfg.min_new_tokens > cfg.max_new_tokens:
        budget = "the task's suggested budget" if "max_new_tokens" in changes else "--max-new-tokens"
        raise ValueError(f"--min-new-tokens {cfg.min_new_tokens} exceeds the generation budget ({budget}, "
                         f"{cfg.max_new_tokens}): give --min-new-tokens at most {cfg.max_new_tokens} or a larger "
                         "--max-new-tokens")
    teacher = run_objective.teacher_spec() if run_objective.signals() & TEACHER_SIGNALS else None
    return ResolvedRun(config=cfg, objective=run_objective, task=task_obj,
                       engine=_engine(cfg, recorded_engine_args, engine, engine_args), teacher=teacher)


def apply_run_defaults(config: TrainConfig, objective: Objective) -> TrainConfig:
    """``config`` (a copy) with its unset preset options (None) set: the objective's ``run_defaults()``
    first, then each option's own default. ``run_defaults()`` may name only those options
    (:func:`~denser.trainers.config.preset_options`): a preset never overrides what the user gave."""
    presets = preset_options()
    defaults = objective.run_defaults()
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(defaults) - names)
    if unknown:
        raise ValueError(f"objective {objective.name!r}: run_defaults() names {', '.join(unknown)}, which "
                         f"{'is not a run option' if len(unknown) == 1 else 'are not run options'} (TrainConfig fields)")
    fixed = sorted(set(defaults) - set(presets))
    if fixed:
        raise ValueError(f"objective {objective.name!r}: run_defaults() names {', '.join(fixed)}, which a preset "
                         f"cannot set (a value given by the user could not be told from its default); a preset "
                         f"sets only {', '.join(sorted(presets))}")
    changes = {name: defaults.get(name, unset) for name, unset in presets.items() if getattr(config, name) is None}
    return dataclasses.replace(config, **changes) if changes else config


def resolve_eval_size(eval_size: int, eval_rows: int) -> int:
    """The eval rows ``eval_size`` means for a split of ``eval_rows`` rows (0: all, at most
    :data:`~denser.trainers.config.EVAL_SIZE_CAP`; at least 1, so that a task without an eval split passes)."""
    if eval_size == 0:
        return max(1, min(eval_rows, EVAL_SIZE_CAP))
    return eval_size


# ------------------------------------------------------------------------------------------ pieces


def _given_values(config, objective_args) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(run values the user gave, objective values)`` of ``config``."""
    obj_args = dict(objective_args or {})
    if config is None:
        return {}, obj_args
    if isinstance(config, TrainConfig):
        return {f.name: getattr(config, f.name) for f in fields(config) if f.init}, obj_args
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a TrainConfig or a mapping of its fields, got {type(config).__name__}")
    given = dict(config)
    given.pop(TEACHER_MODEL_KEY, None)  # a run's record of its teacher model (checked by --resume), not an option
    if "import" in given:  # a run's config.yaml names the plugin modules of its objective and task
        import_plugins(given.pop("import"))
    nested = given.pop("objective_args", None) or {}
    if not isinstance(nested, Mapping):
        raise ValueError("'objective_args' must be a mapping of the objective's field: value")
    return given, {**nested, **obj_args}


def _objective(objective, named: str | None, args: dict[str, Any]) -> Objective:
    if isinstance(objective, Objective):
        if args:
            raise ValueError("objective_args apply to an objective given by name; set the fields of the instance")
        if not objective.name:
            raise ValueError(f"{type(objective).__qualname__} is not registered; decorate it with "
                             "@register_objective('name') so that runs can record and resume it")
        return objective
    if objective is not None and not isinstance(objective, str):
        raise ValueError(f"objective must be a registered name or an Objective instance, got "
                         f"{type(objective).__name__}")
    name = objective or named or DEFAULT_OBJECTIVE
    if not isinstance(name, str):
        raise ValueError(f"'objective' must be a name, got {name!r}")
    return get_objective(name, **args)


def _engine(cfg: TrainConfig, recorded: Any, engine: str | EngineSpec | None,
            args: Mapping[str, Any] | None) -> EngineSpec:
    """Engine ``cfg.engine`` with its options: a given :class:`~denser.engines.EngineSpec` as it is, else
    ``recorded`` (a config file's ``engine_args``) with ``args`` over them."""
    if isinstance(engine, EngineSpec):
        return engine
    if not isinstance(recorded, Mapping) or not isinstance(args or {}, Mapping):
        raise ValueError("engine_args must be a mapping of the engine's option: value")
    return EngineSpec.from_args(cfg.engine, {**recorded, **(args or {})})


def _load_task(cfg: TrainConfig) -> Task:
    try:
        return get_task(cfg.task or DEFAULT_TASK, seed=cfg.seed)
    except TypeError as e:  # bad inline options (addition?foo=1)
        raise ValueError(str(e)) from None
