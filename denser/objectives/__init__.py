"""Objectives: a registry of on-policy losses written over per-token statistics.

Importing this package registers the built-in families: ``grpo`` (and the presets ``dr_grpo``,
``dapo``, ``gspo``), ``sdpo``, and the sparse-dense mixes ``hybrid`` and ``hybrid_adv``.
"""

from denser.kernels.stats import LossOutput, Metric, TokenStats
from denser.objectives.base import (
    Objective,
    PolicyBatch,
    Signal,
    field_help,
    get_objective,
    list_objectives,
    objective_class,
    objective_fields,
    register_objective,
    unregister_objective,
)
from denser.objectives.common import aggregate, group_advantages, kl_estimate, normaliser_counts
from denser.objectives.grpo import DAPO, GRPO, GSPO, DrGRPO
from denser.objectives.sdpo import SDPO, TEACHER_LOGP
from denser.objectives.hybrid import Hybrid, HybridAdv

__all__ = [
    "DAPO",
    "GRPO",
    "GSPO",
    "SDPO",
    "TEACHER_LOGP",
    "DrGRPO",
    "Hybrid",
    "HybridAdv",
    "LossOutput",
    "Metric",
    "Objective",
    "PolicyBatch",
    "Signal",
    "TokenStats",
    "aggregate",
    "field_help",
    "get_objective",
    "group_advantages",
    "kl_estimate",
    "list_objectives",
    "normaliser_counts",
    "objective_class",
    "objective_fields",
    "register_objective",
    "unregister_objective",
]
