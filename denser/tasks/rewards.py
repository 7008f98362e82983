"""Reward functions: a registry, the built-in rewards, and weighted sums of them.

A reward function takes the decoded completion and its dataset row and returns a score, a
``(score, feedback)`` pair, or a :class:`~denser.tasks.base.Score`::

    from denser.tasks import register_reward

    @register_reward("brevity")
    def brevity(completion: str, row: dict) -> tuple[float, str | None]:
        n = len(completion.split())
        return (1.0, None) if n <= 50 else (0.0, f"Your reply has {n} words; keep it under 50.")

A task scored by several rewards (``file:data.jsonl?rewards=math+format:0.2``) scores each
completion with :class:`WeightedRewards`: ``score = sum(weight * value)``, every reward's own value
in ``Score.rewards`` (logged as ``reward/<name>``) and the feedback strings of all rewards joined
into ``Score.feedback`` (what SDPO's teacher reads on a failed attempt).

Built-in rewards (every one reads ``row["answer"]``; the final answer of a reply is extracted by
the rule of :mod:`denser.tasks.answers`: the last ``Answer:`` line or ``\\boxed{}``):

* ``exact``: the final answer (the whole stripped reply when it has no marker) equals the
  answer after whitespace collapsing, case-insensitive unless the task's ``case_sensitive``;
* ``numeric``: the final answer is a single number equal to the answer (relative tolerance
  1e-6); every answer must be a number (checked when the task loads);
* ``contains``: the answer occurs in the reply (case-insensitive unless ``case_sensitive``);
* ``format``: the reply has a final-answer marker (1.0) or not (0.0, with feedback);
* ``math``: the final answer is mathematically equal to the answer (LaTeX or plain; ``0.5`` =
  ``\\frac{1}{2}``, ``(x+1)^2`` = ``x^2+2x+1``), checked by HF's ``math-verify`` (the optional extra
  ``pip install 'denser[math]'``); answers that are plain words compare as text.

Spec strings (what a task option holds): ``NAME[:WEIGHT]`` items separated by ``+`` or ``,``
(``math+format:0.2`` = ``math:1.0,format:0.2``). Prefer ``+``: ``denser continual --tasks``
separates tasks with commas. Weights may be negative (a penalty) or zero (logged only).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

from denser.tasks.answers import ANSWER_INSTRUCTION, extract_answer, normalize_text, numbers_equal, parse_number
from denser.tasks.base import Score

RewardValue = Union[float, tuple, Score]  # a score, (score, feedback) or a Score
RewardFn = Callable[..., RewardValue]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Reward:
    """A registered reward function and what it needs.

    Attributes:
        name: the registry name (letters, digits, ``_ . -``; no ``:``, ``+`` or ``,``).
        fn: ``fn(completion, row) -> score | (score, feedback) | Score``. Keyword-only parameters
            named like a task option (``case_sensitive``) receive that option's value.
        description: one line, for listings.
        requires: a module the reward imports (``math_verify``); naming the reward without it
            installed is an error when the task is built, before any compute.
        install: how to install ``requires`` (the fix printed in that error).
        check_answer: ``check_answer(answer) -> None | problem``: validates every row's reference
            answer when the task loads (``numeric``: the answer must be a number).
    """

    name: str
    fn: RewardFn
    description: str = ""
    requires: str | None = None
    install: str | None = None
    check_answer: Callable[[str], str | None] | None = None

    def missing_requirement(self) -> str | None:
        """``None`` when the reward can run, else one line naming the missing package and the fix."""
        if not self.requires:
            return None
        try:
            importlib.import_module(self.requires)
        except ImportError:
            fix = self.install or f"pip install {self.requires}"
            return f"reward {self.name!r} needs the {self.requires!r} package, which is not installed: {fix}"
        return None


_REWARDS: dict[str, Reward] = {}


def register_reward(
    name: str,
    *,
    description: str | None = None,
    requires: str | None = None,
    install: str | None = None,
    check_answer: Callable[[str], str | None] | None = None,
):
    """Decorator: register ``fn(completion, row) -> score | (score, feedback) | Score`` as ``name``.

    The function is returned unchanged. See :class:`Reward` for the keyword arguments.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"reward name {name!r}: use letters, digits, '_', '.' or '-' (it appears in NAME:WEIGHT specs)")

    def deco(fn: RewardFn) -> RewardFn:
        if name in _REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        if not callable(fn):
            raise TypeError(f"reward {name!r}: expected a function (completion, row) -> score, got {fn!r}")
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        _REWARDS[name] = Reward(name, fn, description or (doc[0] if doc else ""), requires, install, check_answer)
        return fn

    return deco


def unregister_reward(name: str) -> None:
    """Remove a registered reward (for tests and interactive sessions)."""
    _REWARDS.pop(name, None)


def list_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_REWARDS)


def reward_descriptions() -> dict[str, str]:
    """``{name: one-line description}`` of the registered rewards."""
    return {n: _REWARDS[n].description for n in list_rewards()}


def get_reward(name: str) -> Reward:
    """The registered :class:`Reward` ``name``; an unknown name is one line listing the known ones."""
    if name not in _REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(list_rewards())} "
                         "(or register one with @register_reward)")
    return _REWARDS[name]


