"""Tasks read through ``datasets``: ``file:PATH`` (a local file or directory) and ``hf:NAME[:CONFIG]``.

    get_task("file:data.jsonl?reward=numeric")
    get_task("file:data.csv?prompt_column=question&rewards=math+format:0.2")
    get_task("hf:openai/gsm8k:main?prompt_column=question&split=train&eval_split=test")

``file:PATH`` loads, with the ``datasets`` library: ``.jsonl``/``.json`` (JSON lines or a list of
objects), ``.csv`` (every column read as a string: an answer ``007`` stays ``007``), ``.parquet``,
``.arrow``, a ``save_to_disk`` directory, or a directory of data files (one file per split, as in a
hub dataset repository). ``hf:NAME[:CONFIG]`` loads a hub dataset (``load_dataset(NAME, CONFIG)``,
cached; offline (``HF_HUB_OFFLINE=1``) only what is cached) or, when ``NAME`` is a local directory,
that directory (a ``save_to_disk`` one or one of data files), never touching the network.

Each row has a prompt and an answer:

* the prompt column (``prompt_column``, default ``prompt``): the user message (a string) or a
  list of chat messages ``[{"role", "content"}]``;
* the answer column (``answer_column``, default ``answer``): the reference answer, converted to a
  string.

Splits: a dataset with named splits trains on ``split`` (default ``train``; a dataset with one
split uses it) and evaluates on ``eval_split`` (default: the first of ``test``, ``validation``,
``eval`` present; ``eval_split=`` (empty) for none). A single table may have a ``split`` column
(``train`` or ``eval``/``test``/``validation``). Otherwise a seeded ``eval_fraction`` of the
distinct prompts is held out. Optional column ``system`` (a system message); other columns are
kept in the rows (reward functions see them); the prompt and answer are also stored as ``prompt``
and ``answer`` (replacing columns of those names when other columns are chosen).

Rewards: ``reward=NAME`` or ``rewards=NAME[:WEIGHT]+NAME[:WEIGHT]...`` names registered reward
functions (:mod:`denser.tasks.rewards`: ``exact`` (the default), ``numeric``, ``contains``,
``format``, ``math``, and yours); the score is their weighted sum, each one logged. With
``format_hint`` (default: on unless every reward is ``contains``) the prompt gets the instruction
``End with 'Answer: <answer>'.`` appended. ``case_sensitive=true`` applies to ``exact`` and
``contains``. A completion is a success when its score reaches ``success_threshold`` (default:
the sum of the positive weights, i.e. every reward satisfied).

Every problem (missing file, unknown reward, missing column, bad row) is a :class:`FileTaskError`
raised when the task is built, before any model is loaded; it names the row and the fix.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
from pathlib import Path
from typing import Any, Iterator

import datasets
import huggingface_hub.utils.logging as hub_logging
from datasets import Dataset, DatasetDict, Features, Value, load_dataset, load_from_disk

from denser.tasks.answers import ANSWER_INSTRUCTION
from denser.tasks.base import Score, Task
from denser.tasks.rewards import WeightedRewards

#: the file suffixes ``file:`` reads, and the ``datasets`` builder of each
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
REQUIRED_COLUMNS = ("prompt", "answer")
_EVAL_NAMES = ("eval", "test", "validation")
_EVAL_SPLIT_PREFERENCE = ("test", "validation", "eval")


class FileTaskError(ValueError):
    """A task file or dataset that cannot be used (missing, empty, wrong columns, bad values)."""


class FileTask(Task):
    """Rows from a local file or directory, scored by registered rewards (see the module docstring).

    Args:
        path: the data file or directory.
        reward, rewards: ``NAME`` or ``NAME[:WEIGHT]+...`` (or a ``{name: weight}`` mapping); give
            one of the two (default ``exact``).
        prompt_column, answer_column: the columns holding the prompt and the reference answer.
        split, eval_split: split names, for a dataset with named splits.
        eval_fraction: share of distinct prompts held out when there is no eval split (at least
            one when there are two or more distinct prompts).
        case_sensitive: for ``exact`` and ``contains``.
        format_hint: append the answer-format instruction to each prompt.
        success_threshold: the score that counts as a success (default: the sum of positive weights).
        seed, system_prompt: as for every task; ``num_train``/``num_eval`` cap the split sizes.
    """

    description = "rows from a local jsonl/json/csv/parquet/arrow file or dataset directory, with prompt and answer columns"
    prefix = "file:"

    def __init__(
        self,
        path: str,
        *,
        reward: Any = None,
        rewards: Any = None,
        prompt_column: str = "prompt",
        answer_column: str = "answer",
        split: str | None = None,
        eval_split: str | None = None,
        eval_fraction: float = 0.1,
        case_sensitive: bool = False,
        format_hint: bool | None = None,
        success_threshold: float | None = None,
        seed: int = 0,
        num_train: int | None = None,
        num_eval: int | None = None,
        system_prompt: str | None = None,
    ):
        super().__init__(seed=seed, num_train=num_train or 10**12, num_eval=num_eval if num_eval is not None else 10**12,
                         system_prompt=system_prompt)
        self.source = str(path)
        self.path = Path(self.source).expanduser()
        self.name = f"{self.prefix}{path}"
        if reward is not None and rewards is not None:
            raise FileTaskError(f"{self.name}: give reward= or rewards=, not both")
        spec = rewards if rewards is not None else (reward if reward is not None else "exact")
        self.case_sensitive = bool(case_sensitive)
        try:
            self.rewards = WeightedRewards(spec, options={"case_sensitive": self.case_sensitive}, where=self.name)
        except ValueError as exc:
            raise FileTaskError(str(exc)) from None
        self.reward = "+".join(self.rewards.names)
        if not 0 <= float(eval_fraction) < 1:
            raise FileTaskError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
        for option, value in (("prompt_column", prompt_column), ("answer_column", answer_column)):
            if not isinstance(value, str) or not value:
                raise FileTaskError(f"{self.name}: {option} must be a column name, got {value!r}")
        self.prompt_column, self.answer_column = prompt_column, answer_column
        self.split_name = None if split is None else str(split)
        self.eval_split = None if eval_split is None else str(eval_split)
        self.eval_fraction = float(eval_fraction)
        self.format_hint = (set(self.rewards.names) != {"contains"}) if format_hint is None else bool(format_hint)
        self.success_threshold = float(self.rewards.max_score if success_threshold is None else success_threshold)
        self._row_splits: list[str | None] = []
        self._rows = self._load()  # validate eagerly: errors surface before any model is loaded

    # -- loading --------------------------------------------------------------------------

    @property
    def where(self) -> str:
        """How error messages name the source."""
        return f"task file {self.source!r}"

    def load_source(self) -> Dataset | DatasetDict:
        """The raw table(s) through ``datasets``; a subclass (``hf:``) changes only this."""
        path = self.path
        if path.is_dir():
            return self._load_directory(path)
        if not path.is_file():
            raise FileTaskError(f"{self.where} does not exist")
        suffix = path.suffix.lower()
        if suffix not in FORMATS:
            raise FileTaskError(f"{self.where}: unsupported extension {suffix!r}; use "
                                f"{', '.join(FORMATS)} or a dataset directory (save_to_disk or data files)")
        if suffix != ".parquet" and suffix != ".arrow" and _blank(path):
            raise FileTaskError(f"{self.where} has no rows")
        kwargs: dict[str, Any] = {}
        if suffix == ".csv":  # every column a string: '007' stays '007', 'NA' stays 'NA'
            kwargs = {"features": Features({c: Value("string") for c in _csv_header(path)}), "keep_default_na": False}
        try:
            with _quiet_datasets():
                return load_dataset(FORMATS[suffix], data_files=str(path), split="train", **kwargs)
        except Exception as exc:  # noqa: BLE001 - any reader failure becomes one line naming the file
            return self._read_error(path, exc)

    def _load_directory(self, path: Path) -> Dataset | DatasetDict:
        try:
            with _quiet_datasets():
                if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
                    return load_from_disk(str(path))
                return load_dataset(str(path))
        except Exception as exc:  # noqa: BLE001
            raise FileTaskError(f"{self.where}: cannot load the directory as a dataset ({_one_line(exc)}); it must be "
                                "a save_to_disk directory or hold data files (.jsonl, .csv, .parquet, ...)") from None

    def _read_error(self, path: Path, exc: Exception) -> Dataset:
        """After ``datasets`` failed on ``path``: the error naming the bad line, or, for a JSON file
        every line of which is an object (``datasets`` versions before its ``Json`` type cannot read
        a column mixing numbers and strings, nor such a column next to blank lines), its table."""
        if "corresponds to no data" in str(exc):
            raise FileTaskError(f"{self.where} has no rows")
        suffix = path.suffix.lower()
        if suffix not in (".jsonl", ".json"):
            raise FileTaskError(f"{self.where}: cannot read it ({_one_line(exc)})")
        rows = []
        if suffix == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise FileTaskError(f"{self.where}, line {n}: invalid JSON ({err.msg})") from None
                    if not isinstance(row, dict):
                        raise FileTaskError(f"{self.where}, line {n}: expected a JSON object")
                    rows.append(row)
        else:
            try:
                rows = json.loads(path.read_text(encoding="utf-8", errors="replace"))
            except json.JSONDecodeError as err:
                raise FileTaskError(f"{self.where}: invalid JSON ({err.msg})") from None
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise FileTaskError(f"{self.where}: a .json task file must hold a list of objects")
        for r in rows:  # the answer is text anyway; other columns must keep one type
            if r.get(self.answer_column) is not None:
                r[self.answer_column] = str(r[self.answer_column])
        try:
            return Dataset.from_list(rows)
        except Exception as err:  # noqa: BLE001
            raise FileTaskError(f"{self.where}: cannot read it ({_one_line(exc)}; {_one_line(err)}); "
                                "give each column one type in every row") from None

    def _parts(self, source: Dataset | DatasetDict) -> list[tuple[str, str | None, Dataset]]:
        """``[(row label prefix, split ("train"/"eval"/None: from a split column), table)]``."""
        if isinstance(source, Dataset):
            if self.split_name is not None or self.eval_split is not None:
                raise FileTaskError(f"{self.where} is a single table without named splits: drop split=/eval_split= "
                                    "(a 'split' column or eval_fraction picks the eval rows)")
            return [("", None, source)]
        names = list(source)
        if not names:
            raise FileTaskError(f"{self.where} has no rows")
        train = self.split_name
        if train is None:
            train = "train" if "train" in source else (names[0] if len(names) == 1 else None)
            if train is None:
                raise FileTaskError(f"{self.where} has no 'train' split; available splits: {', '.join(names)}; "
                                    "pick one with split=NAME")
        elif train not in source:
            raise FileTaskError(f"{self.where}: no split {train!r}; available splits: {', '.join(names)}")
        evals = self.eval_split
        if evals is None:
            evals = next((n for n in _EVAL_SPLIT_PREFERENCE if n in source and n != train), "")
        elif evals and evals not in source:
            raise FileTaskError(f"{self.where}: no split {evals!r}; available splits: {', '.join(names)} "
                                "(eval_split= with no name holds out eval_fraction of train instead)")
        if not evals:
            return [(f"{train} ", None, source[train])]
        return [(f"{train} ", "train", source[train]), (f"{evals} ", "eval", source[evals])]

    def _load(self) -> list[dict[str, Any]]:
        parts = self._parts(self.load_source())
        rows: list[dict[str, Any]] = []
        labels: list[str] = []
        splits: list[str | None] = []
        for label, split, table in parts:
            part_rows = table.to_list()
            rows += part_rows
            labels += [f"{label}row {i}" for i in range(len(part_rows))]
            splits += [split] * len(part_rows)
        if not rows:
            raise FileTaskError(f"{self.where} has no rows")
        required = (self.prompt_column, self.answer_column)
        columns = set().union(*(r.keys() for r in rows))
        missing = [c for c in required if any(r.get(c) is None for r in rows)]
        if missing:
            bad = next(i for i, r in enumerate(rows) if any(r.get(c) is None for c in missing))
            hint = "" if required != REQUIRED_COLUMNS else "; or name them with prompt_column=NAME&answer_column=NAME"
            role = {self.prompt_column: "prompt_column", self.answer_column: "answer_column"}
            named = [c if c in REQUIRED_COLUMNS else f"{c} ({role[c]})" for c in missing]
            raise FileTaskError(
                f"{self.where}: missing column(s) {', '.join(named)} (first in {labels[bad]}); "
                f"required: {', '.join(required)}; found: {', '.join(sorted(columns))}{hint}"
            )
        from_column = all(s is None for s in splits)
        for i, r in enumerate(rows):
            r["prompt"], r["answer"] = r[self.prompt_column], str(r[self.answer_column]).strip()
            p = r["prompt"]
            if _is_messages(p):
                r["prompt"] = [{k: v for k, v in m.items() if v is not None} for m in p]
            elif not (isinstance(p, str) and p.strip()):
                raise FileTaskError(f"{self.where}, {labels[i]}: {self.prompt_column!r} must be a non-empty string or "
                                    "a list of {role, content} messages")
            problem = self.rewards.check_answer(r["answer"])
            if problem:
                raise FileTaskError(f"{self.where}, {labels[i]}: {problem}")
            if from_column:
                s = r.get("split")
                if s is not None and s not in ("train", *_EVAL_NAMES):
                    raise FileTaskError(f"{self.where}, {labels[i]}: split {s!r} is not train or "
                                        f"one of {', '.join(_EVAL_NAMES)}")
                splits[i] = None if s is None else ("train" if s == "train" else "eval")
        self._row_splits = splits
        return rows

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
        if any(s is not None for s in self._row_splits):
            train = [r for r, s in zip(rows, self._row_splits) if s == "train"]
            evals = [r for r, s in zip(rows, self._row_splits) if s == "eval"]
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
            raise FileTaskError(f"{self.where}: no training rows")
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

    @property
    def runs_programs(self) -> bool:  # the `tests` reward runs the reply's program: score in parallel
        return "tests" in self.rewards.names

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        return self.rewards.score(completion, row)


class HFTask(FileTask):
    """``hf:NAME[:CONFIG]``: a hub dataset (``load_dataset(NAME, CONFIG)``), or the local dataset
    directory ``NAME``. Options as for :class:`FileTask`."""

    description = "a hub dataset (online or cached) or a local dataset directory, with prompt/answer columns"
    prefix = "hf:"

    def __init__(self, name: str, **options: Any):
        self.dataset_name, _, config = str(name).partition(":")
        self.config_name = config or None
        if not self.dataset_name:
            raise FileTaskError(f"hf:{name}: name a dataset, e.g. hf:openai/gsm8k:main or hf:/path/to/dataset_dir")
        super().__init__(name, **options)

    @property
    def where(self) -> str:
        return f"dataset {self.source!r}"

    def load_source(self) -> Dataset | DatasetDict:
        local = Path(self.dataset_name).expanduser()
        if local.is_dir():
            return self._load_directory(local)
        try:
            with _quiet_datasets():
                return load_dataset(self.dataset_name, self.config_name)
        except Exception as exc:  # noqa: BLE001 - hub and cache failures come in many types
            offline = " (offline: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so only cached datasets load)" \
                if datasets.config.HF_HUB_OFFLINE else ""
            raise FileTaskError(f"{self.where}: cannot load it ({_one_line(exc)}){offline}; give a hub dataset name "
                                "(hf:NAME[:CONFIG]) or a local dataset directory") from None


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


def _blank(path: Path) -> bool:
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        return next(csv.reader(fh), [])


def _one_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    text = str(exc).strip() or type(exc).__name__
    if cause is not None and "error occurred while generating" in text:
        text = str(cause).strip() or text
    return " ".join(text.split())[:300]


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or log lines from ``datasets`` or the hub client (an error must stay one
    line on stderr)."""
    bars = datasets.is_progress_bar_enabled()
    level, hub_level = datasets.logging.get_verbosity(), hub_logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    hub_logging.set_verbosity(hub_logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        hub_logging.set_verbosity(hub_level)
        if bars:
            datasets.enable_progress_bars()
