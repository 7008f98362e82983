"""The standard error of a mean over prompts: the one estimator the training loop's eval needs.

It lives here, below :mod:`denser.analysis` (which re-exports it from
:mod:`denser.analysis.estimators`), because the loop may not import the analysis layer.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["mean_stderr"]


def mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """``(mean, standard error of the mean)`` over prompts, the error ``std(values, ddof=1) / sqrt(P)``
    (as lm-evaluation-harness reports it); ``(None, None)`` for none, stderr None for one."""
    p = len(values)
    if p == 0:
        return None, None
    mean = sum(values) / p
    if p == 1:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (p - 1)
    return mean, math.sqrt(var / p)
