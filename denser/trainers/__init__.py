"""The on-policy loop and what it runs on: models, checkpoints, teacher weights.

    from denser.trainers import Trainer, TrainConfig
    summary = Trainer(TrainConfig(objective="grpo", model="tiny", steps=3)).train()

Modules: ``loop`` (``Trainer``: one step = rollout, score, signals, updates, metrics), ``resolve``
(``resolve_run``: flags, a config file or Python arguments -> one ``ResolvedRun``), ``config``
(``TrainConfig``), ``prompts`` (each step's prompts), ``scoring`` (``Scores``, overlong shaping,
dynamic sampling), ``signals`` (the signals an objective declared), ``batches`` (the update plan and
micro-batches), ``policy_loss`` (the policy-and-loss module DDP/FSDP wrap), ``step_metrics`` (a
step's metrics row, its phase timer, ``UpdateResult``), ``evaluation`` (the loop's eval),
``teacher`` (``build_teacher``, ``TeacherWeights``), ``models`` (``load_model``: embedded default,
tiny, local directories), ``checkpoint`` (atomic checkpoints, RNG state; ``state_codec`` their
encoding), ``run_dir`` (config.yaml, metrics.jsonl, resume), ``io`` (atomic file writes),
``sharding`` (FSDP), ``lora`` (peft adapters), ``memory`` (allocator and optimizer settings),
``preemption`` (stop signals), ``tracking`` (trackers), ``estimators`` (the eval's standard error).
The rollout engines, ``Rollout`` and ``PackedBatch`` live one layer below, in :mod:`denser.engines`.
"""

import importlib

# Every public name and the module it lives in (of this package, unless dotted). Resolved on first use
# (PEP 562), for start-up time only: the loop imports accelerate and transformers (seconds), while
# `denser train --help` and a bad flag need nothing but TrainConfig.
_EXPORTS = {
    "CheckpointError": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "TrainConfig": "config",
    "ResolvedRun": "resolve",
    "resolve_run": "resolve",
    "Trainer": "loop",
    "TrainingStopped": "loop",
    "EmbeddedModelMissingError": "models",
    "ModelNotFoundError": "models",
    "build_tiny_model": "models",
    "load_model": "models",
    "render_prompt": "models",
    "TeacherWeights": "teacher",
    "build_teacher": "teacher",
    # the engine names as they were importable from here before they moved to denser.engines
    "EngineSpec": "denser.engines.base",
    "PackedBatch": "denser.engines.packing",
    "build_packed_batch": "denser.engines.packing",
    "completion_hidden_states": "denser.engines.packing",
    "completion_logprobs": "denser.engines.packing",
    "lm_head_params": "denser.engines.packing",
    "HFRolloutEngine": "denser.engines.hf",
    "Rollout": "denser.engines.base",
    "RolloutEngine": "denser.engines.base",
    "SamplingParams": "denser.engines.base",
    "get_rollout_engine": "denser.engines.base",
    "list_rollout_engines": "denser.engines.base",
    "register_rollout_engine": "denser.engines.base",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'denser.trainers' has no attribute {name!r}")
    module = _EXPORTS[name]
    value = getattr(importlib.import_module(module if "." in module else f"denser.trainers.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
