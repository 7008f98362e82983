"""Estimators of ``denser eval``: pass@k, maj@k and the standard error of a mean over prompts.

All three are about one prompt answered by ``n`` sampled completions, ``c`` of them correct.

- :func:`pass_at_k` is the unbiased estimator of Chen et al. (2021, the Codex paper): the
  probability that at least one of ``k`` completions drawn without replacement from the ``n`` is
  correct, ``1 - C(n - c, k) / C(n, k)``; it is the average of "any correct" over all ``C(n, k)``
  subsets of size ``k``. ``pass@1 = c / n``.
- :func:`majority_at_k` is the same kind of average for a majority vote: over all size-``k``
  subsets, the correctness of the answer most of the subset's completions give. Completions vote
  with their parsed final answer; one without an answer does not vote; a subset without any vote
  scores 0; a tie between answers is split evenly (each tied answer wins with equal probability).
  An answer's correctness is the fraction of the completions giving it that the task scored as
  successes (1 or 0 when the task judges the answer alone). For ``k = n`` it is the plain
  majority vote over all ``n`` completions.
- :func:`mean_stderr` is the mean of per-prompt values and its standard error over prompts,
  ``std(values, ddof=1) / sqrt(P)`` (as lm-evaluation-harness reports it), ``None`` for one prompt.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Sequence

from denser.trainers.estimators import mean_stderr  # the loop's eval uses it too: defined below analysis

__all__ = ["majority_at_k", "mean_stderr", "pass_at_k", "vote_groups"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: ``1 - C(n - c, k) / C(n, k)``."""
    _check(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: c (correct samples) must be in [0, n={n}], got {c}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def vote_groups(answers: Sequence[Hashable | None], success: Sequence[bool]) -> tuple[list[int], list[float], int]:
    """``(votes per answer, accuracy per answer, n)`` from the ``n`` completions' answers (``None``:
    no answer, no vote) and success flags, in order of first appearance."""
    if len(answers) != len(success):
        raise ValueError(f"vote_groups: {len(answers)} answers but {len(success)} success flags")
    counts: Counter = Counter()
    wins: Counter = Counter()
    for a, s in zip(answers, success):
        if a is not None:
            counts[a] += 1
            wins[a] += bool(s)
    keys = list(counts)
    return [counts[a] for a in keys], [wins[a] / counts[a] for a in keys], len(answers)


def majority_at_k(votes: Sequence[int], accuracy: Sequence[float], n: int, k: int) -> float:
    """maj@k (see the module docstring) from :func:`vote_groups`' output: ``votes[g]`` completions
    give answer ``g``, whose correctness is ``accuracy[g]``; the other ``n - sum(votes)`` gave none.

    Exact: for each answer ``g`` and each number ``j`` of its votes in the subset, the subsets in
    which every other answer has at most ``j`` votes are counted by a product of binomials over the
    other answers (tracking how many have exactly ``j``: the tie), then weighted by 1 / (ties + 1)."""
    _check(n, k)
    if len(votes) != len(accuracy) or any(v < 1 for v in votes) or sum(votes) > n:
        raise ValueError(f"maj@k: votes must be positive counts summing to at most n={n}, one accuracy each; "
                         f"got votes={list(votes)}, accuracy={list(accuracy)}")
    unvoted = n - sum(votes)
    total = math.comb(n, k)
    win_prob: dict[tuple[int, tuple[int, ...]], float] = {}  # the same count against the same others: same odds
    score = 0.0
    for g, (c, acc) in enumerate(zip(votes, accuracy)):
        if acc == 0:
            continue
        others = tuple(sorted(v for i, v in enumerate(votes) if i != g))
        key = (c, others)
        if key not in win_prob:
            win_prob[key] = _wins(c, others, unvoted, k) / total
        score += acc * win_prob[key]
    return score


def _wins(c: int, others: Sequence[int], unvoted: int, k: int) -> float:
    """Subsets of size ``k`` in which an answer with ``c`` completions wins the vote, a tie among
    ``t + 1`` answers counted as ``1 / (t + 1)``."""
    out = 0.0
    for j in range(1, min(c, k) + 1):
        # ways[d][t]: ways to take d completions from the other answers, each taking <= j, t taking exactly j
        ways = [[0] * (len(others) + 1) for _ in range(k - j + 1)]
        ways[0][0] = 1
        for o in others:
            new = [[0] * (len(others) + 1) for _ in range(k - j + 1)]
            for d, row in enumerate(ways):
                for t, w in enumerate(row):
                    if w:
                        for x in range(0, min(o, j, k - j - d) + 1):
                            new[d + x][t + (x == j)] += w * math.comb(o, x)
            ways = new
        fill = sum(ways[d][t] * math.comb(unvoted, k - j - d) / (t + 1)
                   for d in range(k - j + 1) for t in range(len(others) + 1) if ways[d][t])
        out += math.comb(c, j) * fill
    return out


def _check(n: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"n (samples per prompt) must be >= 1, got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}] (k of the n samples per prompt), got {k}")
