"""Rollout engines: the interface, the registry, and what an engine returns (docs/design.md, Contract 4).

The loop builds its engine by name (``TrainConfig.engine``, ``--engine``; ``hf`` by default) and
uses it like this::

    engine = get_rollout_engine("hf", model, tokenizer)          # or HFRolloutEngine(model, tokenizer)
    rollout = engine.generate(prompt_ids, SamplingParams(num_generations=8, max_new_tokens=48))
    batch = rollout.pack(indices)                                 # PackedBatch (denser.engines.packing)
    engine.update_weights(model)                                  # after each rollout batch's updates

Another engine (an inference server) subclasses :class:`RolloutEngine` and registers itself with
``@register_rollout_engine("name", options=NameOptions)``; ``--engine name`` then selects it, and the
fields of its options dataclass become flags ``--name-FIELD`` and keys of a run's ``engine_args:``.
A run holds its choice as an :class:`EngineSpec` (name and options), which builds the engine::

    spec = EngineSpec.from_args("hf", {"max_batch_size": 16})     # or EngineSpec("hf", HFOptions(16))
    engine = spec.build(model, tokenizer)

Layout
------
``rollout`` holds ``S = P * G`` samples for ``P`` prompts and ``G = num_generations``, prompt-major:
sample ``s`` answers prompt ``s // G`` (``rollout.group_ids``). A completion ends at the first stop
token (EOS), which is kept as its last token; tokens after it are dropped. A completion that hit
``max_new_tokens`` without EOS is ``truncated``. Every completion has at least one token.
:meth:`Rollout.pack` lays samples out for a forward pass (:mod:`denser.engines.packing`).

Seeds
-----
Every prompt's request has a seed (:func:`request_seed`): in training, of (run seed, step, generation
round, the prompt's global index in the step), never of the process, and the prompt's samples are
drawn from it alone (the ``hf`` engine: sample ``j`` from ``request_seed(prompt_seed, j)``; an engine
that takes one seed per request and ``n`` samples, as vLLM does, passes the prompt's seed). So a run
is reproducible, resumes exactly, and a run on another number of processes with the same global
batch draws the same samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from denser.engines.packing import PackedBatch, build_packed_batch
from denser.objectives.fields import check_value

__all__ = [
    "DEFAULT_ENGINE",
    "EngineSpec",
    "NoOptions",
    "SamplingParams",
    "Rollout",
    "RolloutEngine",
    "register_rollout_engine",
    "get_rollout_engine",
    "list_rollout_engines",
    "prompt_seeds",
    "request_seed",
    "rollout_engine_class",
    "rollout_engine_options",
    "truncate_at_stop",
    "cut_at_stop_strings",
]

DEFAULT_ENGINE = "hf"


# --------------------------------------------------------------------------------------------
# settings and results


@dataclass
class SamplingParams:
    """How completions are sampled.

    Attributes:
        max_new_tokens: generation budget per completion (a completion that uses it all without
            emitting EOS is ``truncated``).
        num_generations: completions per prompt (the GRPO group size ``G``).
        temperature: sampling temperature; also the temperature of the recorded ``old_logp``.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: sample among the k most likely tokens (0 = off).
        min_p: drop tokens whose probability is below ``min_p`` times the most likely one's (0 = off).
        repetition_penalty: CTRL's penalty on tokens already in the prompt or completion (positive
            logits divided by it, negative ones multiplied; 1.0 = off).
        stop: stop strings: a completion ends with the first token whose text completes one of them
            (the token is kept; the completion is not ``truncated``); empty = none.
        do_sample: ``False`` for greedy decoding (evaluation); the sampling knobs are then ignored
            but ``old_logp`` is still recorded at ``temperature``.
        min_new_tokens: a completion's first ``min_new_tokens`` tokens are never a stop token, and a stop
            string counts once the completion holds that many tokens (vLLM's ``min_tokens``, transformers'
            ``min_new_tokens``; 0 = off). The stop tokens are masked out of the sampled distribution only:
            the recorded ``old_logp`` stay the model's (as with ``top_p``), so the loss core and the engine agree.
    """

    max_new_tokens: int = 48
    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    do_sample: bool = True
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}] (0 = off), "
                             f"got {self.min_new_tokens}")
        if self.num_generations < 1:
            raise ValueError(f"num_generations must be >= 1, got {self.num_generations}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        self.stop = tuple(str(s) for s in self.stop)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Rollout:
    """``S = P * G`` sampled completions of ``P`` prompts, prompt-major (sample ``s`` -> prompt ``s // G``).

    Attributes:
        prompt_ids: ``P`` prompt token id lists (unpadded).
        completion_ids: ``S`` completion token id lists; each ends with its stop token unless
            ``truncated``; never empty.
        texts: ``S`` decoded completions (special tokens, including the stop token, removed).
        logps: ``S`` fp32 tensors of behaviour log-probs, one per completion token (CPU).
        truncated: ``[S]`` bool, the completion hit ``max_new_tokens`` without a stop token.
        num_generations: ``G``.
        params: the sampling settings used.
        pad_token_id: the id used for padding in :meth:`pack`.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    logps: list[Tensor]
    truncated: Tensor
    num_generations: int
    params: SamplingParams
    pad_token_id: int

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_samples(self) -> int:
        return len(self.completion_ids)

    @property
    def lengths(self) -> Tensor:
        """``[S]`` long: completion lengths (including the stop token)."""
        return torch.tensor([len(c) for c in self.completion_ids], dtype=torch.long)

    @property
    def group_ids(self) -> Tensor:
        """``[S]`` long: the prompt index of each sample (``s // G``)."""
        return torch.arange(self.num_samples) // self.num_generations

    @property
    def num_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    def sample_prompt_ids(self, s: int) -> list[int]:
        """The prompt token ids sample ``s`` answers."""
        return self.prompt_ids[s // self.num_generations]

    def select_groups(self, prompts: Sequence[int]) -> Rollout:
        """The rollout of prompts ``prompts`` only (each with its group of ``G`` samples), in that order."""
        g = self.num_generations
        samples = [p * g + j for p in prompts for j in range(g)]
        return dataclasses.replace(
            self, prompt_ids=[self.prompt_ids[p] for p in prompts],
            completion_ids=[self.completion_ids[s] for s in samples], texts=[self.texts[s] for s in samples],
            logps=[self.logps[s] for s in samples], truncated=self.truncated[torch.tensor(samples, dtype=torch.long)])

    @staticmethod
    def concat(parts: Sequence[Rollout]) -> Rollout:
        """One rollout of ``parts`` (same sampling settings), prompt after prompt."""
        if not parts:
            raise ValueError("Rollout.concat needs at least one rollout")
        first = parts[0]
        return dataclasses.replace(
            first, prompt_ids=[p for r in parts for p in r.prompt_ids],
            completion_ids=[c for r in parts for c in r.completion_ids], texts=[t for r in parts for t in r.texts],
            logps=[lp for r in parts for lp in r.logps], truncated=torch.cat([r.truncated for r in parts]))

    def behaviour_logp(self, indices: Sequence[int] | None = None) -> Tensor:
        """``[N]`` packed behaviour log-probs of the given samples (default: all)."""
        indices = range(self.num_samples) if indices is None else indices
        parts = [self.logps[i] for i in indices]
        return torch.cat(parts) if parts else torch.zeros(0)

    def pack(
        self,
        indices: Sequence[int] | Tensor | None = None,
        *,
        contexts: Sequence[Sequence[int]] | None = None,
        max_context_len: int | None = None,
        device: torch.device | str | None = None,
        layout: str = "padded",
    ) -> PackedBatch:
        """Pack samples ``indices`` (default: all, in order) for a forward pass and the loss core.

        Args:
            indices: which samples, in the order they should appear in the batch (a
                micro-batch of the rollout).
            contexts: one context per selected sample to use instead of its prompt (e.g. the SDPO
                teacher context); the completion tokens, ``targets`` and ``seq_ids`` are unchanged.
            max_context_len: keep at most this many context tokens, cutting on the left.
            device: where to put the tensors (default CPU).
            layout: ``"padded"`` (a row per sample) or ``"shared"`` (each distinct context once, its
                samples' completions after it; :func:`~denser.engines.packing.build_shared_batch`).
        """
        if indices is None:
            indices = list(range(self.num_samples))
        elif isinstance(indices, Tensor):
            indices = indices.tolist()
        indices = [int(i) for i in indices]
        if contexts is None:
            contexts = [self.sample_prompt_ids(i) for i in indices]
        elif len(contexts) != len(indices):
            raise ValueError(f"pack: {len(contexts)} contexts for {len(indices)} samples")
        batch = build_packed_batch(
            contexts,
            [self.completion_ids[i] for i in indices],
            pad_token_id=self.pad_token_id,
            old_logp=self.behaviour_logp(indices),
            sample_ids=indices,
            max_context_len=max_context_len,
            layout=layout,
        )
        return batch.to(device) if device is not None else batch


# --------------------------------------------------------------------------------------------
# stop tokens and engines


def truncate_at_stop(tokens: Sequence[int], stop_token_ids: Sequence[int] | set[int]) -> tuple[list[int], bool]:
    """Cut ``tokens`` after the first stop token (kept). Returns ``(tokens, truncated)``:
    ``truncated`` is True when no stop token occurs."""
    stops = set(int(t) for t in stop_token_ids)
    out: list[int] = []
    for t in tokens:
        out.append(int(t))
        if int(t) in stops:
            return out, False
    return out, True


def cut_at_stop_strings(tokens: Sequence[int], truncated: bool, stop: Sequence[str],
                        tokenizer: Any, min_tokens: int = 0) -> tuple[list[int], bool]:
    """``tokens`` cut after the first token whose decoded prefix contains one of the ``stop`` strings
    (the token kept). With ``min_tokens`` (``SamplingParams.min_new_tokens``), only a stop string
    that the ``min_tokens``-th token or a later one completes counts, as vLLM's ``min_tokens``. Returns
    ``(tokens, truncated)``: ``truncated`` is False when a stop string ended the completion, else as
    given. Every engine applies it to its token ids, so they agree."""
    tokens = [int(t) for t in tokens]
    # an occurrence counts when it ends past the text of the first min_tokens - 1 tokens
    floor = len(tokenizer.decode(tokens[:min_tokens - 1], skip_special_tokens=False)) if min_tokens > 1 else 0

    def hit(k: int) -> bool:
        text = tokenizer.decode(tokens[:k], skip_special_tokens=False)
        return any(text.find(s, max(0, floor - len(s) + 1)) >= 0 for s in stop)

    if not stop or not tokens or not hit(len(tokens)):
        return tokens, truncated
    lo, hi = max(1, min_tokens), len(tokens)  # the shortest prefix that holds one (a longer prefix holds it too)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return tokens[:lo], False


@dataclass(frozen=True)
class NoOptions:
    """The options of an engine that takes none."""


def request_seed(*keys: int) -> int:
    """A 63-bit seed from integer ``keys`` (docs/design.md, Contract 4): ``request_seed(run_seed, step, round,
    index)`` for the prompt at global ``index`` of a training step's generation ``round``,
    ``request_seed(seed, index)`` for eval row ``index``, ``request_seed(prompt_seed, j)`` for sample
    ``j`` of a prompt. A BLAKE2b hash of the keys: the same in every process, Python and platform,
    and independent of the process's rank unless a key is."""
    data = b"".join(int(k).to_bytes(16, "little", signed=True) for k in keys)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def checked_prompts(prompt_ids: Sequence[Sequence[int]]) -> list[list[int]]:
    """``prompt_ids`` as lists of ints, refused (one line) when there are none or one is empty:
    what every engine's ``generate`` checks first."""
    prompts = [list(map(int, p)) for p in prompt_ids]
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt: render prompts with render_prompt() first")
    return prompts


def prompt_seeds(num_prompts: int, seeds: Sequence[int] | None = None, seed: int | None = None) -> list[int]:
    """The request seed of each of a ``generate`` call's prompts (see :meth:`RolloutEngine.generate`):
    ``seeds``, else ``request_seed(seed, p)`` for the prompt at position ``p``, else ``request_seed``
    of one draw from the global RNG and ``p``."""
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != num_prompts:
            raise ValueError(f"generate: {len(seeds)} seeds for {num_prompts} prompts; pass one seed per prompt")
        return seeds
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    return [request_seed(seed, p) for p in range(num_prompts)]


class RolloutEngine(ABC):
    """Samples completions for prompts. One engine per policy model.

    Engines that keep their own copy of the weights (an inference server) refresh it in
    :meth:`update_weights`, which the loop calls after each rollout batch's updates; the HF engine samples
    from the live policy and needs nothing.
    """

    name: str = ""
    #: the dataclass of the engine's options (``register_rollout_engine(name, options=...)``)
    options_class: type = NoOptions
    #: the engine holds its own copy of the weights (``update_weights`` copies; the loop times it as
    #: ``time_sync_s``) and computes its own behaviour log-probs, close to the trainer's but not
    #: equal (the rollout correction is on by default)
    copies_weights: bool = False

    @abstractmethod
    def generate(
        self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams, *, seeds: Sequence[int] | None = None,
        seed: int | None = None, stop: Callable[[], bool] | None = None,
    ) -> Rollout:
        """Sample ``params.num_generations`` completions for each prompt (token ids, e.g. from
        :func:`denser.trainers.models.render_prompt`).

        ``seeds``: one per prompt, the request's seed (:func:`request_seed`); the prompt's samples
        are drawn from it alone, so a prompt with the same seed gets the same completions whatever
        else the call holds, how the engine batches it and in which process it runs. ``seed``: the
        prompts get ``request_seed(seed, p)`` by their position ``p`` in the call (for a fixed list
        of prompts, e.g. an eval split). Neither: one seed drawn from the global RNG
        (:func:`prompt_seeds`). An engine never draws from the global RNG otherwise. Greedy
        decoding (``params.do_sample=False``) ignores the seeds.

        ``stop``: polled while generating (a graceful stop of the run: the HF engine polls it at
        every token and, in a single process, before every layer); once it returns True the engine
        may end every completion early, even with no token: the caller then abandons the rollout."""

    def update_weights(self, model: Any) -> None:  # noqa: B027 - optional hook
        """Bring the engine's weights up to date with ``model`` (no-op by default). An engine that
        copies weights sets ``last_sync_seconds`` (the loop logs it per step)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the engine holds (an inference engine's memory); no-op by default."""

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this engine cannot run here (a missing package, with the install command), or None.
        Checked when a run names the engine (:class:`EngineSpec`), before anything loads."""
        return None


_ENGINES: dict[str, type[RolloutEngine]] = {}


def register_rollout_engine(name: str, *, options: type | None = None):
    """Class decorator: make an engine available as ``--engine name`` and ``get_rollout_engine(name, ...)``.

    ``options``: a dataclass of the engine's options. Each field is a keyword argument of the
    engine's constructor (``cls(model, tokenizer, **options)``), a flag ``--NAME-FIELD`` of
    ``denser train`` (``--hf-max-batch-size``: the engine's name keeps its options apart from the
    run's own flags) and a key of a run's ``engine_args:``; its ``metadata["help"]`` is the flag's
    help. Default: the options of the engine class it derives from (none for a direct subclass of
    :class:`RolloutEngine`)."""
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"rollout engine name {name!r}: use letters, digits, '-' and '_' (it prefixes flags)")
    if options is not None and not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise TypeError(f"register_rollout_engine({name!r}, options=...) takes a dataclass, got {options!r}")

    def deco(cls: type[RolloutEngine]) -> type[RolloutEngine]:
        cls.name = name
        cls.options_class = options if options is not None else getattr(cls, "options_class", NoOptions)
        _ENGINES[name] = cls
        return cls

    return deco


def rollout_engine_class(name: str) -> type[RolloutEngine]:
    """The class registered as ``name``; an unknown name raises ``ValueError`` listing the known ones."""
    if name not in _ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; known: {', '.join(sorted(_ENGINES))}")
    return _ENGINES[name]


def rollout_engine_options(name: str) -> type:
    """The options dataclass of the engine registered as ``name``."""
    return rollout_engine_class(name).options_class


def list_rollout_engines() -> list[str]:
    return sorted(_ENGINES)


@dataclass(frozen=True)
class EngineSpec:
    """Which rollout engine a run uses, with its options: what the run resolves before anything loads,
    and what evaluation and the continual measurements build their engine from.

    ``EngineSpec()`` is the default engine with its default options; ``options`` must be an instance
    of the engine's options dataclass (:func:`rollout_engine_options`); :meth:`from_args` builds it
    from a mapping (a config file's ``engine_args:``, flags, keyword arguments).
    """

    name: str = DEFAULT_ENGINE
    options: Any = None

    def __post_init__(self) -> None:
        problem = rollout_engine_class(self.name).unavailable()
        if problem:
            raise ValueError(problem)
        cls = rollout_engine_options(self.name)
        if self.options is None:
            object.__setattr__(self, "options", cls())
        elif not isinstance(self.options, cls):
            raise TypeError(f"engine {self.name!r} takes options of type {cls.__name__}, got "
                            f"{type(self.options).__name__}")

    @classmethod
    def from_args(cls, name: str = DEFAULT_ENGINE, args: Mapping[str, Any] | None = None, *,
                  where: str = "engine_args") -> EngineSpec:
        """Engine ``name`` with the options in ``args`` (option name: value; the rest default). An
        unknown option or a value of the wrong type raises ``ValueError`` naming it (``where``: what
        the user wrote it in, e.g. ``--config run.yaml: engine_args``)."""
        options = rollout_engine_options(name)
        args = dict(args or {})
        fields = {f.name: f for f in dataclasses.fields(options) if f.init}
        hints = typing.get_type_hints(options)
        values = {}
        for key, value in args.items():
            k = str(key).replace("-", "_")
            if k not in fields:
                valid = ", ".join(sorted(fields)) or "none"
                raise ValueError(f"{where}: engine {name!r} has no option {key!r}; its options: {valid}")
            values[k] = check_value(f"{where}: {name} option {k!r}", hints[k], value)
        return cls(name, options(**values))

    def args(self) -> dict[str, Any]:
        """The options as a mapping (a run's ``engine_args:``); :meth:`from_args` reads it back."""
        return dataclasses.asdict(self.options)

    def build(self, model: Any, tokenizer: Any) -> RolloutEngine:
        """The engine for ``model`` (unwrapped) and its ``tokenizer``."""
        return rollout_engine_class(self.name)(model, tokenizer, **self.args())


def get_rollout_engine(name: str, model: Any, tokenizer: Any, **options: Any) -> RolloutEngine:
    """Build the engine registered as ``name`` (``"hf"``) for ``model`` and ``tokenizer``, with
    ``options`` (fields of its options dataclass; the rest default)."""
    return EngineSpec.from_args(name, options, where="get_rollout_engine").build(model, tokenizer)
