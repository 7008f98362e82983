"""The task contract: rows, prompts and scores with feedback (the registry: ``registry.py``).

A task is a source of prompts with a verifiable reward::

    task = get_task("addition", seed=0)
    row = task.train[0]                     # a dict: id, question, answer, ...
    messages = task.prompt(row)             # chat messages -> models.render_prompt(tokenizer, messages)
    s = task.score(completion_text, row)    # Score(score=1.0 or 0.0, feedback=None or "why it failed")
    task.is_success(s)                      # score >= task.success_threshold

``train`` and ``eval`` are ``datasets.Dataset`` objects generated locally and deterministically
from the seed (no hub), with disjoint questions. ``get_task`` accepts options inline, which is
what a CLI flag needs: ``get_task("file:data.jsonl?reward=numeric&eval_fraction=0.2")``.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping

from datasets import Dataset

from denser.sandbox import default_workers
from denser.tasks.answers import ANSWER_INSTRUCTION


@dataclass(frozen=True)
class Score:
    """The reward of one completion.

    Attributes:
        score: the reward (built-in tasks: 1.0 right, 0.0 wrong).
        feedback: on failure, a short text explaining what was wrong, phrased as an environment
            would (it does not give the solution away); ``None`` on success. SDPO puts it in the
            teacher's context.
        answer: the extracted final answer (``None`` when the reply had none), for logs.
        rewards: for a task scored by several reward functions (:mod:`denser.tasks.rewards`),
            each one's unweighted value ``{name: value}`` (``score`` is their weighted sum); the
            loop logs their means as ``reward/<name>``. ``None`` for a single built-in rule.
    """

    score: float
    feedback: str | None = None
    answer: str | None = None
    rewards: Mapping[str, float] | None = field(default=None, hash=False)


class Task:
    """Base class of every task. Subclasses set ``name``/``description`` and implement
    :meth:`make_problem` (one random problem as a row dict with at least ``question`` and
    ``answer``) and :meth:`check` (the reward), or override :meth:`build_splits` entirely.

    Args:
        seed: generation seed; the same seed gives identical splits.
        num_train: train rows wanted (fewer if the task has fewer distinct problems).
        num_eval: held-out eval rows (questions never in train).
        system_prompt: optional system message prepended by :meth:`prompt`.
        few_shot: put the task's worked examples (:attr:`examples`, problems outside the task's
            own problem space) before the question as earlier chat turns. On by default: a
            135M model rarely uses the ``Answer:`` format from the instruction alone (2% success
            on ``addition`` at temperature 1) but copies it from one example (~45%).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: a generation budget that fits a short answer in the task's format
    suggested_max_new_tokens: ClassVar[int] = 48
    #: a score at or above this counts as a success (a sibling SDPO may learn from)
    success_threshold: ClassVar[float] = 1.0
    default_num_train: ClassVar[int] = 2000
    default_num_eval: ClassVar[int] = 100
    #: worked examples ``(question, reply)`` shown as earlier turns when ``few_shot`` is on
    examples: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: the signals (``denser.objectives.Signal`` values) the loop can build from this task: rewards,
    #: and teacher contexts from successes and feedback; a task that cannot build a teacher drops "teacher"
    provides: ClassVar[frozenset[str]] = frozenset({"rewards", "advantages", "teacher"})

    def __init__(
        self,
        *,
        seed: int = 0,
        num_train: int | None = None,
        num_eval: int | None = None,
        system_prompt: str | None = None,
        few_shot: bool = True,
    ):
        self.seed = int(seed)
        self.few_shot = bool(few_shot)
        self.num_train = int(num_train if num_train is not None else self.default_num_train)
        self.num_eval = int(num_eval if num_eval is not None else self.default_num_eval)
        if self.num_train < 1 or self.num_eval < 0:
            raise ValueError(f"task {self.name}: num_train must be >= 1 and num_eval >= 0")
        self.system_prompt = system_prompt
        self._splits: tuple[Dataset, Dataset] | None = None

    # -- data ------------------------------------------------------------------------------

    @property
    def train(self) -> Dataset:
        """Training rows (generated on first use, then cached on the task)."""
        return self._get_splits()[0]

    @property
    def eval(self) -> Dataset:
        """Held-out evaluation rows; no question also appears in :attr:`train`."""
        return self._get_splits()[1]

    def split(self, name: str) -> Dataset:
        """``"train"`` or ``"eval"`` (``"test"``/``"validation"`` are aliases of eval)."""
        if name == "train":
            return self.train
        if name in ("eval", "test", "validation"):
            return self.eval
        raise ValueError(f"unknown split {name!r}: use 'train' or 'eval'")

    def _get_splits(self) -> tuple[Dataset, Dataset]:
        if self._splits is None:
            self._splits = self.build_splits()
        return self._splits

    def build_splits(self) -> tuple[Dataset, Dataset]:
        """Draw distinct problems with a seeded RNG; the first ``num_eval`` become eval.

        If the task has fewer distinct problems than ``num_train + num_eval``, eval keeps its
        size and train gets the rest (an error if nothing would be left for train).
        """
        rng = random.Random(f"denser:{self.name}:{self.seed}")
        want = self.num_train + self.num_eval
        seen: set[str] = set()
        rows: list[dict[str, Any]] = []
        misses = 0
        while len(rows) < want and misses < 2000 + 20 * want:
            row = self.make_problem(rng)
            if row["question"] in seen:
                misses += 1
                continue
            seen.add(row["question"])
            rows.append(row)
        if len(rows) <= self.num_eval:
            raise ValueError(
                f"task {self.name}: only {len(rows)} distinct problems, not enough for {self.num_eval} eval rows "
                f"and a train split; lower num_eval"
            )
        eval_rows, train_rows = rows[: self.num_eval], rows[self.num_eval : want]
        return _to_dataset(train_rows), _to_dataset(eval_rows)

    def make_problem(self, rng: random.Random) -> dict[str, Any]:
        """One random problem: a dict with ``question`` (the user prompt) and ``answer`` (str)."""
        raise NotImplementedError

    # -- prompting and scoring ---------------------------------------------------------------

    def prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """Chat messages for ``row``: an optional system message, the worked examples (when
        ``few_shot``) as user/assistant turns, then the user's question."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        if self.few_shot:
            for question, reply in self.examples:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return messages + [{"role": "user", "content": row["question"]}]

    def score(self, completion: str, row: dict[str, Any]) -> Score:
        """Reward of ``completion`` (the decoded reply, without the prompt) for ``row``."""
        return self.check(completion, row)

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        raise NotImplementedError

    #: scoring runs programs (the ``code`` task, the ``tests`` reward): :meth:`score_batch` then scores
    #: ``reward_workers`` completions at a time, each program in a sandboxed child process of its own
    runs_programs: bool = False
    #: completions a task that runs programs scores at a time (None: the number of cores); the run's
    #: ``--reward-workers`` sets it
    reward_workers: int | None = None

    def score_batch(self, completions: Iterable[str], rows: Iterable[dict[str, Any]]) -> list[Score]:
        """:meth:`score` over parallel lists, in order. A task that runs programs scores
        ``reward_workers`` at a time (threads that wait on their sandboxed child processes); the
        scores do not depend on how many run at once."""
        pairs = list(zip(completions, rows, strict=True))
        workers = min(self.reward_workers or default_workers(), len(pairs)) if self.runs_programs else 1
        if workers <= 1:
            return [self.score(c, r) for c, r in pairs]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"score-{self.name}") as pool:
            return list(pool.map(lambda p: self.score(*p), pairs))

    def is_success(self, score: Score) -> bool:
        return score.score >= self.success_threshold

    @staticmethod
    def no_answer_feedback(what: str = "answer") -> str:
        return f"No final answer found. {ANSWER_INSTRUCTION.replace('<answer>', f'<{what}>')}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, seed={self.seed})"


def _to_dataset(rows: list[dict[str, Any]]) -> Dataset:
    rows = [{"id": i, **r} for i, r in enumerate(rows)]
    return Dataset.from_list(rows)
