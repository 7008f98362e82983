"""Objectives: a registry of on-policy losses written over per-token statistics."""

from denser.kernels.stats import LossOutput, Metric, TokenStats
from denser.objectives.base import (
    Objective,
    PolicyBatch,
    Signal,
    get_objective,
    list_objectives,
    objective_class,
    register_objective,
    unregister_objective,
)

__all__ = [
    "LossOutput",
    "Metric",
    "Objective",
    "PolicyBatch",
    "Signal",
    "TokenStats",
    "get_objective",
    "list_objectives",
    "objective_class",
    "register_objective",
    "unregister_objective",
]
