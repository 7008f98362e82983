"""The plain data the loss core returns and objectives consume.

Kept free of any backend so that ``denser.objectives`` can import it without pulling in
Triton, and so that a user's objective sees exactly three per-token tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class TokenStats:
    """Per-token statistics of the student distribution (and its teacher), all ``[N]`` fp32.

    logp:       log p_s(y_i), the sampled token's log-probability under the student.
    entropy:    H(p_s,i), only when ``need_entropy=True``.
    divergence: D_alpha(p_t,i, p_s,i), only when a teacher is given.

    All three are differentiable with respect to the student's hidden states, weight and bias.
    """

    logp: Tensor
    entropy: Tensor | None = None
    divergence: Tensor | None = None

    def __getitem__(self, index) -> "TokenStats":
        """Select tokens (a slice, a bool mask or an index tensor) from every field."""
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return TokenStats(pick(self.logp), pick(self.entropy), pick(self.divergence))


@dataclass
class Metric:
    """A metric as a sum and a count, so that chunks, micro-batches and processes combine
    exactly (sum of sums over sum of counts) instead of averaging averages."""

    sum: Tensor
    count: Tensor

    @staticmethod
    def of(values: Tensor, mask: Tensor | None = None) -> "Metric":
        """Mean of ``values`` (over ``mask`` when given) as a detached (sum, count) pair."""
        values = values.detach().float()
        if mask is None:
            return Metric(values.sum(), torch.tensor(float(values.numel()), device=values.device))
        mask = mask.to(values.dtype)
        return Metric((values * mask).sum(), mask.sum())

    def __add__(self, other: "Metric") -> "Metric":
        return Metric(self.sum + other.sum, self.count + other.count)

    @property
    def value(self) -> float:
        count = float(self.count)
        return float(self.sum) / count if count > 0 else float("nan")


@dataclass
class LossOutput:
    """What an objective returns: a scalar loss and metrics as (sum, count) pairs."""

    loss: Tensor
    metrics: dict[str, Metric] = field(default_factory=dict)

    def metric_values(self) -> dict[str, float]:
        return {name: m.value for name, m in self.metrics.items()}


def merge_metrics(parts: list[dict[str, Metric]]) -> dict[str, Metric]:
    """Combine metric dicts from chunks or micro-batches by adding sums and counts."""
    merged: dict[str, Metric] = {}
    for part in parts:
        for name, m in part.items():
            merged[name] = merged[name] + m if name in merged else m
    return merged
