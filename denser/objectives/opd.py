"""OPD: on-policy distillation from a teacher model (a preset of ``sdpo``'s loss and the teacher axes).

The student samples completions of the task's prompts; a separate, frozen teacher model (``--teacher-path``:
a local Hugging Face model directory, a denser checkpoint or run directory, ``default`` or ``tiny``)
reads the same prompt, unchanged (``teacher_context='prompt'``: every sample has a teacher), and scores
the student's own tokens; the student is pulled towards it token by token:

    per token t of every sample (distill_mode='full', the default):
        l_t = D_beta(p_T,t, p_S,t)       generalised JSD over the whole vocabulary, beta = ``alpha``:
                                         alpha = 1: KL(p_S || p_T) (reverse KL, the default),
                                         alpha = 0: KL(p_T || p_S) (forward KL), between: the JSD
                                         with mixture beta p_T + (1 - beta) p_S (``stats.divergence``,
                                         computed by the fused loss core from the two models' hidden
                                         states and output layers: no [N, V] logits are materialised)
    loss = token-mean of l_t over the completion tokens of the update

``distill_mode='topk'`` (with ``add_tail``) restricts the divergence to the student's top-k ids plus a
tail bucket, as ``sdpo``; ``distill_mode='sampled_token'`` is the single-sample reverse-KL estimator
``sg[logp_S(y) - logp_T(y)] * logp_S(y)`` (alpha must be 1).

It is ``sdpo``'s loss machinery with other defaults (the class derives from :class:`SDPO`):

- ``alpha = 1.0`` (reverse KL): TRL's on-policy distillation trainer (``trl/experimental/distillation``,
  generalised JSD with beta, beta = 1 by default); TRL's GKD trainer (``trl/experimental/gkd``,
  Agarwal et al. 2024) takes the same generalised JSD with its ``beta`` (``alpha`` here);
- ``distill_mode = 'full'``: the whole vocabulary, as TRL's generalised JSD loss (verl's distillation
  losses, ``verl/trainer/distillation/losses.py``, use a top-k forward KL or single-sample k1-k3
  estimators instead: ``--distill-mode topk --alpha 0`` / ``--distill-mode sampled_token``);
- ``loss_agg_mode = 'token-mean'``: TRL's generalised JSD loss averages over the completion tokens,
  verl's ``agg_loss`` default is ``token-mean``;
- ``is_clip = 2.0``, SDPO's importance weight ``min(exp(logp - old_logp), 2)``: with one update per
  rollout batch ``old_logp = logp.detach()`` and the weight is exactly 1 (TRL and verl do not weight the
  distillation loss: the same loss); a run with several updates per rollout batch (``--mini-batches``,
  ``--epochs``) turns on ``use_old_logp`` (:meth:`SDPO.for_run`) and the weight corrects for the policy's
  drift within the batch. ``--is-clip none`` drops the weight in either case;
- the teacher: ``teacher = 'frozen'`` from ``teacher_path`` (required: ``opd`` without it is one error
  line before any model is loaded), ``teacher_context = 'prompt'``. The teacher may have another hidden
  size and depth than the student; it must share its vocabulary (checked before any compute).

Metrics (besides ``sdpo``'s ``distill_loss``, which at alpha = 1 with ``distill_mode='full'`` is the exact
per-token reverse KL, ``teacher_frac``, ``distilled_frac`` and ``teacher_gap``): ``teacher_logp`` and
``student_logp``, the mean log-prob of the sampled tokens under the teacher and the student, and
``reverse_kl``, the per-token single-sample estimate ``logp_S(y) - logp_T(y)`` of KL(p_S || p_T) (the
tokens are the student's own samples), whatever ``alpha``.

**The advantage form** of on-policy distillation (NeMo-RL's OPD advantage, slime's ``advantage -
opd_kl_coef * reverse_kl``: per-token advantage ``sg[logp_T(y) - logp_S(y)]`` through the PPO surrogate,
optionally added to the group advantage) is ``hybrid_adv`` with a teacher model::

    denser train --objective hybrid_adv --teacher frozen --teacher-path DIR --teacher-context prompt --lam 0

whose per-token advantage is ``lam * A_group + (1 - lam) * (logp_T(y) - logp_S(y))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from denser.kernels.stats import LossOutput, Metric, TokenStats
from denser.objectives.base import Signal, register_objective
from denser.objectives.batch import TEACHER_LOGP, PolicyBatch
from denser.objectives.common import AggMode, same_field
from denser.objectives.sdpo import SDPO
from denser.objectives.teacher import TeacherContext, TeacherMode, TeacherSpec

MISSING_TEACHER = ("opd distils from a teacher model: pass --teacher-path DIR (a model directory, a denser "
                   "checkpoint or run, or default/tiny)")


@register_objective("opd")
@dataclass
class OPD(SDPO):
    """On-policy distillation from a teacher model: full-vocabulary D_beta(p_teacher, p_student) per token, beta = 1 (reverse KL), the teacher frozen from --teacher-path reading the plain prompt."""

    alpha: float = same_field(SDPO, "alpha", 1.0)
    distill_mode: Literal["full", "topk", "sampled_token"] = same_field(SDPO, "distill_mode", "full")
    loss_agg_mode: AggMode = same_field(SDPO, "loss_agg_mode", "token-mean")
    teacher: TeacherMode = same_field(TeacherSpec, "teacher", "frozen")
    teacher_context: TeacherContext = same_field(TeacherSpec, "teacher_context", "prompt")

    def for_run(self, updates_per_rollout: int) -> OPD:
        """The teacher model is required (one line, before any model is loaded); several updates per
        rollout batch turn on ``use_old_logp`` for the importance weight (as ``sdpo``)."""
        if not self.teacher_path:
            raise ValueError(MISSING_TEACHER)
        return super().for_run(updates_per_rollout)

    def signals(self) -> frozenset[Signal]:
        return super().signals() | {Signal.TEACHER_LOGP}  # the teacher's log-prob of y: the metrics below

    def loss(self, stats: TokenStats, batch: PolicyBatch) -> LossOutput:
        out = super().loss(stats, batch)
        teacher_logp = batch.extras.get(TEACHER_LOGP)
        if teacher_logp is not None:
            logp = stats.logp.detach()
            if batch.teacher_mask is None:
                distilled = batch.token_mask
            else:
                distilled = batch.token_mask & batch.teacher_mask.to(device=logp.device, dtype=torch.bool)[batch.seq_ids]
            zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
            t = torch.where(distilled, teacher_logp.to(logp.dtype), zero)  # nothing from tokens outside the loss
            s = torch.where(distilled, logp, zero)
            out.metrics["teacher_logp"] = Metric.of(t, distilled)
            out.metrics["student_logp"] = Metric.of(s, distilled)
            out.metrics["reverse_kl"] = Metric.of(s - t, distilled)
        return out
