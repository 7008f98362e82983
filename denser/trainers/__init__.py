"""The on-policy loop and what it runs on: models, checkpoints, teacher weights.

    from denser.trainers import Trainer, TrainConfig
    summary = Trainer(TrainConfig(objective="grpo", model="tiny", steps=3)).train()

Modules: ``loop`` (``Trainer``: one step = rollout, score, signals, update, metrics), ``signals``
(the signals an objective declared), ``run_dir`` (config.yaml, metrics.jsonl, resume),
``models`` (``load_model``: embedded default, tiny, local directories), ``checkpoint``
(atomic checkpoints, RNG state; ``state_codec`` their encoding), ``teacher`` (``TeacherWeights``),
``config`` (``TrainConfig``), ``io`` (atomic file writes), ``update`` (the policy-and-loss module,
phase timer), ``step_metrics`` (a step's metrics row), ``evaluation`` (the loop's eval),
``sharding`` (FSDP), ``lora`` (peft adapters), ``memory`` (allocator and optimizer settings),
``preemption`` (stop signals). The rollout engines, ``Rollout`` and ``PackedBatch`` live one layer
below, in :mod:`denser.engines`; their names are re-exported here for code written against
``denser.trainers``.
"""

import importlib

# Every public name and the module it lives in (one of this package's, or a full module path). Resolved on
# first use (PEP 562), for start-up time only: the loop imports accelerate and transformers (seconds), while `denser train --help` and a
# bad flag need nothing but TrainConfig.
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
    "TeacherWeights": "teacher",
    "build_teacher": "teacher",
    "EngineSpec": "denser.engines.base",
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
