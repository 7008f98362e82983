"""Formatting artifacts of a set of responses.

Measured per response, reported as means (rates are fractions of responses):

- **repeated answer markers**: the response holds more than one final-answer marker, under the
  answer format of :mod:`denser.tasks.answers`: an ``Answer:`` marker (``Final answer:``,
  ``**Answer:**``, ``Answer -`` ...; it must start a word) or a ``\\boxed{...}`` with balanced
  braces. A ``\\boxed{}`` inside the line of an ``Answer:`` marker (``Answer: \\boxed{7}``) is part
  of that answer, not a second one. A response with two or more markers counts once.
- **repeated n-grams**: ``rep_n = 1 - |distinct n-grams| / |n-grams|`` over the whitespace-split
  words of a response (the seq-rep-n of Welleck et al. 2020, "Neural Text Generation with
  Unlikelihood Training", on words instead of tokens so that it reads the same across
  tokenizers); 0 for a response shorter than n words. n = 3 by default.
- **length-limit hits**: the response used the whole generation budget without a stop token.
- **mean length** in tokens and **mean per-token entropy** (nats) of the model's next-token
  distribution along its own response (from ``token_stats(need_entropy=True)``); these two come
  from the caller, which has the token ids and the model.
"""

from __future__ import annotations

import re
from typing import Sequence

from denser.tasks.answers import ANSWER_MARKER, BOXED_MARKER, braced_content

DEFAULT_NGRAM = 3


def answer_markers(text: str) -> int:
    """The number of final-answer markers in ``text`` (see the module docstring)."""
    if not text:
        return 0
    answer_lines: list[tuple[int, int]] = []  # spans of the answer text after each Answer: marker
    count = 0
    for m in ANSWER_MARKER.finditer(text):
        if m.start() > 0 and text[m.start() - 1].isalnum():
            continue  # "nanswer:" is not a marker (same rule as extract_answer)
        count += 1
        end = text.find("\n", m.end())
        line_end = len(text) if end < 0 else end
        if not text[m.end():line_end].strip() and end >= 0:  # answer on the next non-empty line
            nxt = re.search(r"\S[^\n]*", text[end:])
            line_end = end + nxt.end() if nxt else line_end
        answer_lines.append((m.end(), line_end))
    for m in BOXED_MARKER.finditer(text):
        if braced_content(text, m.end()) is None:
            continue  # an unclosed \boxed{ is no answer
        if any(a <= m.start() < b for a, b in answer_lines):
            continue
        count += 1
    return count


def has_repeated_answer(text: str) -> bool:
    return answer_markers(text) > 1


def repeated_ngram_rate(text: str, n: int = DEFAULT_NGRAM) -> float:
    """``1 - distinct/total`` over the word n-grams of ``text`` (0 when it has fewer than n words)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def artifact_rates(texts: Sequence[str], *, truncated: Sequence[bool] | None = None,
                   lengths: Sequence[int] | None = None, entropy: float | None = None,
                   ngram: int = DEFAULT_NGRAM) -> dict:
    """Mean artifact measures of ``texts``.

    Args:
        texts: the decoded responses.
        truncated: per response, True when it hit the length limit (optional).
        lengths: per response, its length in tokens (optional; else ``mean_length`` is None).
        entropy: the mean per-token entropy, if the caller measured it.
        ngram: n of the repeated n-gram rate.

    Returns ``{"n", "repeated_answer_rate", "mean_answer_markers", "no_answer_rate",
    "repeated_ngram_rate", "length_limit_rate", "mean_length", "mean_entropy"}``.
    """
    texts = list(texts)
    n = len(texts)
    if truncated is not None and len(truncated) != n:
        raise ValueError(f"{len(truncated)} truncation flags for {n} responses")
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} responses")
    markers = [answer_markers(t) for t in texts]

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    return {
        "n": n,
        "repeated_answer_rate": mean(float(m > 1) for m in markers),
        "mean_answer_markers": mean(markers),
        "no_answer_rate": mean(float(m == 0) for m in markers),
        "repeated_ngram_rate": mean(repeated_ngram_rate(t, ngram) for t in texts),
        "length_limit_rate": None if truncated is None else mean(float(bool(t)) for t in truncated),
        "mean_length": None if lengths is None else mean(float(x) for x in lengths),
        "mean_entropy": entropy,
    }
