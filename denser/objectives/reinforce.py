"""REINFORCE-style advantage estimators over the PPO-clip surrogate: ``rloo``, ``reinforce_pp``,
``reinforce_pp_baseline``.

Each follows verl (``verl/trainer/ppo/core_algos.py``, ``verl/trainer/ppo/ray_trainer.py``
``apply_kl_penalty``; the run scripts in ``examples/rloo_trainer`` and
``examples/reinforce_plus_plus_trainer``), with the KL penalty in the reward that those scripts turn on
(``algorithm.use_kl_in_reward=True``, ``kl_penalty=kl`` (k1), ``kl_ctrl.kl_coef=0.001``):

    token reward   r_t = score * [t is the last token] - kl_reward_coef * KL_t,
                   KL_t = kl_estimate(old_logp_t, ref_logp_t)   (k1: old_logp_t - ref_logp_t)

with ``old_logp`` the behaviour log-probs (verl's ``old_log_probs``) and ``ref_logp`` the frozen
reference's, both of every sample of the rollout batch before its updates (``Signal.ROLLOUT_REF_LOGP``).
The policy loss is verl's default (``loss_mode=vanilla``): the PPO-clip surrogate of ``grpo`` with
its defaults (clip 0.2 / 0.2, dual clip 3.0, ``token-mean``), on per-sequence (``rloo``) or per-token
(``reinforce_pp``, ``reinforce_pp_baseline``) advantages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from denser.kernels.options import CoreOptions
from denser.kernels.stats import LossOutput, TokenStats
from denser.objectives.base import AdvantageInputs, Objective, Signal, register_objective
from denser.objectives.batch import PolicyBatch
from denser.objectives.common import (
    KL_ESTIMATORS,
    AggMode,
    KLEstimator,
    RewardScaling,
    kl_estimate,
    require,
    same_field,
    with_old_logp,
)
from denser.objectives.grpo import GRPO

VERL_KL_REWARD_COEF = 0.001  # verl: algorithm.kl_ctrl.kl_coef (fixed controller), as its rloo / reinforce++ scripts use it
WHITEN_EPS = 1e-8  # verl_F.masked_whiten / masked_mean


# ------------------------------------------------------------------------------------ estimators


def token_rewards(inputs: AdvantageInputs, kl_coef: float, estimator: KLEstimator) -> list[Tensor]:
    """Per sample ``[L_s]``: the score on its last token minus ``kl_coef * KL_t`` on every token
    (verl ``apply_kl_penalty``: ``token_level_scores - beta * kl_penalty(old_log_probs, ref_log_prob)``)."""
    out, masks = [], inputs.masks()
    for s, reward in enumerate(inputs.rewards.detach().float().tolist()):
        length = int(masks[s].numel())
        r = torch.zeros(length, dtype=torch.float32)
        if kl_coef > 0:
            if inputs.old_logp is None or inputs.ref_logp is None:
                raise ValueError(f"a KL penalty in the reward (kl_reward_coef={kl_coef}) needs the behaviour and the "
                                 "reference log-probs of every sample (declare Signal.ROLLOUT_REF_LOGP)")
            r = r - kl_coef * kl_estimate(inputs.old_logp[s].float(), inputs.ref_logp[s].float(), estimator)
        if length:
            r[-1] += reward
        out.append(r)
    return out


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over one sequence ``[L]`` (verl's REINFORCE++ returns)."""
    returns = torch.empty_like(rewards)
    running = torch.zeros((), dtype=rewards.dtype)
    for t in range(rewards.numel() - 1, -1, -1):
        running = rewards[t] + gamma * running
        returns[t] = running
    return returns


