"""A fixed evaluation suite: the same prompts of several tasks, measured on any model.

``EvalSuite(tasks, eval_size=16, max_new_tokens=24)`` takes the first ``eval_size`` rows of every
task's eval split (never in its train split), so every model it measures answers exactly the same
prompts. ``suite.measure(model, tokenizer, initial=..., reference=...)`` gives, per task and
pooled over all of them: greedy accuracy, the formatting artifacts, and, when an initial model and
its responses are given, the response drift (KL(current || initial) per token and similarity).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from denser.analysis.artifacts import DEFAULT_NGRAM, artifact_rates
from denser.analysis.estimators import mean_stderr
from denser.analysis.responses import Generations, build_engine, generate_responses, mean_similarity, token_drift
from denser.engines import EngineSpec, SamplingParams


class EvalSuite:
    """Fixed prompts of ``tasks`` (a ``{name: Task}`` mapping, or names built with ``seed``).

    Args:
        tasks: the tasks, in report order.
        eval_size: rows per task (the first ones of the eval split; fewer if the split is smaller).
        max_new_tokens: generation budget (responses that use it all hit the length limit).
        batch_size: prompts per ``generate`` call and per KL forward (None: one call per task).
        backend: loss-core backend for the per-token KL and entropy.
        ngram: n of the repeated n-gram rate.
        seed: task generation seed when ``tasks`` holds names.
        engine: the rollout engine that generates (a run's, with its options); default the ``hf`` engine
            at ``batch_size`` sequences per call.
    """

    def __init__(self, tasks: Mapping[str, Any] | Sequence[str], *, eval_size: int = 16, max_new_tokens: int = 24,
                 batch_size: int | None = None, backend: str = "auto", ngram: int = DEFAULT_NGRAM, seed: int = 0,
                 engine: EngineSpec | None = None):
        from denser.tasks import get_task

        if not isinstance(tasks, Mapping):
            tasks = {name: get_task(name, seed=seed) for name in tasks}
        if not tasks:
            raise ValueError("an eval suite needs at least one task")
        if eval_size < 1:
            raise ValueError(f"eval_size must be >= 1, got {eval_size}")
        self.tasks = dict(tasks)
        self.eval_size, self.max_new_tokens = int(eval_size), int(max_new_tokens)
        self.batch_size, self.backend, self.ngram = batch_size, backend, ngram
        self.engine = engine
        self.rows = {name: [t.eval[i] for i in range(min(self.eval_size, len(t.eval)))] for name, t in self.tasks.items()}
        for name, rows in self.rows.items():
            if not rows:
                raise ValueError(f"task {name!r} has an empty eval split")

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def prompt_ids(self, tokenizer, name: str) -> list[list[int]]:
        from denser.trainers.models import render_prompt

        return [render_prompt(tokenizer, self.tasks[name].prompt(r)) for r in self.rows[name]]

    def generate(self, model, tokenizer, name: str) -> Generations:
        """Greedy responses of ``model`` to task ``name``'s fixed prompts, scored."""
        return self.generate_many(model, tokenizer, [name])[name]

    def generate_many(self, model, tokenizer, names: Sequence[str], *,
                      stop: Callable[[], bool] | None = None) -> dict[str, Generations]:
        """:meth:`generate` for several tasks in one batched ``generate`` call (greedy decoding of
        each prompt does not depend on its batch mates, up to floating-point ties). ``stop``: polled
        while generating; once True the responses are cut short (the caller discards them)."""
        names = list(names)
        prompts = {n: self.prompt_ids(tokenizer, n) for n in names}
        flat = [p for n in names for p in prompts[n]]
        if not flat:
            return {}
        gens = generate_responses(model, tokenizer, flat, max_new_tokens=self.max_new_tokens, greedy=True,
                                  batch_size=self.batch_size, stop=stop, engine=self.engine)
        out, start = {}, 0
        for n in names:
            end = start + len(prompts[n])
            part = Generations(prompt_ids=gens.prompt_ids[start:end], completion_ids=gens.completion_ids[start:end],
                               texts=gens.texts[start:end], truncated=gens.truncated[start:end])
            task = self.tasks[n]
            scores = task.score_batch(part.texts, self.rows[n])
            part.extra["success"] = [bool(task.is_success(s)) for s in scores]
            part.extra["answers"] = [s.answer for s in scores]
            out[n] = part
            start = end
        return out

    def sample_many(self, model, tokenizer, names: Sequence[str], *, samples: int, temperature: float, top_p: float,
                    seed: int = 0, stop: Callable[[], bool] | None = None) -> dict[str, list[float]]:
        """Per task, each fixed prompt's fraction of ``samples`` completions (sampled at ``temperature``
        and ``top_p`` by the loop's rollout engine, seeded: the same model gives the same samples) that
        succeed: the per-prompt values of mean@n. ``stop``: as in :meth:`generate_many`."""
        engine = build_engine(model, tokenizer, self.engine, self.batch_size)
        params = SamplingParams(max_new_tokens=self.max_new_tokens, num_generations=samples, temperature=temperature,
                                top_p=top_p)
        out = {}
        for name in names:
            rows, task = self.rows[name], self.tasks[name]
            rollout = engine.generate(self.prompt_ids(tokenizer, name), params, seed=seed, stop=stop)
            scores = task.score_batch(rollout.texts, [r for r in rows for _ in range(samples)])
            ok = [float(task.is_success(sc)) for sc in scores]
            out[name] = [sum(ok[p * samples:(p + 1) * samples]) / samples for p in range(len(rows))]
        return out

    def measure(self, model, tokenizer, *, initial=None, reference: Mapping[str, Generations] | None = None,
                generate: Callable[[list[str]], dict[str, Generations]] | None = None) -> tuple[dict, dict[str, Generations]]:
        """Measure ``model`` on every task.

        Args:
            model, tokenizer: the model to measure.
            initial: the model response drift is measured against (KL(model || initial)), or None.
            reference: ``{task: Generations}`` of the initial model (similarity), or None.
            generate: optional ``names -> {name: Generations}`` used instead of :meth:`generate_many`
                (e.g. a cache in front of it).

        Returns ``(record, {task: Generations})``. ``record`` = ``{"accuracy": {task: acc},
        "tasks": {task: {"accuracy", "accuracy_se" (over prompts), "n", "artifacts", "kl", "similarity", "token_f1", "tokens"}},
        "overall": {"artifacts", "kl", "similarity", "token_f1", "tokens"}}``; pooled values
        weight every response (and, for KL and entropy, every token) equally.
        """
        gens_by_task: dict[str, Generations] = {}
        tasks: dict[str, dict] = {}
        pooled = {"texts": [], "truncated": [], "lengths": [], "kl": 0.0, "ent": 0.0, "tokens": 0, "sim": [], "f1": []}
        all_gens = generate(self.names) if generate is not None else self.generate_many(model, tokenizer, self.names)
        for name in self.names:
            gens = all_gens[name]
            gens_by_task[name] = gens
            drift = token_drift(model, initial, gens, batch_size=self.batch_size or 16, backend=self.backend)
            sim = {"similarity": None, "token_f1": None}
            if reference is not None and name in reference:
                sim = mean_similarity(gens.texts, reference[name].texts)
                pooled["sim"].append((sim["similarity"], len(gens)))
                pooled["f1"].append((sim["token_f1"], len(gens)))
            success = gens.extra.get("success", [])
            tasks[name] = {
                "accuracy": sum(success) / len(success) if success else None,
                "accuracy_se": mean_stderr([float(x) for x in success])[1],
                "n": len(gens),
                "artifacts": artifact_rates(gens.texts, truncated=gens.truncated, lengths=gens.lengths,
                                            entropy=drift["mean_entropy"], ngram=self.ngram),
                "kl": drift["mean_kl"],
                "tokens": drift["tokens"],
                **sim,
            }
            pooled["texts"] += gens.texts
            pooled["truncated"] += gens.truncated
            pooled["lengths"] += gens.lengths
            pooled["ent"] += (drift["mean_entropy"] or 0.0) * drift["tokens"]
            pooled["kl"] += (drift["mean_kl"] or 0.0) * drift["tokens"]
            pooled["tokens"] += drift["tokens"]

        def weighted(pairs):
            total = sum(n for _, n in pairs)
            return sum(v * n for v, n in pairs) / total if total else None

        tokens = pooled["tokens"]
        overall = {
            "artifacts": artifact_rates(pooled["texts"], truncated=pooled["truncated"], lengths=pooled["lengths"],
                                        entropy=pooled["ent"] / tokens if tokens else None, ngram=self.ngram),
            "kl": pooled["kl"] / tokens if initial is not None and tokens else None,
            "similarity": weighted(pooled["sim"]),
            "token_f1": weighted(pooled["f1"]),
            "tokens": tokens,
        }
        record = {"accuracy": {n: tasks[n]["accuracy"] for n in self.names}, "tasks": tasks, "overall": overall}
        return record, gens_by_task


def generations_to_rows(name: str, gens: Generations) -> list[dict]:
    """JSON rows (one per response) for ``responses/stage-XXX.jsonl``."""
    return [{"task": name, "index": i, "text": t, "truncated": gens.truncated[i], "length": gens.lengths[i],
             "success": gens.extra.get("success", [None] * len(gens))[i],
             "answer": gens.extra.get("answers", [None] * len(gens))[i]}
            for i, t in enumerate(gens.texts)]
