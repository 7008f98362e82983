"""What continual post-training does to a model: forgetting, parameter drift, response drift,
formatting artifacts, and reports.

    from denser.analysis import continual_metrics, parameter_drift, EvalSuite, compare_checkpoints

- :mod:`~denser.analysis.forgetting`: the accuracy matrix R[stage, task] and average accuracy,
  forgetting, backward and forward transfer (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018);
- :mod:`~denser.analysis.params`: relative L2 / cosine drift from the initial weights, overall and
  per module kind, and the rotation of each weight matrix's top-r singular subspace;
- :mod:`~denser.analysis.responses`: responses on fixed prompts, KL(current || initial) per token
  along them (via :func:`denser.kernels.token_stats`), similarity to the initial responses;
- :mod:`~denser.analysis.artifacts`: repeated answer markers, repeated n-grams, length-limit hits;
- :mod:`~denser.analysis.suite`: a fixed evaluation suite measuring all of the above on a model;
- :mod:`~denser.analysis.checkpoints`: every measure between two checkpoints;
- :mod:`~denser.analysis.report` (one run), :mod:`~denser.analysis.compare` (seeds of several
  configurations, with error bars, the claims table and the density frontier): ``report.md`` and PNG plots.
"""

from denser.analysis.artifacts import answer_markers, artifact_rates, has_repeated_answer, repeated_ngram_rate
from denser.analysis.checkpoints import compare_checkpoints, resolve_model
from denser.analysis.forgetting import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    continual_metrics,
    forgetting,
    forgetting_all_earlier_stages,
    forward_transfer,
    learning_gain,
)
from denser.analysis.params import (
    ParameterDrift,
    module_kind,
    parameter_drift,
    subspace_angle_overlap,
    top_left_singular,
)
from denser.analysis.responses import (
    Generations,
    generate_responses,
    mean_similarity,
    response_similarity,
    token_drift,
    token_f1,
)
from denser.analysis.suite import EvalSuite

__all__ = [
    "EvalSuite",
    "Generations",
    "ParameterDrift",
    "answer_markers",
    "artifact_rates",
    "average_accuracy",
    "average_forgetting",
    "backward_transfer",
    "compare_checkpoints",
    "continual_metrics",
    "forgetting",
    "forgetting_all_earlier_stages",
    "forward_transfer",
    "generate_responses",
    "has_repeated_answer",
    "learning_gain",
    "mean_similarity",
    "module_kind",
    "parameter_drift",
    "repeated_ngram_rate",
    "resolve_model",
    "response_similarity",
    "subspace_angle_overlap",
    "token_drift",
    "token_f1",
    "top_left_singular",
]
