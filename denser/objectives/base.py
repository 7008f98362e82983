"""The objective contract: signals, the packed batch, the base class and the registry.

An objective is a dataclass whose fields are its hyper-parameters. It declares which signals
the loop must compute (``signals()``), which per-token statistics the loss core must produce
(``core_options()``), and writes its loss over those statistics (``loss(stats, batch)``).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from denser.kernels.options import CoreOptions
from denser.kernels.stats import LossOutput, TokenStats
from denser.plugins import OBJECTIVES_GROUP, PluginError, load_entry_points


class Signal(str, Enum):
    """What the loop can compute for an objective, and computes only when declared."""

    REWARDS = "rewards"
    ADVANTAGES = "advantages"
    OLD_LOGP = "old_logp"
    REF_LOGP = "ref_logp"
    TEACHER = "teacher"
    ENTROPY = "entropy"

    def __str__(self) -> str:  # StrEnum behaviour on Python 3.10 too
        return self.value


@dataclass
class PolicyBatch:
    """One micro-batch of packed completion tokens, and what the objective needs of it.

    Tokens are packed: ``N`` completion tokens, the tokens of one completion contiguous,
    ``seq_ids[i]`` in ``[0, num_seqs)`` naming the completion token ``i`` belongs to.
    Per-sequence tensors are ``[num_seqs]``; per-token tensors are ``[N]``.

    ``global_tokens`` and ``global_seqs`` are the loss normalisers: the number of loss tokens and
    sequences in the *whole* optimiser step (all gradient-accumulation micro-batches on all
    processes), so that summing micro-batch losses gives the loss of the full batch.
    ``norm_length`` is the constant divisor of ``seq-mean-token-sum-norm`` (Dr. GRPO): usually
    the generation budget ``max_new_tokens``.
    ``global_teacher_tokens`` and ``global_teacher_seqs`` are the same counts restricted to the
    samples that have a teacher context (``teacher_mask``): the normalisers of a distillation
    loss, which averages over distilled tokens only. ``None`` falls back to ``global_tokens`` /
    ``global_seqs`` (the distillation loss is then scaled by the fraction of samples with a teacher).
    ``normaliser_counts(batch)`` in ``denser.objectives.common`` gives a micro-batch's share of all
    four counts; the loop sums them over micro-batches and processes.
    ``micro_batch`` numbers the micro-batches of one optimiser step across processes
    (``rank * accumulation_steps + i``) so that random draws in ``Objective.prepare`` (token
    masks) differ between micro-batches and are reproducible.
    """

    seq_ids: Tensor
    num_seqs: int
    global_tokens: float
    global_seqs: float
    token_mask: Tensor | None = None  # [N] bool: tokens that count in the loss (default: all)
    rewards: Tensor | None = None  # [S]
    advantages: Tensor | None = None  # [S] group advantages (or [N] per-token)
    old_logp: Tensor | None = None  # [N] behaviour-policy log-probs
    ref_logp: Tensor | None = None  # [N] frozen reference log-probs
    teacher_mask: Tensor | None = None  # [S] bool: the sample has a teacher context
    norm_length: float = 1.0
    step: int = 0  # optimiser step, for schedules
    total_steps: int = 1
    extras: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # per-token [N] tensors an objective prepares
    global_teacher_tokens: float | None = None  # loss tokens of samples with a teacher, whole step
    global_teacher_seqs: float | None = None  # samples with a teacher, whole step
    micro_batch: int = 0  # index of this micro-batch in the step (across processes), for random draws
    # True: ``advantages`` is per-token [N]; False: per-sequence [S]; None: inferred from its size
    # on the full micro-batch (and then kept, so a chunk of tokens is never mistaken for sequences).
    token_level_advantages: bool | None = None

    def __post_init__(self) -> None:
        if self.seq_ids.dim() != 1:
            raise ValueError(f"PolicyBatch.seq_ids must be 1-D [N], got shape {tuple(self.seq_ids.shape)}")
        if self.token_mask is None:
            self.token_mask = torch.ones_like(self.seq_ids, dtype=torch.bool)
        if self.token_level_advantages is None and self.advantages is not None:
            n, s = self.num_tokens, self.num_seqs
            if self.advantages.numel() == s:
                self.token_level_advantages = False
            elif self.advantages.numel() == n:
                self.token_level_advantages = True
            else:
                raise ValueError(
                    f"PolicyBatch.advantages has {self.advantages.numel()} elements; expected one per sequence "
                    f"({s}) or one per token ({n})"
                )

    @property
    def num_tokens(self) -> int:
        return int(self.seq_ids.numel())

    @property
    def seq_lens(self) -> Tensor:
        """Loss tokens per sequence, ``[num_seqs]`` float (from the whole micro-batch)."""
        if "_seq_lens" not in self.extras:
            self.extras["_seq_lens"] = torch.zeros(self.num_seqs, device=self.seq_ids.device).index_add_(
                0, self.seq_ids, self.token_mask.float()
            )
        return self.extras["_seq_lens"]

    @property
    def seq_starts(self) -> Tensor:
        """``[N]`` bool: the first token (in packed order) of each sequence of the full micro-batch.

        Lets a per-sequence metric be written over tokens and still count each sequence once when
        the tokens are split into chunks: ``Metric.of(per_seq[seq_ids], batch.seq_starts)``.
        """
        if "_seq_starts" not in self.extras:
            starts = torch.ones_like(self.seq_ids, dtype=torch.bool)
            if self.seq_ids.numel() > 1:
                starts[1:] = self.seq_ids[1:] != self.seq_ids[:-1]
            self.extras["_seq_starts"] = starts
        return self.extras["_seq_starts"]

    def token_advantages(self) -> Tensor:
        """Advantages broadcast to tokens ``[N]``."""
        if self.advantages is None:
            raise ValueError("this objective needs advantages but the batch has none (declare Signal.ADVANTAGES)")
        if self.token_level_advantages:
            return self.advantages
        return self.advantages[self.seq_ids]

    def token_slice(self, start: int, stop: int) -> "PolicyBatch":
        """The tokens ``[start, stop)`` with per-sequence tensors and normalisers untouched.

        Per-sequence quantities that need every token of a sequence (``seq_lens``) are computed
        on the full batch first, so a chunk sees the same normalisers as the whole.
        """
        _ = self.seq_lens, self.seq_starts  # materialise on the full batch before slicing
        per_token = lambda t: None if t is None or t.numel() != self.num_tokens else t[start:stop]  # noqa: E731
        adv = self.advantages
        if adv is not None and self.token_level_advantages:
            adv = adv[start:stop]
        extras = {k: (v if k in _PER_SEQUENCE_EXTRAS else v[start:stop]) for k, v in self.extras.items()}
        return dataclasses.replace(
            self,
            seq_ids=self.seq_ids[start:stop],
            token_mask=self.token_mask[start:stop],
            old_logp=per_token(self.old_logp),
            ref_logp=per_token(self.ref_logp),
            advantages=adv,
            extras=extras,
        )


_PER_SEQUENCE_EXTRAS = frozenset({"_seq_lens"})  # cached [S] tensors that chunks share unsliced


class Objective:
    """Base class of every objective. Subclasses are dataclasses registered by name.

    ``separable`` tells the fused loss core how it may evaluate the loss chunk by chunk while a
    chunk's logits are still in memory (DESIGN.md, Contract 1b):
      "token":    the loss is a sum of per-token terms with normalisers fixed in the batch;
      "sequence": a sum of per-sequence terms (chunks must end on sequence boundaries);
      None:       not separable; the core computes all statistics first, then the loss.
    """

    name: ClassVar[str] = ""
    separable: ClassVar[Literal["token", "sequence"] | None] = "token"

    def signals(self) -> frozenset[Signal]:
        """The signals the loop must compute for this objective (may depend on fields)."""
        raise NotImplementedError

    def core_options(self) -> CoreOptions:
        """Which statistics the loss core computes and how (``denser.kernels.CoreOptions``):
        ``need_entropy``, ``need_divergence``, ``alpha``, ``topk``, ``add_tail``; the temperature
        comes from the ``fused_loss`` call. The default asks for the sampled-token log-prob, and
        the entropy when ``Signal.ENTROPY`` is declared.
        """
        return CoreOptions(need_entropy=Signal.ENTROPY in self.signals())

    def advantages(self, rewards: Tensor, num_generations: int) -> Tensor:
        """Per-sequence advantages ``[S]`` from rewards ``[S]`` (groups of ``num_generations``
        consecutive samples). The loop calls it when the objective declares ``Signal.ADVANTAGES``.
        Default: mean-centred and std-normalised within each group (GRPO)."""
        from denser.objectives.common import group_advantages

        return group_advantages(rewards, num_generations)

    def prepare(self, batch: PolicyBatch) -> PolicyBatch:
        """Called once per micro-batch before any chunking (e.g. to draw a random token mask)."""
        return batch

    def loss(self, stats: TokenStats, batch: PolicyBatch) -> LossOutput:
        raise NotImplementedError


# --------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Objective]] = {}


def register_objective(name: str):
    """Class decorator: register a dataclass objective under ``name``.

    The class is made a dataclass if it is not one already; every field is a hyper-parameter
    and becomes a CLI flag (document it with ``field(metadata={"help": ...})``).
    """

    def decorate(cls):
        if not isinstance(cls, type) or not issubclass(cls, Objective):
            raise TypeError(f"@register_objective({name!r}) must decorate a subclass of denser.objectives.Objective")
        existing = _REGISTRY.get(name)
        if existing is not None and not _same_class(existing, cls):
            raise ValueError(
                f"an objective named {name!r} is already registered ({_qualified(existing)}); "
                f"{_qualified(cls)} must pick another name"
            )
        if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
            cls = dataclass(cls)
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_class(a: type, b: type) -> bool:
    """The same class, or the same definition run again (a module reloaded): registering it twice is harmless."""
    return a is b or _qualified(a) == _qualified(b)


def unregister_objective(name: str) -> None:
    """Remove a registered objective (for tests and interactive sessions)."""
    _REGISTRY.pop(name, None)


def objective_class(name: str) -> type[Objective]:
    """The class registered as ``name``; an unknown name first loads the installed plugins
    (entry points of the ``denser.objectives`` group, see :mod:`denser.plugins`)."""
    _load_builtins()
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown objective {name!r}; registered objectives: {known}")
    return _REGISTRY[name]


def objective_fields(cls_or_obj) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls_or_obj) if f.init]


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def get_objective(name: str, **overrides) -> Objective:
    """Instantiate the objective registered as ``name`` with hyper-parameter ``overrides``.

    Raises ``ValueError`` naming the problem for an unknown name, an unknown field or a value of
    the wrong type.
    """
    cls = objective_class(name)
    fields = {f.name: f for f in objective_fields(cls)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"objective {name!r} has no field(s) {', '.join(unknown)}; its fields are: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {k: coerce_field_value(name, k, hints.get(k, Any), v) for k, v in overrides.items()}
    return cls(**values)


def coerce_field_value(objective: str, field_name: str, annotation, value):
    """Check ``value`` against a field's annotation, converting int to float where lossless."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    where = f"objective {objective!r} field {field_name!r}"
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_field_value(objective, field_name, arg, value)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(f"{where} got {value!r} of type {type(value).__name__}; expected {annotation}")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a float, got {value!r} ({type(value).__name__})")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an int, got {value!r} ({type(value).__name__})")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be a bool (true/false), got {value!r} ({type(value).__name__})")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r} ({type(value).__name__})")
        return value
    return value


def list_objectives() -> list[tuple[str, str, frozenset[Signal]]]:
    """``(name, one-line doc, signals with default fields)`` for every registered objective,
    installed plugins included."""
    _load_builtins()
    _load_plugins()
    rows = []
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append((name, doc[0] if doc else "", cls().signals()))
    return rows


def _load_builtins() -> None:
    import denser.objectives  # noqa: F401  (registers the built-in families on import)


def _load_plugins() -> None:
    """Register the objectives of installed packages (entry-point group ``denser.objectives``): a
    module entry registers on import; a class entry is registered under the entry's name."""
    for entry, obj in load_entry_points(OBJECTIVES_GROUP):
        if isinstance(obj, type) and issubclass(obj, Objective) and obj not in _REGISTRY.values():
            try:
                register_objective(entry)(obj)
            except ValueError as e:
                raise PluginError(f"plugin {entry!r} ({OBJECTIVES_GROUP} entry point {obj.__module__}): {e}") from None
