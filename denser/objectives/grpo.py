"""GRPO and its registered presets: ``grpo``, ``dr_grpo``, ``dapo``, ``gspo``.

The loss is the PPO-clip surrogate on group-relative advantages,

    per token t of sample i:  l_t = max(-A_i r_t, -A_i clip(r_t, 1 - clip_low, 1 + clip_high))
                              (dual clip: l_t = min(l_t, -A_i * clip_ratio_c) where A_i < 0)
                              + kl_coef * KL_t(pi || pi_ref) - entropy_coef * H_t
    loss = aggregate(l, loss_agg_mode)

with ``r_t = exp(logp_t - old_logp_t)`` (``ratio_level="token"``) or the GSPO sequence ratio
``r_t = s_i = exp(mean_{t' in i}(logp_t' - old_logp_t'))`` (``ratio_level="sequence"``).

Behaviour log-probs: ``grpo`` declares ``Signal.OLD_LOGP`` when the run makes several optimiser
updates per rollout batch (``for_run``: ``--mini-batches`` x ``--epochs`` > 1 turns ``use_old_logp``
on; the loop then gives the pre-update policy's log-probs), or with ``use_old_logp=True``. Otherwise
the run is fully on-policy with one update per rollout batch and ``old_logp = logp.detach()`` (as
TRL does when ``num_iterations == 1``, verl when ``on_policy``): the ratio is 1, clipping never binds
and the gradient is ``-A grad logp``. A batch that carries ``old_logp`` anyway is always used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from denser.kernels.options import CoreOptions
from denser.kernels.stats import LossOutput, Metric, TokenStats
from denser.objectives.base import Objective, Signal, register_objective
from denser.objectives.batch import PolicyBatch
from denser.objectives.common import (
    AGG_MODES,
    KL_ESTIMATORS,
    AggMode,
    KLEstimator,
    RewardScaling,
    aggregate,
    behaviour_log_ratio,
    group_advantages,
    kl_estimate,
    require,
    same_field,
    sequence_mean,
    with_old_logp,
)

# tokens: DAPO's buffer is 4096 of its 20480-token budget (a fifth); 5 is a fifth of the built-in tasks'
# shortest budget (24 tokens) and a tenth of the longest (48)
DAPO_OVERLONG_BUFFER = 5


def clipped_surrogate(
    logp: Tensor,
    advantages: Tensor,
    batch: PolicyBatch,
    *,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None,
    ratio_level: str,
) -> tuple[Tensor, dict[str, Metric]]:
    """Per-token PPO-clip loss ``[n]`` (to be aggregated) and its metrics.

    ``advantages`` is per-token ``[n]``. Metrics: ``clip_frac_low`` (A < 0 and r < 1 - clip_low:
    the lower clip binds), ``clip_frac_high`` (A > 0 and r > 1 + clip_high), ``dual_clip_frac``
    (A < 0 and r > clip_ratio_c), ``ratio`` (mean r) and ``approx_kl`` (k3 estimate of
    KL(pi_old || pi) from the token log-ratios), all over the loss tokens.
    """
    mask = batch.token_mask
    token_log_ratio = behaviour_log_ratio(logp, batch)
    log_ratio = sequence_mean(token_log_ratio, batch) if ratio_level == "sequence" else token_log_ratio
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    metrics = {
        "clip_frac_low": Metric.of((negative & (ratio < 1.0 - clip_low)).float(), mask),
        "clip_frac_high": Metric.of(((advantages > 0) & (ratio > 1.0 + clip_high)).float(), mask),
        "ratio": Metric.of(ratio, mask),
        # k3 estimate of KL(pi_old || pi) from tokens sampled by pi_old
        "approx_kl": Metric.of(kl_estimate(logp.detach() - token_log_ratio.detach(), logp.detach(), "k3"), mask),
    }
    if clip_ratio_c is not None:
        per_token = torch.where(negative, torch.minimum(per_token, -advantages * clip_ratio_c), per_token)
        metrics["dual_clip_frac"] = Metric.of((negative & (ratio > clip_ratio_c)).float(), mask)
    return per_token, metrics


class GroupPolicyGradient(Objective):
    """What every group-advantage policy-gradient objective asks of the loop (``grpo`` and its presets,
    ``cispo``): group-normalised advantages, old log-probs when the ratios need them, a reference
    model when ``kl_coef > 0``, entropy when it is a term or logged. Its subclasses are dataclasses
    with the fields ``use_old_logp``, ``kl_coef``, ``entropy_coef``, ``log_entropy``,
    ``scale_rewards`` and ``leave_one_out``."""

    def for_run(self, updates_per_rollout: int):
        """With several updates per rollout batch the ratios need the pre-update policy: use_old_logp on."""
        return with_old_logp(self, updates_per_rollout)

    def signals(self) -> frozenset[Signal]:
        out = {Signal.REWARDS, Signal.ADVANTAGES}
        if self.use_old_logp:
            out.add(Signal.OLD_LOGP)
        if self.kl_coef > 0:
            out.add(Signal.REF_LOGP)
        if self.entropy_coef != 0 or self.log_entropy:
            out.add(Signal.ENTROPY)
        return frozenset(out)

    def core_options(self) -> CoreOptions:
        return CoreOptions(need_entropy=self.entropy_coef != 0 or self.log_entropy)

    def advantages(self, rewards: Tensor, num_generations: int) -> Tensor:
        return group_advantages(rewards, num_generations, scale=self.scale_rewards, leave_one_out=self.leave_one_out)


@register_objective("grpo")
@dataclass
class GRPO(GroupPolicyGradient):
    """GRPO: PPO-clip surrogate on group-relative advantages (clip-higher, dual clip, token or sequence ratio, reference KL, entropy bonus)."""

    clip_low: float = field(
        default=0.2, metadata={"help": "epsilon_low: the ratio is clipped below at 1 - clip_low (PPO clip)"}
    )
    clip_high: float = field(
        default=0.2, metadata={"help": "epsilon_high: the ratio is clipped above at 1 + clip_high (DAPO clip-higher: 0.28)"}
    )
    clip_ratio_c: float | None = field(
        default=3.0,
        metadata={
            "help": "dual-clip constant c > 1: for negative advantages the loss is capped at -A*c (Ye et al. 2020; "
            "verl's default 3.0, as in the SDPO code); none disables it. Never binds when fully on-policy"
        },
    )
    ratio_level: Literal["token", "sequence"] = field(
        default="token",
        metadata={
            "help": "importance ratio per token, or per sequence as the geometric mean of the token ratios "
            "(GSPO); 'sequence' makes the loss separable only on sequence boundaries"
        },
    )
    kl_coef: float = field(
        default=0.0,
        metadata={
            "help": "weight of the KL penalty to the frozen reference policy (GRPO paper: 0.04); > 0 makes the "
            "loop compute reference log-probs (Signal.REF_LOGP)"
        },
    )
    kl_estimator: KLEstimator = field(
        default="k3",
        metadata={"help": "per-token KL estimator (Schulman): k1 = log ratio, k2 = squared/2, k3 = low-variance (verl low_var_kl)"},
    )
    entropy_coef: float = field(
        default=0.0,
        metadata={"help": "weight of the entropy bonus (subtracted from the loss); != 0 makes the core compute entropy"},
    )
    log_entropy: bool = field(
        default=False, metadata={"help": "compute the policy entropy for the metrics even when entropy_coef is 0"}
    )
    scale_rewards: RewardScaling = field(
        default="group",
        metadata={
            "help": "advantage scaling: divide the group-centred rewards by the group's std ('group', GRPO), "
            "the batch's std ('batch') or not at all ('none', Dr. GRPO)"
        },
    )
    leave_one_out: bool = field(
        default=False,
        metadata={"help": "baseline = mean reward of the other samples of the group (RLOO) instead of the group mean"},
    )
    loss_agg_mode: AggMode = field(
        default="token-mean",
        metadata={
            "help": "loss aggregation with normalisers global to the update (its mini-batch, all processes): token-mean (verl's default, DAPO), "
            "seq-mean-token-mean (GRPO paper; SDPO's GRPO baseline, micro-batches of one sequence), seq-mean-token-sum, "
            "seq-mean-token-sum-norm (Dr. GRPO)"
        },
    )
    use_old_logp: bool = field(
        default=False,
        metadata={
            "help": "declare behaviour log-probs (Signal.OLD_LOGP) even with one update per rollout batch (then the "
            "engine's sampling log-probs, see --old-logp-source); the loop turns it on itself when a step makes "
            "several updates (--mini-batches, --epochs). Off with one update: old_logp = logp.detach(), ratio 1"
        },
    )

    def __post_init__(self) -> None:
        name = self.name or "grpo"
        require(0.0 <= self.clip_low < 1.0, name, f"clip_low={self.clip_low} must be in [0, 1)")
        require(self.clip_high >= 0.0, name, f"clip_high={self.clip_high} must be >= 0")
        require(
            self.clip_ratio_c is None or (math.isfinite(self.clip_ratio_c) and self.clip_ratio_c > 1.0),
            name,
            f"clip_ratio_c={self.clip_ratio_c} must be > 1 (or None to disable dual clip)",
        )
        require(self.ratio_level in ("token", "sequence"), name, f"ratio_level={self.ratio_level!r} must be 'token' or 'sequence'")
        require(self.kl_coef >= 0.0, name, f"kl_coef={self.kl_coef} must be >= 0")
        require(self.kl_estimator in KL_ESTIMATORS, name, f"kl_estimator={self.kl_estimator!r} must be one of {KL_ESTIMATORS}")
        require(self.scale_rewards in ("group", "batch", "none"), name, f"scale_rewards={self.scale_rewards!r} must be 'group', 'batch' or 'none'")
        require(self.loss_agg_mode in AGG_MODES, name, f"loss_agg_mode={self.loss_agg_mode!r} must be one of {AGG_MODES}")

    @property
    def separable(self) -> Literal["token", "sequence"]:  # type: ignore[override]
        return "sequence" if self.ratio_level == "sequence" else "token"

    def loss(self, stats: TokenStats, batch: PolicyBatch) -> LossOutput:
        logp = stats.logp
        mask = batch.token_mask
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        advantages = torch.where(mask, batch.token_advantages().to(logp.dtype), zero)  # no NaN from masked tokens
        per_token, metrics = clipped_surrogate(
            logp, advantages, batch, clip_low=self.clip_low, clip_high=self.clip_high,
            clip_ratio_c=self.clip_ratio_c, ratio_level=self.ratio_level,
        )
        per_token = regularised(self, per_token, metrics, stats, batch)
        return LossOutput(aggregate(per_token, batch, self.loss_agg_mode), metrics)


def regularised(objective, per_token: Tensor, metrics: dict[str, Metric], stats: TokenStats, batch: PolicyBatch) -> Tensor:
    """``per_token + kl_coef * KL_t(pi || pi_ref) - entropy_coef * H_t`` for an objective with the fields
    ``kl_coef``, ``kl_estimator`` and ``entropy_coef`` (the ``grpo`` family, ``cispo``), adding the
    ``kl_ref`` (when the batch has reference log-probs) and ``entropy`` (when computed) metrics."""
    logp, mask = stats.logp, batch.token_mask
    if batch.ref_logp is not None or objective.kl_coef > 0:
        if batch.ref_logp is None:
            raise ValueError(
                f"objective {objective.name!r} has kl_coef={objective.kl_coef} but the batch has no ref_logp "
                "(the loop must compute Signal.REF_LOGP)"
            )
        ref = torch.where(mask, batch.ref_logp.to(logp.dtype), logp.detach())
        kl = kl_estimate(logp, ref, objective.kl_estimator)
        metrics["kl_ref"] = Metric.of(kl, mask)
        if objective.kl_coef > 0:
            per_token = per_token + objective.kl_coef * kl
    if objective.entropy_coef != 0:
        if stats.entropy is None:
            raise ValueError(f"objective {objective.name!r} has entropy_coef={objective.entropy_coef} but stats.entropy is None")
        per_token = per_token - objective.entropy_coef * stats.entropy
    if stats.entropy is not None:
        metrics["entropy"] = Metric.of(stats.entropy, mask)
    return per_token


# ---------------------------------------------------------------------------------------- presets


@register_objective("dr_grpo")
@dataclass
class DrGRPO(GRPO):
    """Dr. GRPO (Liu et al. 2025): GRPO without the std scaling of advantages and without per-sequence length normalisation."""

    scale_rewards: RewardScaling = same_field(GRPO, "scale_rewards", "none")
    loss_agg_mode: AggMode = same_field(
        GRPO, "loss_agg_mode", "seq-mean-token-sum-norm"
    )


@register_objective("dapo")
@dataclass
class DAPO(GRPO):
    """DAPO (Yu et al. 2025): clip-higher (0.2 / 0.28), token-level loss, no KL; turns on the loop's dynamic sampling and overlong reward shaping."""

    clip_low: float = same_field(GRPO, "clip_low", 0.2)
    clip_high: float = same_field(GRPO, "clip_high", 0.28)
    loss_agg_mode: AggMode = same_field(
        GRPO, "loss_agg_mode", "token-mean"
    )
    kl_coef: float = same_field(GRPO, "kl_coef", 0.0)

    def run_defaults(self) -> dict[str, Any]:
        """DAPO's dynamic sampling (drop groups whose rewards are all equal, generate more) and its soft
        overlong punishment (penalty factor 1.0; DAPO's buffer is a fifth of its 20480-token budget, here
        DAPO_OVERLONG_BUFFER tokens: a fifth to a tenth of the built-in tasks' budgets of 24-48 tokens)."""
        return {"dynamic_sampling": True, "overlong_buffer": DAPO_OVERLONG_BUFFER, "overlong_penalty": 1.0}


@register_objective("gspo")
@dataclass
class GSPO(GRPO):
    """GSPO (Zheng et al. 2025): sequence-level ratio, clip 3e-4 / 4e-4, sequence-mean loss, no KL, behaviour log-probs from the loop."""

    clip_low: float = same_field(GRPO, "clip_low", 3e-4)
    clip_high: float = same_field(GRPO, "clip_high", 4e-4)
    clip_ratio_c: float | None = same_field(GRPO, "clip_ratio_c", None)
    ratio_level: Literal["token", "sequence"] = same_field(GRPO, "ratio_level", "sequence")
    loss_agg_mode: AggMode = same_field(
        GRPO, "loss_agg_mode", "seq-mean-token-mean"
    )
    kl_coef: float = same_field(GRPO, "kl_coef", 0.0)
    use_old_logp: bool = same_field(GRPO, "use_old_logp", True)
