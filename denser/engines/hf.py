"""The ``hf`` rollout engine: transformers' ``generate`` on the live policy model.

Behaviour log-probs
-------------------
``old_logp`` of a sampled token is ``log_softmax(raw_logits / temperature)[token]`` at the step
that sampled it, taken from inside ``generate`` by a logits processor that runs *before* the
temperature / top-k / top-p warpers (transformers applies its own processors first; this engine
switches all of them off and installs its own, in order). That is exactly the quantity the loss
core computes at the same temperature over the full vocabulary, so with top-k / top-p off the
ratio ``exp(logp - old_logp)`` is 1 up to numerics at the first update; with top-k / top-p on,
``old_logp`` deliberately stays the full-vocabulary value (the truncation is part of the sampler,
not of the policy being trained), as in TRL and verl.

Seeded sampling
---------------
Each sampled completion draws its tokens from a stream of its own: sample ``j`` of a prompt whose
request seed is ``s`` (:func:`~denser.engines.base.prompt_seeds`) draws uniforms from a
``torch.Generator`` seeded with ``request_seed(s, j)`` (on the CPU: the same numbers on any
device), one per new token, and takes the token by inverse CDF of the warped distribution (after
temperature, top-k, top-p), which is a draw from exactly that distribution. The last logits
processor (:class:`_SeededSampler`) makes the draw and leaves only that token possible, so
``generate`` runs greedy and never touches the global RNG. A completion's random stream therefore
depends on its prompt and its seed alone: not on the other prompts of the call, on ``max_batch_size``,
or on the process. The logits it draws from are the same up to rounding, which the batch's shapes can
move (the shared prefill below computes a call's common prefix once), so a token can differ only where
rounding moves a logit across its draw's boundary.

Shared prefill
--------------
By default (``--hf-share-prefill``) a ``generate`` call prefills the tokens every prompt begins with
once (a chat template's system prompt, a task's one-shot example: ~70 of the main job's ~92), then
each distinct prompt's rest but its last token once, on a copy of that cache, and gives the result to
the rows of the prompt's samples; ``generate`` then runs from each row's last prompt token on. A row
holds the common prefix, padding, then the prompt's rest; ``generate`` places each token at its prompt
position (the attention mask's running count), so the padding's place changes nothing. The arithmetic
per row is the same; only the prefill's matrix shapes change, so a sample can differ only where
rounding moves a logit across a draw's boundary: runs are not bit-identical to ``--no-hf-share-prefill``
(every sample prefilling its own copy, the code before 2026-12-06), and the main job's three seeds with
each are in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from denser.engines.base import (
    DEFAULT_ENGINE,
    Rollout,
    RolloutEngine,
    SamplingParams,
    checked_prompts,
    cut_at_stop_strings,
    prompt_seeds,
    register_rollout_engine,
    request_seed,
    truncate_at_stop,
)
from denser.engines.packing import common_prefix_len, model_device

__all__ = ["ForwardAbandoned", "HFOptions", "HFRolloutEngine", "abandon_forward_on_stop", "default_stop_token_ids"]


class _BehaviourLogpRecorder:
    """A logits processor that records ``log_softmax(raw / T)`` of each sampled token.

    Placed first in the processor list (every built-in processor of ``generate`` is switched
    off), it sees raw logits. At step ``t`` the token sampled at step ``t-1`` is the last column
    of ``input_ids``, so only one ``[B, V]`` log-softmax is kept at a time; :meth:`finish` reads
    the last step's token from the final sequences.
    """

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self.prev: Tensor | None = None
        self.steps: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: Tensor) -> Tensor:
        """``[B, steps]`` log-probs, one column per generated token."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, sequences[:, -1:].to(self.prev.device)).squeeze(1))
            self.prev = None
        if not self.steps:
            return torch.zeros(sequences.shape[0], 0)
        return torch.stack(self.steps, dim=1)


