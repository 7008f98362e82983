"""The loss core: per-token statistics over the vocabulary without ``[tokens, vocab]`` in memory.

``token_stats`` computes the statistics (backends in ``BACKENDS``); ``fused_loss`` evaluates an
objective's loss over them with the gradients computed in forward (docs/design.md, Contract 1b).
The core imports nothing from ``denser.objectives``: ``LossObjective`` and ``TokenBatch`` say
what it needs of an objective and its batch.
"""

from denser.kernels.api import (
    fused_loss,
    resolve_backend,
    token_stats,
    token_stats_from_logits,
)
from denser.kernels.options import BACKENDS, IGNORE_INDEX, CoreOptions
from denser.kernels.protocols import LossObjective, TokenBatch
from denser.kernels.stats import LossOutput, Metric, TokenStats, merge_metrics

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "CoreOptions",
    "LossObjective",
    "LossOutput",
    "Metric",
    "TokenBatch",
    "TokenStats",
    "fused_loss",
    "merge_metrics",
    "resolve_backend",
    "token_stats",
    "token_stats_from_logits",
]
