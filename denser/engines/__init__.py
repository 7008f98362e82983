"""Rollout engines (docs/design.md, Contract 4): what samples the completions a step trains on.

    from denser.engines import get_rollout_engine, SamplingParams
    engine = get_rollout_engine("hf", model, tokenizer)
    rollout = engine.generate(prompt_ids, SamplingParams(num_generations=8, max_new_tokens=48))

Modules: ``base`` (the ``RolloutEngine`` interface, the registry, ``EngineSpec`` (an engine and its
options, as a run holds it), ``SamplingParams``, ``Rollout``),
``packing`` (``PackedBatch``: a rollout's samples laid out for a forward pass, and the hidden states
the loss core takes), ``hf`` (``HFRolloutEngine``: transformers' ``generate`` on the live policy; ``HFOptions``),
``vllm`` (``VLLMRolloutEngine``: a ``vllm.LLM`` in the trainer's process, weights synced after each
rollout batch; ``VLLMOptions``; the vllm package is imported only when the engine is built).
The package sits below ``denser.trainers`` and imports nothing of it: the loop, the evaluation and
the continual measurements all build their engine here.
"""

from denser.engines import (
    hf,  # noqa: F401  (registers "hf")
    vllm,  # noqa: F401  (registers "vllm"; imports the vllm package only when built)
)
from denser.engines.base import (
    DEFAULT_ENGINE,
    EngineSpec,
    NoOptions,
    Rollout,
    RolloutEngine,
    SamplingParams,
    cut_at_stop_strings,
    get_rollout_engine,
    list_rollout_engines,
    prompt_seeds,
    register_rollout_engine,
    request_seed,
    rollout_engine_class,
    rollout_engine_options,
    truncate_at_stop,
)
from denser.engines.hf import HFOptions, HFRolloutEngine
from denser.engines.packing import (
    PackedBatch,
    build_packed_batch,
    completion_hidden_states,
    completion_logprobs,
    lm_head_params,
    model_device,
)

__all__ = [
    "DEFAULT_ENGINE",
    "EngineSpec",
    "HFOptions",
    "HFRolloutEngine",
    "NoOptions",
    "PackedBatch",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "build_packed_batch",
    "cut_at_stop_strings",
    "completion_hidden_states",
    "completion_logprobs",
    "get_rollout_engine",
    "list_rollout_engines",
    "lm_head_params",
    "model_device",
    "prompt_seeds",
    "register_rollout_engine",
    "request_seed",
    "rollout_engine_class",
    "rollout_engine_options",
    "truncate_at_stop",
]
