"""The rollout-vs-trainer correction: importance weights for an engine whose log-probs are not the trainer's.

An inference engine (``--engine vllm``) samples with its own kernels, often in another dtype, so
the probability it sampled a token with, ``pi_rollout``, is close to but not the trainer's
``pi_train`` at the same weights. The policy gradient is then off-policy by that mismatch; the
frameworks correct it with a per-token weight (TRL's ``vllm_importance_sampling_mode``, verl's
rollout correction, OpenRLHF's TIS/ICEPOP)::

    token level:     w_t = pi_train(y_t) / pi_rollout(y_t)
    sequence level:  w_t = prod_t' pi_train(y_t') / pi_rollout(y_t')   (every token of the sample)
    truncate:        w <- min(w, cap)          (TIS)
    mask:            w <- 0 where w > cap      (the token, or the sample, leaves the gradient)

``pi_train`` is a no-grad forward of the policy before the step's first update (what
``--old-logp-source forward`` computes), ``pi_rollout`` the engine's behaviour log-probs. The loop
multiplies each sample's advantages by its tokens' weights (:func:`weight_advantages`), so the
policy-gradient term of every objective that uses advantages is corrected without code of its own;
a term without advantages (a distillation loss) is unchanged.

``--rollout-correction auto`` (the default) is ``token-truncate`` for an engine that computes its
own log-probs (``RolloutEngine.copies_weights``: vllm) and an objective that uses advantages, and
``off`` otherwise (``hf``'s log-probs are the trainer's own forward; ``sdpo``'s distillation loss has
no advantages to weight: a mode set explicitly then costs the forward and logs the metrics alone). Metrics (means over the step's tokens, or samples at sequence level):
``rollout_corr/kl`` (k1 estimate of KL(pi_rollout || pi_train): mean of log pi_rollout - log pi_train),
``rollout_corr/k3_kl`` (k3 estimate, >= 0), ``sampling/sampling_logp_difference/mean`` (mean
|log pi_train - log pi_rollout|, TRL's name), ``sampling/importance_sampling_ratio/mean`` (the weight
after the cap, TRL's name), and ``rollout_corr/clipped_frac`` (truncate) or ``rollout_corr/masked_frac``
(mask): the fraction of weights above the cap.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from denser.kernels.stats import Metric

__all__ = ["MODES", "correction_weights", "weight_advantages"]

#: the values of --rollout-correction once resolved ("auto" picks one of the first two)
MODES = ("off", "token-truncate", "token-mask", "sequence-truncate", "sequence-mask")


def correction_weights(train_logp: Sequence[Tensor], rollout_logp: Sequence[Tensor], mode: str,
                       cap: float) -> tuple[list[Tensor], dict[str, Metric]]:
    """Per sample, the weight of each token (``[L_s]`` fp32) and the correction's metrics as
    (sum, count) pairs (they sum over processes exactly). ``mode``: one of :data:`MODES` but ``off``."""
    level, action = mode.split("-")
    weights: list[Tensor] = []
    kl = k3 = diff = ratio_sum = over = 0.0
    tokens = seqs = 0
    for lt, lr in zip(train_logp, rollout_logp):
        delta = lt.double() - lr.double()  # log pi_train - log pi_rollout, per token
        kl += float((-delta).sum())
        k3 += float((delta.exp() - 1 - delta).sum())
        diff += float(delta.abs().sum())
        tokens += delta.numel()
        if level == "sequence":
            ratio = delta.sum().exp().expand(delta.shape)
            seqs += 1
            above = float(ratio[0] > cap) if delta.numel() else 0.0
        else:
            ratio = delta.exp()
            above = float((ratio > cap).sum())
        w = ratio.clamp(max=cap) if action == "truncate" else torch.where(ratio > cap, torch.zeros_like(ratio), ratio)
        over += above
        if level == "token":
            ratio_sum += float(w.sum())
        elif delta.numel():
            ratio_sum += float(w[0])
        weights.append(w.float())
    per = seqs if level == "sequence" else tokens
    metrics = {
        "rollout_corr/kl": _m(kl, tokens), "rollout_corr/k3_kl": _m(k3, tokens),
        "sampling/sampling_logp_difference/mean": _m(diff, tokens),
        "sampling/importance_sampling_ratio/mean": _m(ratio_sum, per),
        f"rollout_corr/{'clipped' if action == 'truncate' else 'masked'}_frac": _m(over, per),
    }
    return weights, metrics


def weight_advantages(advantages: Tensor | list[Tensor], weights: Sequence[Tensor]) -> list[Tensor]:
    """Per-token advantages ``A_t * w_t``: sequence advantages ``[S]`` broadcast over each sample's
    tokens, or per-token ones ``[L_s]`` multiplied token by token."""
    if isinstance(advantages, Tensor):
        return [advantages[s] * w.to(advantages.dtype) for s, w in enumerate(weights)]
    return [a * w.to(a.dtype) for a, w in zip(advantages, weights)]


def _m(total: float, count: int) -> Metric:
    return Metric(torch.tensor(total, dtype=torch.float32), torch.tensor(float(count)))