def whiten(values: list[Tensor], masks: list[Tensor], reduce) -> list[Tensor]:
    """verl's ``masked_whiten`` over the loss tokens of the whole batch (all processes, through ``reduce``):
    ``(v - mean) / sqrt(var + 1e-8)`` with ``mean = sum(v) / (n + 1e-8)`` and the unbiased variance
    ``sum((v - mean)^2) / (n + 1e-8) * n / (n - 1)``; tokens outside the mask get 0."""
    flat = torch.cat(values) if values else torch.zeros(0)
    m = torch.cat(masks).to(torch.bool) if masks else torch.zeros(0, dtype=torch.bool)
    v = torch.where(m, flat, torch.zeros((), dtype=flat.dtype))
    first = reduce(torch.stack([v.sum(), m.sum().to(v.dtype)]))
    n = float(first[1])
    mean = first[0] / (n + WHITEN_EPS)
    centred = torch.where(m, flat - mean, torch.zeros((), dtype=flat.dtype))
    var = reduce(centred.square().sum().reshape(1))[0] / (n + WHITEN_EPS)
    if n > 1:
        var = var * (n / (n - 1))
    out = torch.where(m, (flat - mean) * torch.rsqrt(var + WHITEN_EPS), torch.zeros((), dtype=flat.dtype))
    return list(out.split([t.numel() for t in values]))


def group_baseline(scores: Tensor, num_generations: int) -> Tensor:
    """``scores - mean(group)``, a group being ``num_generations`` consecutive samples; a group of one
    keeps its score (verl's ``id2mean = 0`` for a prompt with one response)."""
    if num_generations == 1:
        return scores.clone()
    groups = scores.reshape(-1, num_generations)
    return (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)


# --------------------------------------------------------------------------------------- objectives

_KL_REWARD_COEF_HELP = (
    "beta of the per-token KL penalty in the reward, r_t = score*[t last] - beta*KL_t(pi_old || pi_ref) (verl's "
    "use_kl_in_reward with kl_ctrl.kl_coef 0.001, as its rloo and reinforce++ scripts); > 0 makes the loop compute "
    "reference log-probs of the whole rollout batch (Signal.ROLLOUT_REF_LOGP); 0 disables it"
)
_KL_REWARD_ESTIMATOR_HELP = "estimator of KL_t in the reward: k1 = old_logp - ref_logp (verl's kl_penalty 'kl'), k2, k3"


def _kl_reward_signals(objective) -> set[Signal]:
    return {Signal.REF_LOGP, Signal.ROLLOUT_REF_LOGP} if objective.kl_reward_coef > 0 else set()


def _check_kl_reward(objective) -> None:
    name = objective.name
    require(objective.kl_reward_coef >= 0.0, name, f"kl_reward_coef={objective.kl_reward_coef} must be >= 0")
    require(objective.kl_reward_estimator in KL_ESTIMATORS, name,
            f"kl_reward_estimator={objective.kl_reward_estimator!r} must be one of {KL_ESTIMATORS}")


@register_objective("rloo")
@dataclass
class RLOO(GRPO):
    """RLOO (Ahmadian et al. 2024): leave-one-out baseline, no std scaling, KL(pi_old || pi_ref) in the reward; verl compute_rloo_outcome_advantage."""

    scale_rewards: RewardScaling = same_field(GRPO, "scale_rewards", "none")
    leave_one_out: bool = same_field(GRPO, "leave_one_out", True)
    kl_reward_coef: float = field(default=VERL_KL_REWARD_COEF, metadata={"help": _KL_REWARD_COEF_HELP})
    kl_reward_estimator: KLEstimator = field(default="k1", metadata={"help": _KL_REWARD_ESTIMATOR_HELP})

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_kl_reward(self)

    def signals(self) -> frozenset[Signal]:
        return super().signals() | _kl_reward_signals(self)

    def rollout_advantages(self, inputs: AdvantageInputs) -> Tensor:
        """verl ``compute_rloo_outcome_advantage`` (``verl/trainer/ppo/core_algos.py``): the sequence's summed
        token rewards (score - beta * sum_t KL_t) minus the mean of the other samples of its group,
        ``G / (G - 1) * (R_i - mean(R))``. A group of one gets 0 (verl keeps its raw score)."""
        rewards = inputs.rewards
        if self.kl_reward_coef > 0:
            rewards = torch.stack([r.sum() for r in token_rewards(inputs, self.kl_reward_coef, self.kl_reward_estimator)])
        return self.advantages(rewards, inputs.num_generations)


# the PPO-clip surrogate's fields, shared with grpo (same help texts and defaults: verl's vanilla policy loss)
_SURROGATE = ("clip_low", "clip_high", "clip_ratio_c", "kl_coef", "kl_estimator", "entropy_coef", "log_entropy",
              "loss_agg_mode", "use_old_logp")