@dataclass(frozen=True)
class HFOptions:
    """The ``hf`` engine's options: flags ``--hf-...`` of ``denser train``, ``engine_args:`` of a run."""

    max_batch_size: int = field(default=0, metadata={"help": (
        "hf engine: at most this many sequences (prompts x completions each) per generate call, the rest in "
        "further calls; bounds the KV cache's memory and leaves the samples unchanged (0 = all of a call at once)")})

    share_prefill: bool = field(default=True, metadata={"help": (
        "hf engine: prefill the prefix every prompt of a call begins with once, then each distinct prompt's "
        "rest once, and give that key/value cache to its num_generations samples (instead of prefilling every "
        "sample's copy of the prompt); the same computation up to summation order (the prefill's matrix shapes "
        "change), so a sampled token can differ where two tokens' cumulative probabilities straddle a draw "
        "within rounding; --no-hf-share-prefill prefills every sample's copy (the code before 2026-12-06)")})

    cpu_decode_matmul: bool = field(default=True, metadata={"help": (
        "hf engine, on a CPU with more than one torch thread: the fp32 linear layers of a generate call compute "
        "a product of at most 16 rows (decoding: one row per sequence) as W x^T, which MKL spreads over the "
        "threads, instead of x W^T, which it runs on fewer (generate calls of 8-16 sequences 1.13-1.23x "
        "faster on the project's 2-core machine, docs/engines.md); the same values up to summation order, so, "
        "as with --hf-share-prefill, a sampled token can differ within rounding; --no-hf-cpu-decode-matmul: "
        "torch's own linear (the code before 2026-12-06)")})

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError(f"--hf-max-batch-size must be >= 0 (0 = all at once), got {self.max_batch_size}")


