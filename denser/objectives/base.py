"""The objective contract: the signals, the base class every objective derives from, and the registry.

An objective is a dataclass whose fields are its hyper-parameters. Everything the loop asks of it
is a method of :class:`Objective`, with its default here (docs/design.md, Contract 2):

    signals()       which signals the loop computes for it, and only those
    advantages()    per-sequence advantages from rewards (when it declares ADVANTAGES)
    rollout_advantages()  the general form: advantages (per sequence or per token) from the whole
                    rollout batch (AdvantageInputs: rewards, token masks, behaviour and reference
                    log-probs, a sum over processes); default: advantages(rewards, G)
    teacher_spec()  how teacher contexts are built and which weights score them (TEACHER, TEACHER_LOGP)
    core_options()  which per-token statistics the loss core computes, and how
    prepare()       once per micro-batch, before chunking (e.g. random token masks)
    loss()          the loss over the core's per-token statistics and the batch
    for_run()       a copy configured for the run's optimiser updates per rollout batch
    run_defaults()  run options (TrainConfig fields) the objective turns on where the user sets none
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from denser.kernels.options import CoreOptions
from denser.kernels.stats import LossOutput, TokenStats
from denser.objectives.batch import PolicyBatch
from denser.objectives.common import group_advantages
from denser.objectives.fields import check_value
from denser.objectives.teacher import TeacherSpec
from denser.plugins import OBJECTIVES_GROUP, PluginError, load_entry_points


class Signal(str, Enum):
    """What the loop can compute for an objective, and computes only when declared."""

    REWARDS = "rewards"  # task scores [S] (batch.rewards)
    ADVANTAGES = "advantages"  # Objective.rollout_advantages(AdvantageInputs): [S] or per token (batch.advantages)
    OLD_LOGP = "old_logp"  # behaviour log-probs of the sampled tokens [N] (batch.old_logp)
    REF_LOGP = "ref_logp"  # a frozen reference model's log-probs of the sampled tokens [N] (batch.ref_logp)
    TEACHER = "teacher"  # teacher contexts (batch.teacher_mask) and the teacher's hidden states for the core
    TEACHER_LOGP = "teacher_logp"  # the teacher's log-prob of the sampled token [N] (batch.extras[TEACHER_LOGP])
    ENTROPY = "entropy"  # the policy's per-token entropy (stats.entropy)
    # the reference's log-probs of every sample of the rollout batch, before its updates, for the advantages
    # (AdvantageInputs.ref_logp: a KL penalty in the reward); declared with REF_LOGP, whose per-micro-batch
    # batch.ref_logp then reuses them (one reference forward per sample)
    ROLLOUT_REF_LOGP = "rollout_ref_logp"

    def __str__(self) -> str:  # StrEnum behaviour on Python 3.10 too
        return self.value


TEACHER_SIGNALS = frozenset({Signal.TEACHER, Signal.TEACHER_LOGP})  # either one needs a teacher (Objective.teacher)


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class AdvantageInputs:
    """What :meth:`Objective.rollout_advantages` reads: this process's share of one rollout batch.

    ``S`` samples in groups of ``num_generations`` consecutive ones; sample ``s`` has ``L_s``
    completion tokens. Per-token inputs are lists of ``S`` tensors ``[L_s]`` (CPU, fp32 / bool).

    - ``rewards [S]``: the task's scores (after overlong shaping);
    - ``token_mask``: per sample, its loss tokens (all True unless ``--mask-truncated-completions``
      masks a truncated completion); None: every token counts;
    - ``old_logp``: per sample, the behaviour log-probs of its tokens (the engine's sampling
      log-probs, or the pre-update forward's: verl's ``old_log_probs``); None when not known;
    - ``ref_logp``: per sample, the frozen reference's log-probs of its tokens, when the objective
      declares ``Signal.ROLLOUT_REF_LOGP``, else None;
    - ``reduce``: sums a tensor over the run's processes (identity with one), for statistics of
      the whole batch (REINFORCE++ whitens over every process's tokens).
    """

    rewards: Tensor
    num_generations: int
    token_mask: list[Tensor] | None = None
    old_logp: list[Tensor] | None = None
    ref_logp: list[Tensor] | None = None
    reduce: Callable[[Tensor], Tensor] = _identity

    def masks(self) -> list[Tensor]:
        """``token_mask``, or all-True masks shaped like ``old_logp`` / ``ref_logp``."""
        if self.token_mask is not None:
            return self.token_mask
        like = self.old_logp if self.old_logp is not None else self.ref_logp
        if like is None:
            raise ValueError("AdvantageInputs: token_mask, old_logp and ref_logp are all None; one gives the token counts")
        return [torch.ones(t.shape, dtype=torch.bool) for t in like]


class Objective:
    """Base class of every objective. Subclasses are dataclasses registered by name.

    ``separable`` tells the fused loss core how it may evaluate the loss chunk by chunk while a
    chunk's logits are still in memory (docs/design.md, Contract 1b):
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
        return group_advantages(rewards, num_generations)

    def rollout_advantages(self, inputs: AdvantageInputs) -> Tensor | list[Tensor]:
        """Advantages from the whole rollout batch (:class:`AdvantageInputs`): a tensor ``[S]`` (one per
        sample, broadcast to its tokens) or a list of ``S`` tensors ``[L_s]`` (one per token). The loop
        calls it, once per rollout batch, when the objective declares ``Signal.ADVANTAGES``.
        Default: ``self.advantages(inputs.rewards, inputs.num_generations)``, so an objective whose
        advantages depend on the rewards alone overrides :meth:`advantages` only."""
        return self.advantages(inputs.rewards, inputs.num_generations)

    def teacher_spec(self) -> TeacherSpec | None:
        """How the loop builds teacher contexts and which weights score them, or None (no teacher).

        The loop asks only when ``signals()`` declares ``Signal.TEACHER`` or ``Signal.TEACHER_LOGP``.
        Default: SDPO's recipe (``TeacherSpec()``) when one of them is declared, else None.
        (Not named ``teacher``: that is the field behind sdpo's ``--teacher`` flag.)"""
        return TeacherSpec() if self.signals() & TEACHER_SIGNALS else None

    def prepare(self, batch: PolicyBatch) -> PolicyBatch:
        """Called once per micro-batch before any chunking (e.g. to draw a random token mask)."""
        return batch

    def loss(self, stats: TokenStats, batch: PolicyBatch) -> LossOutput:
        raise NotImplementedError

    def for_run(self, updates_per_rollout: int) -> Objective:
        """The objective as a run making ``updates_per_rollout`` optimiser updates per rollout batch
        uses it (``--mini-batches`` x ``--epochs``); the loop calls it once, before anything else, and
        uses the result throughout. Default: ``self``, unchanged.

        An objective whose ratios or importance weights need behaviour log-probs when the policy has
        moved since sampling returns a copy that declares ``Signal.OLD_LOGP`` when
        ``updates_per_rollout > 1`` (``grpo``, ``sdpo`` and the hybrids turn ``use_old_logp`` on), so
        several updates per rollout can never run with every ratio at 1."""
        return self

    def run_defaults(self) -> dict[str, Any]:
        """Run options (``TrainConfig`` field names -> values) this objective turns on, applied where the
        user sets none (flag, config file or Python argument; ``resolve_run``). Only the run options that
        default to None ("not set") may be named (``denser.trainers.config.preset_options()``). Default:
        none. The ``dapo`` preset turns on dynamic sampling and overlong reward shaping, which belong to
        the loop and task."""
        return {}


# --------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Objective]] = {}
DEFAULT_OBJECTIVE = "sdpo"  # what `denser train` optimises without --objective


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
    """Check ``value`` against an objective field's annotation, converting int to float where lossless
    (:func:`denser.objectives.fields.check_value`, naming the field as ``objective 'x' field 'y'``)."""
    return check_value(f"objective {objective!r} field {field_name!r}", annotation, value)


def list_objectives() -> list[tuple[str, str, frozenset[Signal]]]:
    """``(name, one-line doc, signals with default fields)`` for every registered objective,
    installed plugins included."""
    _load_plugins()
    rows = []
    for name in sorted(_REGISTRY):
        cls = _REGISTRY[name]
        doc = (cls.__doc__ or "").strip().splitlines()
        rows.append((name, doc[0] if doc else "", cls().signals()))
    return rows


def _load_plugins() -> None:
    """Register the objectives of installed packages (entry-point group ``denser.objectives``): a
    module entry registers on import; a class entry is registered under the entry's name."""
    for entry, obj in load_entry_points(OBJECTIVES_GROUP):
        if isinstance(obj, type) and issubclass(obj, Objective) and obj not in _REGISTRY.values():
            try:
                register_objective(entry)(obj)
            except ValueError as e:
                raise PluginError(f"plugin {entry!r} ({OBJECTIVES_GROUP} entry point {obj.__module__}): {e}") from None
