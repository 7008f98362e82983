"""SDPO: self-distillation policy optimisation (Huebotter et al. 2026; the SDPO and SDPO-CL code).

The teacher is the policy itself (live, EMA, frozen or trust-region weights) conditioned on a
successful sibling's answer and/or the environment's feedback; it scores the student's own
completion, and the student is pulled towards it token by token:

    per token t of a sample with a teacher context:
        full / topk:    l_t = D_alpha(p_teacher,t || p_student,t)        (``stats.divergence``)
        sampled_token:  l_t = sg[logp_s(y_t) - logp_t(y_t)] * logp_s(y_t)
        weighted by     w_t = sg[min(exp(logp_t - old_logp_t), is_clip)]   (IS correction)
    loss = aggregate(w * l, loss_agg_mode) over the distilled tokens:
        seq-mean-token-mean (default): sum over distilled sequences of their token mean, divided by
                                       the number of *all* sequences of the update (``batch.global_seqs``:
                                       samples without a teacher and fully masked ones count), as the
                                       SDPO code (token-mean over micro-batches of one sequence) and
                                       TRL's SDPOTrainer compute it;
        token-mean:                    sum over distilled tokens / the update's distilled tokens
                                       (``batch.global_teacher_tokens``; denser's earlier default);
        seq-mean-token-sum(-norm):     as ``aggregate``, over all sequences of the update.

``sampled_token`` is the reverse KL estimated on the sampled token only, written as the SDPO code
writes it: a REINFORCE surrogate whose gradient ``(logp_s(y) - logp_t(y)) grad logp_s(y)`` is the
score-function gradient of KL(p_s || p_t) (the ``grad logp_s`` term of the estimator has zero
mean and is dropped). Its value is therefore not the KL; the ``distill_loss`` metric reports the
estimate ``logp_s(y) - logp_t(y)``. It needs the teacher's log-prob of each sampled token, so
that mode declares ``Signal.TEACHER_LOGP`` and the loop puts it in ``batch.extras["teacher_logp"]``
(``[N]``, detached, same temperature); the core then computes no divergence
(``need_divergence=False``). When ``teacher_logp`` is present in the other modes it feeds the
``teacher_gap`` metric.

Samples without a teacher context (``teacher_mask`` False) contribute nothing; a micro-batch in
which no sample has one gives an exact 0 loss that still has a gradient graph.
``mask_ratio`` (SDPO-CL) drops a random fraction of the distilled tokens, drawn in ``prepare``;
kept tokens are weighted by ``1 / (1 - mask_ratio)`` so the loss stays an unbiased estimate of
the unmasked one (SDPO-CL averages over the kept tokens, which is the same in expectation).

Defaults follow the SDPO repository's ``actor.yaml`` (``self_distillation``): alpha 0.5, top-100
with a tail bucket, IS clip 2; the teacher fields are :class:`~denser.objectives.teacher.TeacherSpec`'s
(SDPO derives from it: EMA teacher at rate 0.05, SDPO's reprompt context with success threshold 0.5,
the sample's own success never its demonstration, thinking removed from demonstrations, feedback
included, SDPO's templates), and ``teacher_spec()`` is ``TeacherSpec.of(self)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch

from denser.kernels.options import CoreOptions
from denser.kernels.stats import LossOutput, Metric, TokenStats
from denser.objectives.base import Objective, Signal, register_objective
from denser.objectives.batch import TEACHER_LOGP, PolicyBatch
from denser.objectives.common import (
    AGG_MODES,
    AggMode,
    aggregate,
    behaviour_log_ratio,
    require,
    token_keep_mask,
    with_old_logp,
)
from denser.objectives.teacher import TeacherSpec

# SDPO's aggregation: each distilled sequence's token mean, summed, / all sequences of the update
SDPO_AGG_MODE: AggMode = "seq-mean-token-mean"
TOKEN_WEIGHT = "sdpo_token_weight"  # batch.extras key written by prepare(): 0 = dropped, else 1/keep_prob


@register_objective("sdpo")
@dataclass
class SDPO(Objective, TeacherSpec):
    """SDPO: distil the policy conditioned on a successful sibling and/or feedback into the policy, token by token."""

    alpha: float = field(
        default=0.5,
        metadata={"help": "divergence: 0 = forward KL(teacher||student), 1 = reverse KL(student||teacher), between = generalised JSD"},
    )
    distill_mode: Literal["full", "topk", "sampled_token"] = field(
        default="topk",
        metadata={
            "help": "'full' vocabulary, the student's 'topk' ids (with add_tail), or 'sampled_token' (reverse KL on "
            "the sampled token only; needs alpha=1 and batch.extras['teacher_logp'])"
        },
    )
    topk: int = field(default=100, metadata={"help": "support size of distill_mode='topk'"})
    add_tail: bool = field(
        default=True, metadata={"help": "top-k: append a bucket with the remaining mass (else renormalise over the top-k)"}
    )
    is_clip: float | None = field(
        default=2.0,
        metadata={"help": "importance weight min(exp(logp - old_logp), is_clip), detached; none disables the weight"},
    )
    mask_ratio: float = field(
        default=0.0,
        metadata={"help": "fraction of distilled tokens dropped at random, drawn afresh for every update (SDPO-CL); kept ones are weighted 1/(1-mask_ratio)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the random token mask (combined with the step, update and micro-batch)"})
    loss_agg_mode: AggMode = field(
        default=SDPO_AGG_MODE,
        metadata={
            "help": "seq-mean-token-mean: each distilled sequence's token mean, summed, / all sequences of the update "
            "(SDPO's code and TRL's SDPOTrainer); token-mean: / the update's distilled tokens (denser's earlier "
            "default); seq-mean-token-sum, seq-mean-token-sum-norm: / all sequences"
        },
    )
    use_old_logp: bool = field(
        default=False,
        metadata={
            "help": "declare behaviour log-probs (Signal.OLD_LOGP) for the IS weight even with one update per rollout "
            "batch (then the engine's sampling log-probs, see --old-logp-source); the loop turns it on itself when "
            "a step makes several updates. Off with one update: old_logp = logp.detach() and the weight is 1"
        },
    )

    separable = "token"

    def __post_init__(self) -> None:
        name = self.name or "sdpo"
        require(0.0 <= self.alpha <= 1.0, name, f"alpha={self.alpha} must be in [0, 1]")
        require(self.distill_mode in ("full", "topk", "sampled_token"), name,
                f"distill_mode={self.distill_mode!r} must be 'full', 'topk' or 'sampled_token'")
        require(self.distill_mode != "sampled_token" or self.alpha == 1.0, name,
                f"distill_mode='sampled_token' is the reverse KL on the sampled token and needs alpha=1.0, got alpha={self.alpha}")
        require(self.topk >= 1, name, f"topk={self.topk} must be >= 1")
        require(self.is_clip is None or self.is_clip > 0, name, f"is_clip={self.is_clip} must be > 0 (or None)")
        require(0.0 <= self.mask_ratio < 1.0, name, f"mask_ratio={self.mask_ratio} must be in [0, 1)")
        require(self.loss_agg_mode in AGG_MODES, name, f"loss_agg_mode={self.loss_agg_mode!r} must be one of {AGG_MODES}")
        problem = self.problem()  # the teacher fields (TeacherSpec's one check)
        require(problem is None, name, problem or "")

    def for_run(self, updates_per_rollout: int) -> SDPO:
        """With several updates per rollout batch the IS weight needs the pre-update policy: use_old_logp on."""
        return with_old_logp(self, updates_per_rollout)

    def signals(self) -> frozenset[Signal]:
        out = {Signal.REWARDS, Signal.TEACHER}
        if self.distill_mode == "sampled_token":
            out.add(Signal.TEACHER_LOGP)
        if self.use_old_logp:
            out.add(Signal.OLD_LOGP)
        return frozenset(out)

    def teacher_spec(self) -> TeacherSpec:
        return TeacherSpec.of(self)

    def core_options(self) -> CoreOptions:
        return CoreOptions(
            need_entropy=False,
            need_divergence=self.distill_mode != "sampled_token",
            alpha=self.alpha,
            topk=self.topk if self.distill_mode == "topk" else None,
            add_tail=self.add_tail,
        )

    def prepare(self, batch: PolicyBatch) -> PolicyBatch:
        """Draw the ``mask_ratio`` token dropout once per micro-batch (before chunking)."""
        if self.mask_ratio <= 0.0:
            return batch
        keep_prob = 1.0 - self.mask_ratio
        keep = token_keep_mask(batch, keep_prob, self.seed, "sdpo_mask")
        weight = keep.float() / keep_prob
        if TOKEN_WEIGHT in batch.extras:
            weight = batch.extras[TOKEN_WEIGHT] * weight
        return dataclasses.replace(batch, extras={**batch.extras, TOKEN_WEIGHT: weight})

    def loss(self, stats: TokenStats, batch: PolicyBatch) -> LossOutput:
        logp = stats.logp
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        if batch.teacher_mask is None:
            has_teacher_seq = torch.ones(batch.num_seqs, dtype=torch.bool, device=logp.device)
        else:
            has_teacher_seq = batch.teacher_mask.to(device=logp.device, dtype=torch.bool)
        has_teacher = has_teacher_seq[batch.seq_ids]
        distilled = batch.token_mask & has_teacher
        weight = batch.extras.get(TOKEN_WEIGHT)
        if weight is not None:
            distilled = distilled & (weight > 0)

        teacher_logp = batch.extras.get(TEACHER_LOGP)
        gap = None  # logp_s(y) - logp_t(y), 0 outside the distilled tokens
        if teacher_logp is not None:
            gap = torch.where(distilled, logp.detach() - teacher_logp.to(logp.dtype), zero)
        if self.distill_mode == "sampled_token":
            if gap is None:
                raise ValueError(
                    f"objective {self.name!r} with distill_mode='sampled_token' needs the teacher's log-prob of each "
                    f"sampled token in batch.extras[{TEACHER_LOGP!r}] ([N], detached)"
                )
            per_token = gap * logp
            estimate = gap
        else:
            if stats.divergence is None:
                raise ValueError(
                    f"objective {self.name!r} needs stats.divergence: pass teacher_hidden to the loss core "
                    "(core_options() asks for need_divergence=True)"
                )
            per_token = stats.divergence
            estimate = stats.divergence.detach()

        metrics = {
            "distill_loss": Metric.of(estimate, distilled),
            "teacher_frac": Metric.of(has_teacher.float(), batch.seq_starts),
            "distilled_frac": Metric.of(distilled.float(), batch.token_mask),
        }
        if gap is not None:
            metrics["teacher_gap"] = Metric.of(-gap, distilled)
        if self.is_clip is not None:
            ratio = torch.exp(behaviour_log_ratio(logp, batch)).detach()
            is_weight = ratio.clamp(max=self.is_clip)
            per_token = per_token * is_weight
            metrics["is_weight"] = Metric.of(is_weight, distilled)
            metrics["is_clip_frac"] = Metric.of((ratio > self.is_clip).float(), distilled)
        if weight is not None:
            per_token = per_token * weight.to(per_token.dtype)

        # token-mean: over the update's distilled tokens; sequence modes: over all of the update's sequences
        tokens = batch.global_teacher_tokens if batch.global_teacher_tokens is not None else batch.global_tokens
        loss = aggregate(per_token, batch, self.loss_agg_mode, mask=distilled, global_tokens=tokens)
        return LossOutput(loss, metrics)
