"""Objectives: a registry of on-policy losses written over per-token statistics.

Importing this package registers the built-in families: ``grpo`` (and the presets ``dr_grpo``,
``dapo``, ``gspo``), ``cispo``, the REINFORCE-style estimators ``rloo``, ``reinforce_pp`` and
``reinforce_pp_baseline``, ``sdpo``, ``opd`` (on-policy distillation from a teacher model), and the sparse-dense mixes ``hybrid`` and ``hybrid_adv``.
"""

from denser.kernels.stats import LossOutput, Metric, TokenStats
from denser.objectives.base import (
    DEFAULT_OBJECTIVE,
    TEACHER_SIGNALS,
    AdvantageInputs,
    Objective,
    Signal,
    field_help,
    get_objective,
    list_objectives,
    objective_class,
    objective_fields,
    register_objective,
    unregister_objective,
)
from denser.objectives.batch import TEACHER_LOGP, PolicyBatch
from denser.objectives.cispo import CISPO
from denser.objectives.common import aggregate, group_advantages, kl_estimate, normaliser_counts
from denser.objectives.grpo import DAPO, GRPO, GSPO, DrGRPO
from denser.objectives.hybrid import Hybrid, HybridAdv
from denser.objectives.opd import OPD
from denser.objectives.reinforce import RLOO, ReinforcePP, ReinforcePPBaseline
from denser.objectives.sdpo import SDPO
from denser.objectives.teacher import TeacherSpec, teacher_messages

__all__ = [
    "CISPO",
    "DAPO",
    "DEFAULT_OBJECTIVE",
    "GRPO",
    "GSPO",
    "OPD",
    "RLOO",
    "SDPO",
    "TEACHER_LOGP",
    "TEACHER_SIGNALS",
    "DrGRPO",
    "Hybrid",
    "HybridAdv",
    "LossOutput",
    "Metric",
    "AdvantageInputs",
    "Objective",
    "PolicyBatch",
    "ReinforcePP",
    "ReinforcePPBaseline",
    "Signal",
    "TeacherSpec",
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
    "teacher_messages",
    "unregister_objective",
]