@register_rollout_engine(DEFAULT_ENGINE, options=HFOptions)
class HFRolloutEngine(RolloutEngine):
    """Sampling with transformers ``generate`` on the live policy model.

    Args:
        model: an unwrapped HF causal LM (under accelerate, pass ``accelerator.unwrap_model(model)``).
        tokenizer: its tokenizer (decodes texts; gives EOS and pad ids).
        max_batch_size: at most this many sequences per ``generate`` call (0 or None: all at once);
            :class:`HFOptions`.
        share_prefill: prefill each distinct prompt of a call once and copy its key/value cache to the
            samples that continue it (:class:`HFOptions`).
        cpu_decode_matmul: on a CPU with several threads, few-row fp32 linear layers as ``W x^T``
            (:class:`HFOptions`, :func:`weight_major_linears`).
        stop_token_ids: tokens that end a completion (default: the tokenizer's EOS plus the
            model's ``generation_config.eos_token_id``).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        share_prefill: bool = True,
        cpu_decode_matmul: bool = True,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.share_prefill = bool(share_prefill)
        self.cpu_decode_matmul = bool(cpu_decode_matmul)
        if stop_token_ids is None:
            stop_token_ids = default_stop_token_ids(model, tokenizer)
        if not stop_token_ids:
            raise ValueError("HFRolloutEngine needs a stop token: the tokenizer has no eos_token and none was given")
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else self.stop_token_ids[0]

    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *, seeds: Sequence[int] | None = None,
        seed: int | None = None, stop: Callable[[], bool] | None = None,
    ) -> Rollout:
        prompts = checked_prompts(prompt_ids)
        G = params.num_generations
        flat = [p for p in prompts for _ in range(G)]
        # one stream per sample: sample j of prompt p from request_seed(seed of p, j); greedy needs none
        sample_seeds = ([request_seed(s, j) for s in prompt_seeds(len(prompts), seeds, seed) for j in range(G)]
                        if params.do_sample else [0] * len(flat))
        chunk = self.max_batch_size or len(flat)
        completions: list[list[int]] = []
        logps: list[Tensor] = []
        truncated: list[bool] = []
        device = model_device(self.model)
        weight_major = self.cpu_decode_matmul and device.type == "cpu" and torch.get_num_threads() > 1
        with _eval_mode(self.model), torch.no_grad(), weight_major_linears(self.model, weight_major):
            for start in range(0, len(flat), chunk):
                c, lp, tr = self._generate_chunk(flat[start : start + chunk], params, device, stop,
                                                 sample_seeds[start : start + chunk])
                completions += c
                logps += lp
                truncated += tr
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Rollout(
            prompt_ids=prompts,
            completion_ids=completions,
            texts=texts,
            logps=logps,
            truncated=torch.tensor(truncated, dtype=torch.bool),
            num_generations=G,
            params=params,
            pad_token_id=self.pad_token_id,
        )

    def _generate_chunk(
        self, prompts: list[list[int]], params: SamplingParams, device: torch.device,
        stop: Callable[[], bool] | None, seeds: list[int],
    ) -> tuple[list[list[int]], list[Tensor], list[bool]]:
        # lazy: importing transformers takes seconds, and `denser train --help` imports this module
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.logits_process import (
            MinNewTokensLengthLogitsProcessor,
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        common = common_prefix_len(prompts) if self.share_prefill else 0
        input_ids, attention_mask = _prompt_layout(prompts, self.pad_token_id, common)
        width = input_ids.shape[1]
        recorder = _BehaviourLogpRecorder(params.temperature)
        processors: list[Any] = [recorder]
        if params.min_new_tokens > 0:  # after the recorder: old_logp stay the model's, as vLLM's
            processors.append(MinNewTokensLengthLogitsProcessor(width, params.min_new_tokens, self.stop_token_ids,
                                                                device=str(device)))
        if params.do_sample:
            # vLLM's order: penalty, temperature, min-p, top-k, top-p (min-p and top-k commute)
            if params.repetition_penalty != 1.0:
                processors.append(_RepetitionPenalty(params.repetition_penalty, attention_mask.bool()))
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.min_p > 0:
                processors.append(MinPLogitsWarper(params.min_p))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            processors.append(_SeededSampler(seeds, params.max_new_tokens))
        # Every built-in processor off and greedy decoding: ours above run alone, in order, and the
        # seeded sampler's token is the only one left to pick.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        try:
            with _neutral_generation_config(self.model, config), abandon_forward_on_stop(self.model, stop), \
                    warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
                cache = (self._shared_prefill(prompts, input_ids, attention_mask, common, device)
                         if self.share_prefill else None)
                sequences = self.model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    logits_processor=LogitsProcessorList(processors),
                    **({"past_key_values": cache} if cache is not None else {}),
                    **({"stopping_criteria": _stop_criteria(stop)} if stop is not None else {}),
                )
        except ForwardAbandoned:  # stopped inside a forward: no completion, the caller abandons them
            return [[] for _ in prompts], [torch.zeros(0) for _ in prompts], [True for _ in prompts]
        logp_steps = recorder.finish(sequences).cpu()
        new = sequences[:, width:].cpu()
        completions, logps, truncated = [], [], []
        for b in range(new.shape[0]):
            tokens, tr = truncate_at_stop(new[b].tolist(), self.stop_token_ids)
            if params.stop:  # stop strings: cut afterwards (generation runs on to EOS or the budget)
                tokens, tr = cut_at_stop_strings(tokens, tr, params.stop, self.tokenizer, params.min_new_tokens)
            completions.append(tokens)
            logps.append(logp_steps[b, : len(tokens)].clone())
            truncated.append(tr)
        return completions, logps, truncated

    def _shared_prefill(self, prompts: list[list[int]], input_ids: Tensor, attention_mask: Tensor, common: int,
                        device: torch.device) -> Any:
        """The key/value cache of every row's prompt but its last token (the layout of :func:`_prompt_layout`),
        each token computed once: the ``common`` prefix of all prompts once, each distinct prompt's rest once
        on a copy of it, and the rows that repeat a prompt given its cache. ``generate`` then runs each row's
        last prompt token and samples on from there. None when nothing is shared (every prompt distinct, no
        common prefix)."""
        from transformers import DynamicCache

        distinct: dict[tuple[int, ...], int] = {}
        rows = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts])
        width = input_ids.shape[1]
        if (len(distinct) == len(prompts) and common == 0) or width < 2:
            return None
        first = torch.tensor([rows.tolist().index(u) for u in range(len(distinct))])
        ids, mask = input_ids[first, :-1].to(device), attention_mask[first, :-1].to(device)
        position_ids = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # as generate places the prompts
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers before 4.56
            cache = DynamicCache()
        with warnings.catch_warnings():  # transformers 5.x renames it `cache`; 4.x knows only `past_key_values`
            warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
            if common:  # the prefix of every prompt, once, then a copy per distinct prompt
                self.model(input_ids=ids[:1, :common], attention_mask=mask[:1, :common],
                           position_ids=position_ids[:1, :common], past_key_values=cache, use_cache=True,
                           logits_to_keep=1)
                cache.batch_repeat_interleave(len(distinct))
            if width - 1 > common:
                self.model(input_ids=ids[:, common:], attention_mask=mask, position_ids=position_ids[:, common:],
                           past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_select_indices(rows.to(device))
        return cache


def _prompt_layout(prompts: Sequence[Sequence[int]], pad_token_id: int, common: int = 0) -> tuple[Tensor, Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, W]`` of a ``generate`` call: the ``common`` leading tokens of
    every prompt in columns ``0..common-1``, then the rest of each prompt right-aligned, padding between
    (``common = 0``: left padding). Every row ends with its last prompt token; ``generate`` places each token
    at its prompt position (the attention mask's running count), so the padding's place changes nothing."""
    rest = max(len(p) for p in prompts) - common
    input_ids = torch.full((len(prompts), common + rest), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, p in enumerate(prompts):
        input_ids[b, :common] = torch.tensor(p[:common], dtype=torch.long)
        input_ids[b, common + rest - (len(p) - common):] = torch.tensor(p[common:], dtype=torch.long)
        attention_mask[b, :common] = 1
        attention_mask[b, common + rest - (len(p) - common):] = 1
    return input_ids, attention_mask


def default_stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS, then the model's
    ``generation_config.eos_token_id`` (one id or a list)."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for src in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for t in (src if isinstance(src, (list, tuple)) else [src]):
            if t is not None and int(t) not in ids:
                ids.append(int(t))
    return ids


class _RepetitionPenalty:
    """CTRL's repetition penalty (as transformers' and vLLM's) on the tokens of each row's prompt and
    completion so far, padding excluded (vLLM never sees it): a positive logit of such a token
    is divided by ``penalty``, a negative one multiplied."""

    def __init__(self, penalty: float, prompt_mask: Tensor):
        self.penalty = float(penalty)
        self.prompt_mask = prompt_mask  # [B, W] True on the prompts' tokens (not their padding)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        seen = torch.zeros_like(scores, dtype=torch.bool)
        width = self.prompt_mask.shape[1]
        prompt_mask = self.prompt_mask.to(input_ids.device)
        for b in range(input_ids.shape[0]):
            seen[b, input_ids[b, :width][prompt_mask[b]]] = True
            seen[b, input_ids[b, width:]] = True
        penalised = torch.where(scores > 0, scores / self.penalty, scores * self.penalty)
        return torch.where(seen, penalised, scores)


#: at most this many rows (sequences x new positions) for a linear layer's product to run as W x^T
WEIGHT_MAJOR_MAX_ROWS = 16


def use_weight_major(rows: int, out_features: int, in_features: int) -> bool:
    """Whether :func:`weight_major_linears` computes a linear layer of ``rows`` input rows as ``W x^T``.
    Measured on the project's 2-core AMD EPYC (MKL sgemm, two threads, the embedded model's shapes,
    ``python -m bench.decode_matmul``): at 8 rows ``W x^T`` ran 1.07-1.5x faster than ``x W^T`` (MKL splits
    the second over its few rows, the first over the weight's many), except for a weight with fewer
    outputs than inputs (the MLP's down projection: 0.8x); at 16 rows 1.05-1.15x; from 32 rows on it was
    no faster (0.86-1.19x by shape). On one thread ``x W^T`` was as fast or faster (so the engine turns
    this off there)."""
    if rows > WEIGHT_MAJOR_MAX_ROWS or rows < 2:
        return False
    return not (rows <= 8 and out_features < in_features)


def _weight_major_forward(self: nn.Linear, x: Tensor) -> Tensor:
    n, k = self.weight.shape
    rows = x.numel() // k if k else 0
    if x.dtype != torch.float32 or self.weight.dtype != torch.float32 or not use_weight_major(rows, n, k):
        return nn.functional.linear(x, self.weight, self.bias)
    # contiguous: the attention and elementwise ops after it are slower on a transposed layout
    y = (self.weight @ x.reshape(rows, k).t()).t().contiguous().reshape(*x.shape[:-1], n)
    return y if self.bias is None else y + self.bias


@contextlib.contextmanager
def weight_major_linears(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """While open, every plain ``nn.Linear`` of ``model`` (a LoRA layer's base and adapters included)
    computes a product of few rows as ``(W @ x^T)^T`` (:func:`use_weight_major`), the rest as before;
    every module's own ``forward`` is back on exit, error or not."""
    linears = [m for m in model.modules() if type(m) is nn.Linear] if enabled else []
    for m in linears:
        m.forward = _weight_major_forward.__get__(m)
    try:
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)


class _SeededSampler:
    """The last logits processor of a sampled ``generate``: draws row ``b``'s next token from the
    (warped) scores with the ``t``-th uniform of its own stream (seed ``seeds[b]``), by inverse CDF in
    float64, and returns scores where only that token is finite (greedy decoding then picks it)."""

    def __init__(self, seeds: list[int], max_new_tokens: int):
        # (0, 1]: a uniform of exactly 0 could otherwise pick a leading zero-probability token
        self.uniforms = torch.stack([
            1.0 - torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            for s in seeds])
        self.t = 0

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        u = self.uniforms[:, min(self.t, self.uniforms.shape[1] - 1)].to(scores.device)
        self.t += 1
        cdf = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_max(scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def _stop_criteria(stop: Callable[[], bool]):
    """A ``generate`` stopping criterion that ends every sequence once ``stop()`` is True (it
    samples nothing and draws no random numbers: a run that is never stopped is unchanged).
    Under FSDP, ``generate`` keeps the processes in step (``synced_gpus``) when one ends early."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs) -> Tensor:
            return torch.full((input_ids.shape[0],), bool(stop()), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Stop()])


@contextlib.contextmanager
def _eval_mode(model: Any):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _neutral_generation_config(model: Any, config: Any):
    """``generate`` fills unset fields from ``model.generation_config`` (repetition penalty,
    top-k, ... of a checkpoint); swap in ours for the call so nothing else alters the logits."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


class ForwardAbandoned(Exception):
    """Raised inside a model's forward once a stop was requested (:func:`abandon_forward_on_stop`)."""


@contextlib.contextmanager
def abandon_forward_on_stop(model: nn.Module, stop: Callable[[], bool] | None) -> Iterator[None]:
    """While active, every block of ``model`` (each module of an ``nn.ModuleList``: a transformer's
    layers) polls ``stop`` before it runs and raises :class:`ForwardAbandoned` once it is True, so
    a forward in progress ends within one layer (a prefill of 16 prompts took 13 s on a loaded
    2-core CPU, most of the wait from SIGTERM to the checkpoint). With several processes nothing is
    installed: a forward may hold collectives (FSDP) that every process must finish."""
    import torch.distributed as dist

    if stop is None or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield
        return

    def poll(module, args):
        if stop():
            raise ForwardAbandoned

    blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    handles = [m.register_forward_pre_hook(poll) for m in blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