def parse_reward_spec(spec: str | Mapping[str, float] | Sequence[Any]) -> list[tuple[str, float]]:
    """``[(name, weight), ...]`` from ``"math+format:0.2"`` (also ``,``-separated), a
    ``{name: weight}`` mapping, or a list of names / ``(name, weight)`` pairs. Names are not
    looked up here (see :class:`WeightedRewards`)."""
    if isinstance(spec, Mapping):
        items: list[Any] = list(spec.items())
    elif isinstance(spec, str):
        items = [p for p in re.split(r"[+,\s]+", spec.strip()) if p]
    elif isinstance(spec, Sequence):
        items = list(spec)
    else:
        raise ValueError(f"rewards: expected 'NAME[:WEIGHT]+...', a mapping or a list, got {spec!r}")
    out: list[tuple[str, float]] = []
    for item in items:
        if isinstance(item, str):
            name, sep, weight = item.partition(":")
            weight = weight if sep else "1"
        elif isinstance(item, Sequence) and len(item) == 2:
            name, weight = item
        else:
            raise ValueError(f"rewards: bad item {item!r}; use NAME or NAME:WEIGHT, e.g. 'math+format:0.2'")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            w = math.nan
        if isinstance(weight, bool) or not math.isfinite(w):
            raise ValueError(f"rewards: weight {weight!r} of reward {name!r} is not a finite number; "
                             "use NAME:WEIGHT, e.g. 'math+format:0.2'")
        if any(name == n for n, _ in out):
            raise ValueError(f"rewards: reward {name!r} is named twice in {spec!r}")
        out.append((str(name), w))
    if not out:
        raise ValueError(f"rewards: no reward named in {spec!r}; use NAME[:WEIGHT]+..., e.g. 'math+format:0.2'")
    return out


class WeightedRewards:
    """Several registered rewards with weights, scoring one completion into one :class:`Score`.

    Built (and so checked: unknown names, missing packages) before any compute::

        rewards = WeightedRewards("math+format:0.2")
        s = rewards.score("... Answer: \\\\frac{1}{2}", {"answer": "0.5"})
        s.score == 1.0 * 1.0 + 0.2 * 1.0 ; s.rewards == {"math": 1.0, "format": 1.0}

    Args:
        spec: see :func:`parse_reward_spec`.
        options: task options handed to reward functions that declare a keyword-only parameter
            of the same name (the built-in ``exact`` and ``contains`` take ``case_sensitive``).
        where: names the task in error messages.
    """

    def __init__(self, spec: str | Mapping[str, float] | Sequence[Any], *, options: Mapping[str, Any] | None = None,
                 where: str = ""):
        prefix = f"{where}: " if where else ""
        try:
            items = parse_reward_spec(spec)
        except ValueError as exc:
            raise ValueError(prefix + str(exc)) from None
        unknown = [n for n, _ in items if n not in _REWARDS]
        if unknown:
            raise ValueError(f"{prefix}unknown reward {unknown[0]!r}; known rewards: {', '.join(list_rewards())} "
                             "(or register one with @register_reward)")
        self.rewards = [_REWARDS[n] for n, _ in items]
        for r in self.rewards:
            problem = r.missing_requirement()
            if problem:
                raise ValueError(prefix + problem)
        self.weights = [w for _, w in items]
        self.names = [n for n, _ in items]
        self._fns = [_bind(r.fn, options or {}) for r in self.rewards]

    @property
    def max_score(self) -> float:
        """The score when every reward returns 1.0 and every penalty 0: the sum of positive weights."""
        return sum(w for w in self.weights if w > 0)

    def check_answer(self, answer: str) -> str | None:
        """The first problem a reward finds with a reference answer, or ``None``."""
        for r in self.rewards:
            if r.check_answer is not None:
                problem = r.check_answer(answer)
                if problem:
                    return f"reward {r.name!r}: {problem}"
        return None

    def score(self, completion: str, row: dict[str, Any]) -> Score:
        values: dict[str, float] = {}
        feedback: list[str] = []
        answer = None
        for r, fn in zip(self.rewards, self._fns):
            value, fb, ans = _unpack(r.name, fn(completion, row))
            values[r.name] = value
            if fb:
                feedback.append(fb)
            if answer is None:
                answer = ans
        total = sum(w * values[n] for n, w in zip(self.names, self.weights))
        if answer is None:
            answer = extract_answer(completion)
        return Score(float(total), "\n".join(feedback) or None, answer, values)

    def __repr__(self) -> str:
        return "WeightedRewards(" + "+".join(f"{n}:{w:g}" for n, w in zip(self.names, self.weights)) + ")"


def per_reward_sums(scores: Iterable[Score]) -> dict[str, tuple[float, int]]:
    """``{name: (sum, count)}`` of the per-reward values in ``scores`` (for the loop's
    ``reward/<name>`` means: reduce sums and counts over processes, then divide)."""
    out: dict[str, tuple[float, int]] = {}
    for s in scores:
        for name, value in (s.rewards or {}).items():
            total, n = out.get(name, (0.0, 0))
            out[name] = (total + float(value), n + 1)
    return out


