"""The fused loss core: per-token statistics over the vocabulary without ``[tokens, vocab]`` in memory."""

from denser.kernels.api import fused_loss, resolve_backend, token_stats, token_stats_from_logits
from denser.kernels.options import BACKENDS, IGNORE_INDEX, CoreOptions
from denser.kernels.stats import LossOutput, Metric, TokenStats, merge_metrics

__all__ = [
    "BACKENDS",
    "IGNORE_INDEX",
    "CoreOptions",
    "LossOutput",
    "Metric",
    "TokenStats",
    "fused_loss",
    "merge_metrics",
    "resolve_backend",
    "token_stats",
    "token_stats_from_logits",
]
