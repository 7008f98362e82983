"""A task read from a local file: ``get_task("file:data.jsonl?reward=numeric")``.

The file (``.jsonl``, ``.json`` (a list of objects), ``.parquet`` or ``.csv``) has one row per
problem with at least:

* ``prompt``: the user message (a string), or a list of chat messages ``[{"role", "content"}]``;
* ``answer``: the reference answer (converted to a string).

Optional columns: ``split`` (``train`` or ``eval``/``test``/``validation``; without it a seeded
``eval_fraction`` of the distinct prompts is held out), ``system`` (a system message). Other
columns are kept in the rows.

Rewards (``reward=``):

* ``exact`` (default): the extracted final answer (see :mod:`denser.tasks.answers`; if the reply
  has no ``Answer:``/``\\boxed{}`` marker, the whole stripped reply) equals ``answer`` after
  whitespace collapsing; case-insensitive unless ``case_sensitive=true``.
* ``numeric``: the extracted answer is a single number equal to ``answer`` (relative tolerance
  ``1e-6``); every ``answer`` must parse as a number.
* ``contains``: ``answer`` occurs in the reply (case-insensitive unless ``case_sensitive=true``).

With ``format_hint=true`` (default for exact and numeric), the prompt gets the instruction
``End with 'Answer: <answer>'.`` appended so the model knows how to mark its answer.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path
from typing import Any

from datasets import Dataset

from denser.tasks.answers import ANSWER_INSTRUCTION, extract_answer, normalize_text, numbers_equal, parse_number
from denser.tasks.base import Score, Task

REWARDS = ("exact", "numeric", "contains")
REQUIRED_COLUMNS = ("prompt", "answer")
_EVAL_NAMES = ("eval", "test", "validation")


class FileTaskError(ValueError):
    """A local task file that cannot be used (missing, empty, wrong columns, bad values)."""


class FileTask(Task):
    """Rows from a local file, scored by a chosen reward (see the module docstring).

    Args:
        path: the data file.
        reward: ``exact`` | ``numeric`` | ``contains``.
        eval_fraction: share of distinct prompts held out when the file has no ``split`` column
            (at least one when there are two or more distinct prompts).
        case_sensitive: for ``exact`` and ``contains``.
        format_hint: append the answer-format instruction to each prompt (default: on for
            ``exact`` and ``numeric``, off for ``contains``).
        seed, system_prompt: as for every task; ``num_train``/``num_eval`` cap the split sizes.
    """

    description = "rows from a local jsonl/json/parquet/csv file with prompt and answer columns"

    def __init__(
        self,
        path: str,
        *,
        reward: str = "exact",
        eval_fraction: float = 0.1,
        case_sensitive: bool = False,
        format_hint: bool | None = None,
        seed: int = 0,
        num_train: int | None = None,
        num_eval: int | None = None,
        system_prompt: str | None = None,
    ):
        super().__init__(seed=seed, num_train=num_train or 10**12, num_eval=num_eval if num_eval is not None else 10**12,
                         system_prompt=system_prompt)
        self.path = Path(path).expanduser()
        self.name = f"file:{path}"
        if reward not in REWARDS:
            raise FileTaskError(f"unknown reward {reward!r} for {self.name}; use one of {', '.join(REWARDS)}")
        if not 0 <= float(eval_fraction) < 1:
            raise FileTaskError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        self.reward = reward
        self.eval_fraction = float(eval_fraction)
        self.case_sensitive = bool(case_sensitive)
        self.format_hint = (reward != "contains") if format_hint is None else bool(format_hint)
        self._rows = self._load()  # validate eagerly: errors surface before any model is loaded

    # -- loading --------------------------------------------------------------------------

    def _load(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            raise FileTaskError(f"task file {str(self.path)!r} does not exist")
        suffix = self.path.suffix.lower()
        if suffix == ".jsonl":
            rows = self._read_jsonl()
        elif suffix == ".json":
            rows = self._read_json()
        elif suffix == ".parquet":
            rows = Dataset.from_parquet(str(self.path)).to_list() if self.path.stat().st_size else []
        elif suffix == ".csv":
            with open(self.path, newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        else:
            raise FileTaskError(f"task file {str(self.path)!r}: unsupported extension {suffix!r}; "
                                "use .jsonl, .json, .parquet or .csv")
        if not rows:
            raise FileTaskError(f"task file {str(self.path)!r} has no rows")
        columns = set().union(*(r.keys() for r in rows))
        missing = [c for c in REQUIRED_COLUMNS if any(c not in r or r[c] is None for r in rows)]
        if missing:
            bad = next(i for i, r in enumerate(rows) if any(c not in r or r[c] is None for c in missing))
            raise FileTaskError(
                f"task file {str(self.path)!r}: missing column(s) {', '.join(missing)} (first in row {bad}); "
                f"required: {', '.join(REQUIRED_COLUMNS)}; found: {', '.join(sorted(columns))}"
            )
        for i, r in enumerate(rows):
            r["answer"] = str(r["answer"]).strip()
            p = r["prompt"]
            if not (isinstance(p, str) and p.strip()) and not _is_messages(p):
                raise FileTaskError(f"task file {str(self.path)!r}, row {i}: 'prompt' must be a non-empty string or "
                                    "a list of {role, content} messages")
            if self.reward == "numeric" and parse_number(r["answer"]) is None:
                raise FileTaskError(f"task file {str(self.path)!r}, row {i}: reward=numeric but answer "
                                    f"{r['answer']!r} is not a single number")
            if "split" in r and r["split"] is not None and r["split"] not in ("train", *_EVAL_NAMES):
                raise FileTaskError(f"task file {str(self.path)!r}, row {i}: split {r['split']!r} is not train or "
                                    f"one of {', '.join(_EVAL_NAMES)}")
        return rows

    def _read_jsonl(self) -> list[dict[str, Any]]:
        rows = []
        with open(self.path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FileTaskError(f"task file {str(self.path)!r}, line {n}: invalid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise FileTaskError(f"task file {str(self.path)!r}, line {n}: expected a JSON object")
                rows.append(row)
        return rows

    def _read_json(self) -> list[dict[str, Any]]:
        text = self.path.read_text(encoding="utf-8")
        if not text.strip():
            return []
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileTaskError(f"task file {str(self.path)!r}: invalid JSON ({exc.msg})") from exc
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise FileTaskError(f"task file {str(self.path)!r}: a .json task file must hold a list of objects")
        return data

    def build_splits(self) -> tuple[Dataset, Dataset]:
        rows = [dict(r) for r in self._rows]
        for r in rows:
            if _is_messages(r["prompt"]):
                r["messages_json"] = json.dumps(r["prompt"])
                r["prompt"] = next((m["content"] for m in reversed(r["prompt"]) if m["role"] == "user"), "")
                r["question"] = r["messages_json"]
            else:
                r["messages_json"] = ""
                r["question"] = r["prompt"]
        if any(r.get("split") is not None for r in rows):
            train = [r for r in rows if r.get("split") == "train"]
            evals = [r for r in rows if r.get("split") in _EVAL_NAMES]
        else:
            keys = sorted({r["question"] for r in rows})
            random.Random(f"denser:file:{self.seed}").shuffle(keys)
            n_eval = int(round(self.eval_fraction * len(keys)))
            if self.eval_fraction > 0 and len(keys) >= 2:
                n_eval = min(max(n_eval, 1), len(keys) - 1)
            held = set(keys[:n_eval])
            train = [r for r in rows if r["question"] not in held]
            evals = [r for r in rows if r["question"] in held]
        if not train:
            raise FileTaskError(f"task file {str(self.path)!r}: no training rows")
        train, evals = train[: self.num_train], evals[: self.num_eval]
        return _dataset(train), _dataset(evals)

    # -- prompting and scoring ---------------------------------------------------------------

    def prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
        if row.get("messages_json"):
            messages = [dict(m) for m in json.loads(row["messages_json"])]
        else:
            messages = [{"role": "user", "content": row["prompt"]}]
        system = row.get("system") or self.system_prompt
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        if self.format_hint:
            last = messages[-1]
            last["content"] = f"{last['content'].rstrip()} {ANSWER_INSTRUCTION}"
        return messages

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        want = row["answer"]
        if self.reward == "contains":
            hay, needle = (completion, want) if self.case_sensitive else (completion.casefold(), want.casefold())
            if needle in hay:
                return Score(1.0, None, want)
            return Score(0.0, "The reply does not contain the expected answer.", None)
        got = extract_answer(completion)
        if self.reward == "numeric":
            if got is None:
                return Score(0.0, self.no_answer_feedback("number"), None)
            value = parse_number(got)
            if value is None:
                return Score(0.0, f"Your answer '{got[:40]}' is not a single number.", got)
            target = parse_number(want)
            if numbers_equal(value, target):
                return Score(1.0, None, got)
            return Score(0.0, f"Your answer {got[:40]} is wrong: it is too {'high' if value > target else 'low'}.",
                         got)
        if got is None:
            got = completion.strip()
        if normalize_text(got, case_sensitive=self.case_sensitive) == normalize_text(
                want, case_sensitive=self.case_sensitive):
            return Score(1.0, None, got)
        return Score(0.0, f"Your answer '{got[:40]}' is wrong.", got)


def _is_messages(p: Any) -> bool:
    return (isinstance(p, list) and len(p) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in p))


def _dataset(rows: list[dict[str, Any]]) -> Dataset:
    keep = []
    for i, r in enumerate(rows):
        r = dict(r)
        r.setdefault("id", i)
        keep.append(r)
    if not keep:
        return Dataset.from_dict({"id": [], "prompt": [], "answer": [], "question": [], "messages_json": []})
    return Dataset.from_list(keep)
