"""CISPO (MiniMax-M1, Chen et al. 2025): the clipped importance weight as a stop-gradient coefficient.

verl ``compute_policy_loss_cispo`` (``verl/trainer/ppo/core_algos.py``), per token:

    r_t = exp(logp_t - old_logp_t)                 (log-ratio clamped to +-20)
    l_t = -sg[clip(r_t, 1 - clip_low, 1 + clip_high)] * A * logp_t
          + kl_coef * KL_t(pi || pi_ref) - entropy_coef * H_t
    loss = aggregate(l, loss_agg_mode)

Unlike the PPO-clip surrogate no token loses its gradient: a clipped weight only bounds it. With
one update per rollout batch and no ``old_logp`` the weight is 1 and the gradient is ``-A grad logp``.
Advantages are grpo's (verl's CISPO script runs ``adv_estimator=grpo``). TRL's ``loss_type="cispo"``
clamps the weight at ``epsilon_high`` from above only (an absolute bound, ScaleRL's 5.0): here
``clip_low=None, clip_high=epsilon_high - 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from denser.kernels.stats import LossOutput, Metric, TokenStats
from denser.objectives.base import register_objective
from denser.objectives.batch import PolicyBatch
from denser.objectives.common import (
    AGG_MODES,
    KL_ESTIMATORS,
    AggMode,
    KLEstimator,
    RewardScaling,
    aggregate,
    behaviour_log_ratio,
    kl_estimate,
    require,
    same_field,
)
from denser.objectives.grpo import GRPO, GroupPolicyGradient, regularised


@register_objective("cispo")
@dataclass
class CISPO(GroupPolicyGradient):
    """CISPO (MiniMax-M1, 2025): -sg(clip(r)) * A * logp on group advantages, no lower clip; verl compute_policy_loss_cispo."""

    clip_low: float | None = field(
        default=None,
        metadata={"help": "the importance weight is clipped below at 1 - clip_low; none: no lower bound (MiniMax-M1; "
                  "verl's CISPO script sets clip_ratio_low=10, which never binds)"},
    )
    clip_high: float = field(
        default=0.2,
        metadata={"help": "the importance weight is clipped above at 1 + clip_high (verl's CISPO script: 0.2; TRL's "
                  "epsilon_high e is clip_high = e - 1)"},
    )
    kl_coef: float = same_field(GRPO, "kl_coef", 0.0)
    kl_estimator: KLEstimator = same_field(GRPO, "kl_estimator", "k3")
    entropy_coef: float = same_field(GRPO, "entropy_coef", 0.0)
    log_entropy: bool = same_field(GRPO, "log_entropy", False)
    scale_rewards: RewardScaling = same_field(GRPO, "scale_rewards", "group")
    leave_one_out: bool = same_field(GRPO, "leave_one_out", False)
    loss_agg_mode: AggMode = same_field(GRPO, "loss_agg_mode", "token-mean")
    use_old_logp: bool = same_field(GRPO, "use_old_logp", False)

    def __post_init__(self) -> None:
        name = self.name
        require(self.clip_low is None or (math.isfinite(self.clip_low) and self.clip_low >= 0.0), name,
                f"clip_low={self.clip_low} must be >= 0 (or None: no lower bound)")
        require(math.isfinite(self.clip_high) and self.clip_high >= 0.0, name, f"clip_high={self.clip_high} must be >= 0")
        require(self.kl_coef >= 0.0, name, f"kl_coef={self.kl_coef} must be >= 0")
        require(self.kl_estimator in KL_ESTIMATORS, name, f"kl_estimator={self.kl_estimator!r} must be one of {KL_ESTIMATORS}")
        require(self.scale_rewards in ("group", "batch", "none"), name, f"scale_rewards={self.scale_rewards!r} must be 'group', 'batch' or 'none'")
        require(self.loss_agg_mode in AGG_MODES, name, f"loss_agg_mode={self.loss_agg_mode!r} must be one of {AGG_MODES}")

    def loss(self, stats: TokenStats, batch: PolicyBatch) -> LossOutput:
        """Metrics: ``clip_frac`` (the weight is clipped, either side: verl's ``pg_clipfrac``), ``ratio`` (mean
        r), ``approx_kl`` (k3 estimate of KL(pi_old || pi)), and ``kl_ref`` / ``entropy`` as grpo."""
        logp, mask = stats.logp, batch.token_mask
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        advantages = torch.where(mask, batch.token_advantages().to(logp.dtype), zero)  # no NaN from masked tokens
        log_ratio = behaviour_log_ratio(logp, batch)
        ratio = torch.exp(log_ratio.detach())
        low = -math.inf if self.clip_low is None else 1.0 - self.clip_low
        weight = ratio.clamp(min=low, max=1.0 + self.clip_high)
        per_token = -weight * advantages * torch.where(mask, logp, zero)
        metrics = {
            "clip_frac": Metric.of((weight != ratio).float(), mask),
            "ratio": Metric.of(ratio, mask),
            "approx_kl": Metric.of(kl_estimate(logp.detach() - log_ratio.detach(), logp.detach(), "k3"), mask),
        }
        per_token = regularised(self, per_token, metrics, stats, batch)
        return LossOutput(aggregate(per_token, batch, self.loss_agg_mode), metrics)
