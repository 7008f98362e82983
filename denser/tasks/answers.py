"""Final-answer extraction and comparison, shared by every built-in task and by file tasks.

Extraction rule (documented once, used everywhere):

1. The reply's final answer is marked either by ``\\boxed{...}`` (LaTeX style, nested braces
   allowed) or by an ``Answer:`` marker (case-insensitive; ``Final answer:``, ``**Answer:**`` and
   ``Answer -`` variants too). The answer after ``Answer:`` runs to the end of its line; if that
   line is empty, the next non-empty line is taken.
2. If the reply has several markers, the **last** one wins (a model that revises itself is judged
   on its final word; nothing is guessed from unmarked text).
3. The extracted text is cleaned: surrounding whitespace, markdown emphasis (``**``, ``__``,
   backticks), quotes, ``$`` and a trailing ``.``, ``!`` or ``,`` are removed.
4. No marker -> no answer (``None``): the reply scores 0 with feedback saying how to answer.

Numbers compare by value (``7``, ``7.0``, ``+7``, ``1,000`` and ``x = 7`` all read as one number);
an answer with zero or several numbers in it is not a number (ambiguous, scores 0).
"""

from __future__ import annotations

import re

ANSWER_INSTRUCTION = "End with 'Answer: <answer>'."

# The answer markers of rule 1, public for the format checks of ``denser.analysis.artifacts``:
# ``Answer:`` and its variants, and the opening of ``\boxed{`` (its content: ``braced_content``).
ANSWER_MARKER = re.compile(r"(?:final\s+)?answer\s*(?:\*\*|__)?\s*(?::|-|is\b:?)\s*(?:\*\*|__)?", re.IGNORECASE)
BOXED_MARKER = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The cleaned final answer of ``text`` under the rule in the module docstring, or ``None``."""
    if not text:
        return None
    candidates: list[tuple[int, str]] = []  # (position, raw answer)
    for m in BOXED_MARKER.finditer(text):
        content = braced_content(text, m.end())
        if content is not None:
            candidates.append((m.start(), content))
    for m in ANSWER_MARKER.finditer(text):
        # the marker must start a word ("Answer:" not "nanswer:")
        if m.start() > 0 and text[m.start() - 1].isalnum():
            continue
        rest = text[m.end():]
        line, _, after = rest.partition("\n")
        if not line.strip():
            nxt = next((ln for ln in after.split("\n") if ln.strip()), "")
            line = nxt
        candidates.append((m.start(), line))
    if not candidates:
        return None
    _, raw = max(candidates, key=lambda c: c[0])
    boxed_inside = BOXED_MARKER.search(raw)  # "Answer: \boxed{7}"
    if boxed_inside:
        inner = braced_content(raw, boxed_inside.end())
        if inner is not None:
            raw = inner
    return clean_answer(raw)


def clean_answer(raw: str) -> str:
    """Strip whitespace, markdown emphasis, quotes, ``$`` and trailing sentence punctuation."""
    s = raw.strip()
    for _ in range(3):
        before = s
        s = s.strip().strip("*_`").strip()
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'":
            s = s[1:-1].strip()
        s = s.strip("$").strip()
        s = s.rstrip(".!,;").strip()
        if s == before:
            break
    return s


def parse_number(answer: str | None) -> float | None:
    """The single number in ``answer`` (after the last ``=``, if any), or ``None``."""
    if answer is None:
        return None
    s = answer.split("=")[-1]
    found = _NUMBER.findall(s)
    if len(found) != 1:
        return None
    return float(found[0].replace(",", ""))


def numbers_equal(a: float, b: float, *, rel_tol: float = 1e-6) -> bool:
    return abs(a - b) <= rel_tol * max(1.0, abs(a), abs(b))


def normalize_text(s: str, *, case_sensitive: bool = False) -> str:
    """Whitespace collapsed, optionally case-folded: the string-equality normal form."""
    s = " ".join(s.split())
    return s if case_sensitive else s.casefold()


def braced_content(text: str, start: int) -> str | None:
    """Content from ``start`` (just after an opening brace) to its matching closing brace."""
    depth = 1
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None