@dataclass
class _ReinforcePPFamily(Objective):
    """Per-token advantages from KL-penalised token rewards, on grpo's PPO-clip surrogate (not registered)."""

    clip_low: float = same_field(GRPO, "clip_low", 0.2)
    clip_high: float = same_field(GRPO, "clip_high", 0.2)
    clip_ratio_c: float | None = same_field(GRPO, "clip_ratio_c", 3.0)
    kl_coef: float = same_field(GRPO, "kl_coef", 0.0)
    kl_estimator: KLEstimator = same_field(GRPO, "kl_estimator", "k3")
    entropy_coef: float = same_field(GRPO, "entropy_coef", 0.0)
    log_entropy: bool = same_field(GRPO, "log_entropy", False)
    loss_agg_mode: AggMode = same_field(GRPO, "loss_agg_mode", "token-mean")
    use_old_logp: bool = same_field(GRPO, "use_old_logp", False)
    kl_reward_coef: float = field(default=VERL_KL_REWARD_COEF, metadata={"help": _KL_REWARD_COEF_HELP})
    kl_reward_estimator: KLEstimator = field(default="k1", metadata={"help": _KL_REWARD_ESTIMATOR_HELP})

    def __post_init__(self) -> None:
        _check_kl_reward(self)
        try:  # grpo's checks of the surrogate's fields, naming this objective
            self._surrogate = GRPO(**{k: getattr(self, k) for k in _SURROGATE})
        except ValueError as e:
            raise ValueError(str(e).replace("objective 'grpo'", f"objective {self.name!r}")) from None

    def signals(self) -> frozenset[Signal]:
        return self._surrogate.signals() | _kl_reward_signals(self)

    def core_options(self) -> CoreOptions:
        return self._surrogate.core_options()

    def for_run(self, updates_per_rollout: int) -> Any:
        return with_old_logp(self, updates_per_rollout)

    def loss(self, stats: TokenStats, batch: PolicyBatch) -> LossOutput:
        """grpo's loss (the PPO-clip surrogate, KL loss, entropy bonus) on the batch's per-token advantages."""
        return self._surrogate.loss(stats, batch)


@register_objective("reinforce_pp")
@dataclass
class ReinforcePP(_ReinforcePPFamily):
    """REINFORCE++ (Hu 2025): per-token discounted returns of KL-penalised rewards, whitened over the batch; verl compute_reinforce_plus_plus_outcome_advantage."""

    gamma: float = field(default=1.0, metadata={"help": "discount of the token returns G_t = r_t + gamma G_{t+1} (verl's algorithm.gamma 1.0)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.gamma <= 1.0, self.name, f"gamma={self.gamma} must be in [0, 1]")

    def rollout_advantages(self, inputs: AdvantageInputs) -> list[Tensor]:
        """verl ``compute_reinforce_plus_plus_outcome_advantage`` (``verl/trainer/ppo/core_algos.py``): the
        returns of the token rewards, whitened (``masked_whiten``) over every loss token of the batch."""
        rewards = token_rewards(inputs, self.kl_reward_coef, self.kl_reward_estimator)
        returns = [discounted_returns(r, self.gamma) for r in rewards]
        return whiten(returns, inputs.masks(), inputs.reduce)


@register_objective("reinforce_pp_baseline")
@dataclass
class ReinforcePPBaseline(_ReinforcePPFamily):
    """REINFORCE++-baseline (Hu 2025): summed KL-penalised rewards minus the group mean, whitened over the batch's tokens; verl compute_reinforce_plus_plus_baseline_outcome_advantage."""

    def rollout_advantages(self, inputs: AdvantageInputs) -> list[Tensor]:
        """verl ``compute_reinforce_plus_plus_baseline_outcome_advantage`` (``verl/trainer/ppo/core_algos.py``):
        ``R_i = sum_t r_t`` minus its group's mean (a group of one keeps ``R_i``), on every token of the
        sequence, whitened over every loss token of the batch (so a long sequence weighs more)."""
        rewards = token_rewards(inputs, self.kl_reward_coef, self.kl_reward_estimator)
        centred = group_baseline(torch.stack([r.sum() for r in rewards]) if rewards else torch.zeros(0),
                                 inputs.num_generations)
        broadcast = [torch.full_like(r, float(c)) for r, c in zip(rewards, centred)]
        return whiten(broadcast, inputs.masks(), inputs.reduce)
