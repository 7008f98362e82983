"""Several tasks trained at once: ``mix:A+B+C`` (``denser train --task mix:larger+subtract+multiply``).

:class:`MixedTask` builds each part with the same options (``seed``, ``num_train``, ...) and
interleaves their splits deterministically, round robin (row ``i`` of the mix is row ``i // n`` of
part ``i % n``). In the train split every part has an equal share: a part with fewer rows than the
longest repeats its rows in order up to that length. The loop draws training prompts from a seeded
permutation of the train split, as for any task, so a step's prompts are a seeded mixture of the
parts (equal in expectation, and exactly over an epoch). In the eval split a part that runs out
drops out of the rotation; its first ``n * k`` rows are the first ``k`` eval rows of every part, so
``--eval-size`` a multiple of ``n`` measures each part equally. Each row keeps its part's
fields (JSON in ``part_row``) and says which part it is (``part``); :meth:`prompt` and
:meth:`score` are the part's own (its worked examples, its reward and feedback), and the loop's
evaluation reports the accuracy per part as ``eval_accuracy/<part>`` besides the overall one
(:func:`part_accuracies`).

Options (after ``?``, as for any task): the parts' options, and ``exclude_eval_of``: seeds
(``0,1,2``) whose eval questions (each part's first ``num_eval`` rows at that seed) are removed from
the mix's train split, so a model trained on the mix has not seen the questions runs at those seeds
are evaluated on.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from denser.tasks.base import Score, Task, _to_dataset

MIX_PREFIX = "mix:"


def _seeds(value: Any) -> tuple[int, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, int):
        return (value,)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    parts = str(value).replace(";", ",").replace(" ", ",").split(",")
    try:
        return tuple(int(p) for p in parts if p.strip())
    except ValueError:
        raise ValueError(f"exclude_eval_of={value!r}: give seeds as integers, e.g. exclude_eval_of=0,1,2") from None


class MixedTask(Task):
    """The parts ``names`` (registered task names, ``file:``/``hf:`` tasks) interleaved; see the module docstring."""

    description = "several tasks at once, interleaved: mix:A+B+C"

    def __init__(self, names: Sequence[str], *, exclude_eval_of: Any = None, **options: Any):
        from denser.tasks.registry import get_task

        names = [n.strip() for n in names if n.strip()]
        if len(names) < 2:
            raise ValueError(f"a mixed task needs at least two tasks, e.g. mix:larger+subtract; got {names}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"mix: task {dup[0]!r} is listed twice; each task appears once in a mix")
        if any(n.startswith(MIX_PREFIX) for n in names):
            raise ValueError("mix: a mixed task cannot contain another mixed task")
        self.parts: dict[str, Task] = {n: get_task(n, **options) for n in names}
        thresholds = {t.success_threshold for t in self.parts.values()}
        if len(thresholds) != 1:
            raise ValueError(f"mix: the tasks count success at different scores ({sorted(thresholds)}); a mix needs "
                             "one success threshold")
        self.success_threshold = thresholds.pop()
        first = next(iter(self.parts.values()))
        super().__init__(seed=first.seed, num_train=first.num_train, num_eval=first.num_eval, few_shot=first.few_shot)
        self.name = MIX_PREFIX + "+".join(names)
        self.suggested_max_new_tokens = max(int(t.suggested_max_new_tokens) for t in self.parts.values())
        self.provides = frozenset.intersection(*(frozenset(t.provides) for t in self.parts.values()))
        self.exclude_eval_of = _seeds(exclude_eval_of)
        self._options = dict(options)

    def build_splits(self):
        from denser.tasks.registry import get_task

        train, evals = [], []
        for name, task in self.parts.items():
            excluded = set()
            for s in self.exclude_eval_of:
                other = task if s == task.seed else get_task(name, **{**self._options, "seed": s})
                excluded |= {r["question"] for r in other.eval}
            rows = [dict(r) for r in task.train if r["question"] not in excluded]
            if not rows:
                raise ValueError(f"mix: no train rows of {name!r} are left after removing the eval questions of seeds "
                                 f"{', '.join(map(str, self.exclude_eval_of))}")
            train.append([self._wrap(name, r) for r in rows])
            evals.append([self._wrap(name, dict(r)) for r in task.eval])
        longest = max(len(rows) for rows in train)  # equal shares: a shorter part's rows repeat in order
        train = [[rows[i % len(rows)] for i in range(longest)] for rows in train]
        return _to_dataset(_round_robin(train)), _to_dataset(_round_robin(evals))

    @staticmethod
    def _wrap(name: str, row: dict[str, Any]) -> dict[str, Any]:
        return {"question": row["question"], "answer": str(row["answer"]), "part": name,
                "part_row": json.dumps(row, sort_keys=True, default=str)}

    def part_of(self, row: dict[str, Any]) -> tuple[Task, dict[str, Any]]:
        """The part a mix row comes from, and the part's own row."""
        return self.parts[row["part"]], json.loads(row["part_row"])

    def prompt(self, row: dict[str, Any]) -> list[dict[str, str]]:
        task, own = self.part_of(row)
        return task.prompt(own)

    def score(self, completion: str, row: dict[str, Any]) -> Score:
        task, own = self.part_of(row)
        return task.score(completion, own)

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        task, own = self.part_of(row)
        return task.check(completion, own)

    def __repr__(self) -> str:
        return f"MixedTask(name={self.name!r}, seed={self.seed})"


def _round_robin(lists: list[list[dict]]) -> list[dict]:
    out, i = [], 0
    while any(i < len(rows) for rows in lists):
        out += [rows[i] for rows in lists if i < len(rows)]
        i += 1
    return out


def part_accuracies(task: Task, parts: Sequence[str], successes: Sequence[float]) -> dict[str, float]:
    """``{"eval_accuracy/<part>": mean success}`` over the eval rows of each part of a mixed task
    (``parts``: each row's ``part``, in the order of ``successes``); {} for any other task."""
    if not isinstance(task, MixedTask):
        return {}
    per: dict[str, list[float]] = {}
    for part, ok in zip(parts, successes, strict=True):
        per.setdefault(part, []).append(float(ok))
    return {f"eval_accuracy/{name}": sum(v) / len(v) for name, v in per.items()}
