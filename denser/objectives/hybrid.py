"""Sparse-dense mixes of GRPO (one scalar reward per sample) and SDPO (a teacher per token).

- ``hybrid``      loss blend:      ``lam * grpo_loss + (1 - lam) * sdpo_loss``.
- ``hybrid_adv``  advantage blend: the GRPO clipped surrogate with the per-token advantage
  ``lam * A_group + (1 - lam) * sg[logp_teacher(y_t) - logp_student(y_t)]``.

Both compose the ``grpo`` and ``sdpo`` objectives: their fields are the union of the two
families' fields (one flag where both have it: ``use_old_logp``, ``seed``; ``loss_agg_mode`` is the
GRPO part's, and ``hybrid``'s SDPO part has its own, ``sdpo_loss_agg_mode``, defaulting to SDPO's
per-sequence mean), and their loss calls ``GRPO.loss`` / ``SDPO.loss`` on parts built from those fields. ``lam == 1`` returns
exactly the ``grpo`` loss (the SDPO part is not evaluated and no teacher is needed), ``lam == 0``
exactly the ``sdpo`` loss (``hybrid``) or the pure dense-advantage surrogate (``hybrid_adv``).

The density schedule (``DensitySchedule``) is shared and moves along the run's steps (rollout
batches; every update of a step uses the step's value): ``lam`` moves from ``lam`` at step 0 to
``lam_end`` at step ``total_steps - 1`` (linear or cosine), and ``density`` (likewise scheduled
to ``density_end``) is the fraction of tokens, drawn at random per token for every update, that get
the dense signal. In the loss blend a token left out is not distilled and the kept ones are
weighted ``1 / density`` (the SDPO part stays a mean over distilled tokens, as ``mask_ratio``);
in the advantage blend a token left out gets the group advantage part only (no reweighting: an
advantage is per token, not an average).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from denser.kernels.options import CoreOptions
from denser.kernels.stats import LossOutput, Metric, TokenStats
from denser.objectives.base import Objective, Signal, register_objective
from denser.objectives.batch import TEACHER_LOGP, PolicyBatch
from denser.objectives.common import AggMode, linear_or_cosine, require, token_keep_mask
from denser.objectives.grpo import GRPO
from denser.objectives.sdpo import SDPO, SDPO_AGG_MODE, TOKEN_WEIGHT
from denser.objectives.teacher import TeacherSpec

DENSE_MASK = "hybrid_dense_mask"  # batch.extras key written by HybridAdv.prepare(): 1 = token gets the dense part


@dataclass
class DensitySchedule:
    """The sparse/dense mix over training: ``lam`` (weight of the sparse GRPO part) and ``density``."""

    lam: float = field(
        default=0.5,
        metadata={"help": "weight of the sparse GRPO part (1 = pure grpo, 0 = pure dense); its value at step 0"},
    )
    lam_end: float | None = field(
        default=None,
        metadata={"help": "lam at the last step (total_steps - 1), reached along lam_schedule; none keeps lam constant"},
    )
    lam_schedule: Literal["linear", "cosine"] = field(
        default="linear", metadata={"help": "shape of the lam and density schedules: linear or cosine (half-cosine easing)"}
    )
    density: float = field(
        default=1.0,
        metadata={"help": "fraction of tokens, drawn at random per token for every update, that get the dense signal; value at step 0"},
    )
    density_end: float | None = field(
        default=None, metadata={"help": "density at the last step; none keeps density constant"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random token draws (combined with the step, update and micro-batch)"})

    def lam_at(self, batch: PolicyBatch) -> float:
        return linear_or_cosine(self.lam, self.lam_end, batch.step, batch.total_steps, self.lam_schedule)

    def density_at(self, batch: PolicyBatch) -> float:
        return linear_or_cosine(self.density, self.density_end, batch.step, batch.total_steps, self.lam_schedule)

    def lam_range(self) -> tuple[float, float]:
        ends = [self.lam] + ([] if self.lam_end is None else [self.lam_end])
        return min(ends), max(ends)

    def check_schedule(self, name: str) -> None:
        for key in ("lam", "lam_end"):
            value = getattr(self, key)
            require(value is None or 0.0 <= value <= 1.0, name, f"{key}={value} must be in [0, 1]")
        for key in ("density", "density_end"):
            value = getattr(self, key)
            require(value is None or 0.0 < value <= 1.0, name, f"{key}={value} must be in (0, 1]")
        require(self.lam_schedule in ("linear", "cosine"), name, f"lam_schedule={self.lam_schedule!r} must be 'linear' or 'cosine'")


def _part(obj: Any, cls: type[Objective], **overrides: Any) -> Objective:
    """An instance of ``cls`` (e.g. GRPO) with the values of ``obj``'s fields of the same names
    (and ``overrides``)."""
    try:
        return cls(**{**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if f.init}, **overrides})
    except ValueError as e:  # name the objective the user asked for, not the part
        raise ValueError(str(e).replace(f"objective {cls.name!r}", f"objective {type(obj).name!r}", 1)) from None


def _lam_metric(lam: float, batch: PolicyBatch) -> Metric:
    count = batch.token_mask.float().sum()
    return Metric(count * lam, count)


@register_objective("hybrid")
@dataclass
class Hybrid(DensitySchedule, GRPO, SDPO):
    """Loss blend lam * grpo + (1 - lam) * sdpo, with a lam and density schedule."""

    sdpo_loss_agg_mode: AggMode = field(
        default=SDPO_AGG_MODE,
        metadata={"help": "aggregation of the sdpo part (sdpo's loss_agg_mode; loss_agg_mode is the grpo part's): "
                          "seq-mean-token-mean = SDPO's per-sequence token mean over all sequences, token-mean = "
                          "over the distilled tokens"},
    )

    def __post_init__(self) -> None:
        self.grpo_part(), self.sdpo_part()  # validate both families' fields
        self.check_schedule(self.name or "hybrid")

    def grpo_part(self) -> GRPO:
        return _part(self, GRPO)

    def sdpo_part(self) -> SDPO:
        return _part(self, SDPO, loss_agg_mode=self.sdpo_loss_agg_mode)

    def signals(self) -> frozenset[Signal]:
        low, high = self.lam_range()
        out: set[Signal] = set()
        if high > 0:
            out |= self.grpo_part().signals()
        if low < 1:
            out |= self.sdpo_part().signals()
        return frozenset(out)

    def teacher_spec(self) -> TeacherSpec:
        return self.sdpo_part().teacher_spec()

    def core_options(self) -> CoreOptions:
        low, high = self.lam_range()
        opts = self.sdpo_part().core_options() if low < 1 else CoreOptions()
        return dataclasses.replace(opts, need_entropy=high > 0 and self.grpo_part().core_options().need_entropy)

    def prepare(self, batch: PolicyBatch) -> PolicyBatch:
        if self.lam_at(batch) >= 1.0:
            return batch
        batch = self.sdpo_part().prepare(batch)
        density = self.density_at(batch)
        if density >= 1.0:
            return batch
        weight = token_keep_mask(batch, density, self.seed, "hybrid_density").float() / density
        if TOKEN_WEIGHT in batch.extras:
            weight = batch.extras[TOKEN_WEIGHT] * weight
        return dataclasses.replace(batch, extras={**batch.extras, TOKEN_WEIGHT: weight})

    def loss(self, stats: TokenStats, batch: PolicyBatch) -> LossOutput:
        lam = self.lam_at(batch)
        if lam >= 1.0:
            out = self.grpo_part().loss(stats, batch)
        elif lam <= 0.0:
            out = self.sdpo_part().loss(stats, batch)
        else:
            sparse = self.grpo_part().loss(stats, batch)
            dense = self.sdpo_part().loss(stats, batch)
            out = LossOutput(lam * sparse.loss + (1.0 - lam) * dense.loss, {**sparse.metrics, **dense.metrics})
        out.metrics["lam"] = _lam_metric(lam, batch)
        return out


@register_objective("hybrid_adv")
@dataclass
class HybridAdv(DensitySchedule, GRPO, TeacherSpec):
    """Advantage blend: GRPO surrogate with advantage lam * A_group + (1 - lam) * (logp_teacher(y) - logp_student(y)), detached."""

    def __post_init__(self) -> None:
        name = self.name or "hybrid_adv"
        self.grpo_part()
        problem = self.problem()  # the teacher fields (TeacherSpec's one check)
        require(problem is None, name, problem or "")
        self.check_schedule(name)

    def grpo_part(self) -> GRPO:
        return _part(self, GRPO)

    def signals(self) -> frozenset[Signal]:
        low, high = self.lam_range()
        out = set(self.grpo_part().signals())
        if low < 1:  # the dense part: teacher contexts (teacher_mask) and the teacher's log-prob of y
            out |= {Signal.TEACHER, Signal.TEACHER_LOGP}
        if high <= 0:
            out.discard(Signal.ADVANTAGES)
        return frozenset(out)

    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec.of(self)

    def core_options(self) -> CoreOptions:
        return self.grpo_part().core_options()

    def prepare(self, batch: PolicyBatch) -> PolicyBatch:
        density = self.density_at(batch)
        if self.lam_at(batch) >= 1.0 or density >= 1.0:
            return batch
        keep = token_keep_mask(batch, density, self.seed, "hybrid_density").float()
        return dataclasses.replace(batch, extras={**batch.extras, DENSE_MASK: keep})

    def loss(self, stats: TokenStats, batch: PolicyBatch) -> LossOutput:
        lam = self.lam_at(batch)
        grpo = self.grpo_part()
        if lam >= 1.0:
            out = grpo.loss(stats, batch)
            out.metrics["lam"] = _lam_metric(lam, batch)
            return out
        logp = stats.logp
        teacher_logp = batch.extras.get(TEACHER_LOGP)
        if teacher_logp is None:
            raise ValueError(
                f"objective {self.name!r} needs the teacher's log-prob of each sampled token in "
                f"batch.extras[{TEACHER_LOGP!r}] ([N], detached) for the dense advantage"
            )
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        if batch.teacher_mask is None:
            has_teacher = torch.ones_like(batch.token_mask)
        else:
            has_teacher = batch.teacher_mask.to(device=logp.device, dtype=torch.bool)[batch.seq_ids]
        dense_tokens = batch.token_mask & has_teacher
        if DENSE_MASK in batch.extras:
            dense_tokens = dense_tokens & (batch.extras[DENSE_MASK] > 0)
        dense = torch.where(dense_tokens, teacher_logp.to(logp.dtype) - logp.detach(), zero)
        if lam <= 0.0:
            advantages: Tensor = dense
        else:
            advantages = lam * batch.token_advantages().to(logp.dtype) + (1.0 - lam) * dense
        blended = dataclasses.replace(batch, advantages=advantages, token_level_advantages=True)
        out = grpo.loss(stats, blended)
        out.metrics["dense_adv"] = Metric.of(dense, dense_tokens)
        out.metrics["teacher_frac"] = Metric.of(has_teacher.float(), batch.seq_starts)
        out.metrics["distilled_frac"] = Metric.of(dense_tokens.float(), batch.token_mask)
        out.metrics["lam"] = _lam_metric(lam, batch)
        return out