def _bind(fn: RewardFn, options: Mapping[str, Any]) -> RewardFn:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return fn
    kw = {k: v for k, v in options.items() if k in params and params[k].kind is inspect.Parameter.KEYWORD_ONLY}
    return functools.partial(fn, **kw) if kw else fn


def _unpack(name: str, out: Any) -> tuple[float, str | None, str | None]:
    if isinstance(out, Score):
        value, feedback, answer = out.score, out.feedback, out.answer
    elif isinstance(out, tuple) and len(out) == 2:
        (value, feedback), answer = out, None
    else:
        value, feedback, answer = out, None, None
    if isinstance(value, bool):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"reward {name!r} returned {out!r}; a reward returns a finite number, "
                         "a (number, feedback) pair or a Score")
    if feedback is not None and not isinstance(feedback, str):
        raise ValueError(f"reward {name!r} returned feedback {feedback!r}; feedback is a string or None")
    return float(value), feedback, answer


# ------------------------------------------------------------------------------- built-in rewards


def _no_answer(what: str = "answer") -> str:
    return f"No final answer found. {ANSWER_INSTRUCTION.replace('<answer>', f'<{what}>')}"


@register_reward("exact", description="the final answer (or the whole reply) equals the answer, whitespace-collapsed")
def exact(completion: str, row: dict[str, Any], *, case_sensitive: bool = False) -> Score:
    want = str(row["answer"])
    got = extract_answer(completion)
    if got is None:
        got = completion.strip()
    if normalize_text(got, case_sensitive=case_sensitive) == normalize_text(want, case_sensitive=case_sensitive):
        return Score(1.0, None, got)
    return Score(0.0, f"Your answer '{got[:40]}' is wrong.", got)


def _check_numeric(answer: str) -> str | None:
    return None if parse_number(answer) is not None else f"answer {answer!r} is not a single number"


@register_reward("numeric", description="the final answer is a single number equal to the answer",
                 check_answer=_check_numeric)
def numeric(completion: str, row: dict[str, Any]) -> Score:
    got = extract_answer(completion)
    if got is None:
        return Score(0.0, _no_answer("number"), None)
    value = parse_number(got)
    if value is None:
        return Score(0.0, f"Your answer '{got[:40]}' is not a single number.", got)
    target = parse_number(str(row["answer"]))
    if target is None:
        raise ValueError(f"reward 'numeric': the reference answer {row['answer']!r} is not a single number")
    if numbers_equal(value, target):
        return Score(1.0, None, got)
    return Score(0.0, f"Your answer {got[:40]} is wrong: it is too {'high' if value > target else 'low'}.", got)


@register_reward("contains", description="the answer occurs in the reply")
def contains(completion: str, row: dict[str, Any], *, case_sensitive: bool = False) -> Score:
    want = str(row["answer"])
    hay, needle = (completion, want) if case_sensitive else (completion.casefold(), want.casefold())
    if needle in hay:
        return Score(1.0, None, want)
    return Score(0.0, "The reply does not contain the expected answer.", None)


@register_reward("format", description="the reply ends with a final answer marker ('Answer: ...' or \\boxed{})")
def answer_format(completion: str, row: dict[str, Any]) -> Score:
    got = extract_answer(completion)
    if got is None or not got:
        return Score(0.0, _no_answer(), got)
    return Score(1.0, None, got)


@register_reward("math", description="the final answer is mathematically equal to the answer (math-verify)",
                 requires="math_verify", install="pip install 'denser[math]' (or pip install math-verify)")
def math_equal(completion: str, row: dict[str, Any]) -> Score:
    got = extract_answer(completion)
    if got is None or not got:
        return Score(0.0, _no_answer(), got)
    want = str(row["answer"]).strip()
    if _WORDS.fullmatch(want):  # a text answer: math-verify would read "Paris" as the product p*a*r*i*s
        ok = normalize_text(got) == normalize_text(want)
    else:
        gold, pred = _math_parse(want), _math_parse(got)
        if not pred:
            return Score(0.0, f"Your answer '{got[:40]}' is not a mathematical expression that can be read.", got)
        # a reference math-verify cannot read compares as text rather than never matching
        ok = _math_verify(gold, pred) if gold else normalize_text(got) == normalize_text(want)
    return Score(1.0, None, got) if ok else Score(0.0, f"Your answer '{got[:40]}' is wrong.", got)


_WORDS = re.compile(r"[A-Za-z][A-Za-z' ]*[A-Za-z]")


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread
    return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=8192)
def _math_parse(text: str) -> tuple:
    from math_verify import parse  # optional extra: imported when the reward first runs

    text = text.strip().strip("$").strip()
    latex = text if "\\boxed" in text else f"\\boxed{{{text}}}"
    return tuple(parse(latex, parsing_timeout=_timeout()))


def _math_verify(gold: tuple, pred: tuple) -> bool:
    from math_verify import verify  # optional extra, as in _math_parse

    return bool(verify(list(gold), list(pred), timeout_seconds=_timeout()))
