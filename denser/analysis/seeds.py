"""Runs of one configuration at several seeds: the measures a comparison reports, their mean and
standard error over seeds, and a bootstrap over seeds and eval prompts for the accuracies.

    groups = group_runs(records, labels)        # runs sharing a label are seeds of one configuration
    summary = group_summary(group)              # {measure: Stat(mean, se, n, values)}
    boot = bootstrap_group(group)               # {accuracy measure: B resampled group means} or None

- A **measure** (:data:`MEASURES`) is one number per run, read from its ``continual.json``
  (final-stage values; the continual-learning measures from the accuracy matrix).
- :func:`mean_se` is the mean over seeds and its standard error ``stdev(ddof=1) / sqrt(n)``;
  with one seed the standard error is ``None`` (no error bar), never 0.
- :func:`bootstrap_group` resamples seeds with replacement and, inside every drawn seed, that run's
  eval prompts with replacement (the same prompts at every stage, so a task's forgetting compares
  the same questions), from the per-prompt ``success`` of ``responses/stage-NNN.jsonl``; every
  accuracy measure is recomputed from the resampled accuracy matrix (:func:`matrix_measures`).
  Seeds generate their own task prompts, so prompts are resampled independently per seed.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from denser.analysis.records import dig

BOOTSTRAP_SAMPLES = 2000
IGNORED_ARGS = ("seed",)
# run settings the seeds of one configuration share (besides the objective's arguments and the sequence)
CONFIG_KEYS = ("lr", "num_generations", "prompts_per_step", "max_new_tokens", "eval_size", "eval_samples", "dtype")  # objective arguments that may differ between the seeds of one configuration


@dataclass(frozen=True)
class Measure:
    key: str
    title: str
    value: Callable[[dict], float | None]  # record -> the run's value
    accuracy: bool = False  # a function of the accuracy matrix: bootstrapped over seeds and prompts
    digits: int = 3


@dataclass(frozen=True)
class Stat:
    """Mean over seeds with its standard error (None for one seed) and the per-seed values."""

    mean: float | None
    se: float | None
    n: int
    values: tuple[float, ...] = ()


@dataclass
class RunGroup:
    """The runs (seeds) of one configuration, under one label."""

    label: str
    records: list[dict] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def objective(self) -> str:
        return self.records[0]["objective"]

    @property
    def args(self) -> dict:
        return self.records[0].get("objective_args") or {}

    @property
    def seeds(self) -> list:
        return [dig(r, "config", "seed") for r in self.records]


def mean_se(values: Sequence[float | None]) -> Stat:
    vals = tuple(float(v) for v in values if v is not None and not math.isnan(float(v)))
    if not vals:
        return Stat(None, None, 0)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    return Stat(statistics.fmean(vals), se, len(vals), vals)


# --------------------------------------------------------------------------------------- grouping


def group_runs(records: Sequence[dict], labels: Sequence[str]) -> list[RunGroup]:
    """Runs sharing a label, in order of first appearance. Seeds of one label must be the same
    configuration (objective and its arguments, task sequence, steps) at distinct seeds, and complete."""
    if len(labels) != len(records):
        raise ValueError(f"{len(labels)} labels for {len(records)} runs; give one label per run (seeds of one "
                         "configuration share a label)")
    groups: dict[str, RunGroup] = {}
    for label, r in zip(labels, records):
        if r.get("status") != "complete" or not r.get("metrics"):
            raise ValueError(f"{r['run_dir']}: the run is not complete ({len(r['stages']) - 1} of "
                             f"{len(r['train_tasks'])} stages); finish it with `denser continual ... --resume` or "
                             "leave it out")
        groups.setdefault(label, RunGroup(label)).records.append(r)
    for g in groups.values():
        first = _config_key(g.records[0])
        for r in g.records[1:]:
            other = _config_key(r)
            diffs = [k for k in first if first[k] != other[k]]
            if diffs:
                raise ValueError(f"runs labelled {g.label!r} differ in {', '.join(diffs)} ({g.records[0]['run_dir']} "
                                 f"vs {r['run_dir']}); a label names the seeds of one configuration")
        seeds = g.seeds
        dup = sorted({str(s) for s in seeds if seeds.count(s) > 1})
        if dup:
            raise ValueError(f"runs labelled {g.label!r} repeat seed {dup[0]}; seeds of one configuration must differ")
    return list(groups.values())


def _config_key(r: dict) -> dict:
    args = {k: v for k, v in (r.get("objective_args") or {}).items() if k not in IGNORED_ARGS}
    return {"objective": r["objective"], "objective arguments": args, "train tasks": r["train_tasks"],
            "held-out tasks": r.get("heldout_tasks") or [],
            "steps per task": dig(r, "continual", "steps_per_task"), "model": r.get("model"),
            **{k.replace("_", " "): dig(r, "config", k) for k in CONFIG_KEYS}}


# --------------------------------------------------------------------------------------- measures


def matrix_measures(R: np.ndarray, num_train: int) -> dict[str, np.ndarray]:
    """The continual-learning measures of accuracy matrices ``R[..., stage, column]`` (stages 0..T,
    the T training columns first, then the held-out ones), batched over leading dimensions; the
    same definitions as :func:`denser.analysis.forgetting.continual_metrics`, final stage."""
    T = num_train
    R = np.asarray(R, dtype=float)
    nan = np.full(R.shape[:-2], np.nan)
    diag = np.stack([R[..., j, j - 1] for j in range(1, T + 1)], -1)
    before = np.stack([R[..., j - 1, j - 1] for j in range(1, T + 1)], -1)
    out = {"final_accuracy": R[..., T, :T].mean(-1), "in_domain_gain": (diag - before).mean(-1)}
    if T >= 2:
        # forgetting: best accuracy from the stage that trained the task (stage j + 1 for column j) on, minus
        # the current one; "_all_earlier": best over every stage from 1 on (denser's earlier measure)
        for key, first in (("forgetting", lambda j: j + 1), ("forgetting_all_earlier", lambda j: 1)):
            best = np.stack([R[..., first(j):T, j].max(-1) for j in range(T - 1)], -1)
            out[key] = (best - R[..., T, : T - 1]).mean(-1)
        avg_f = [np.stack([R[..., j + 1:k, j].max(-1) - R[..., k, j] for j in range(k - 1)], -1).mean(-1)
                 for k in range(2, T + 1)]
        out["worst_forgetting"] = np.stack(avg_f, -1).max(-1)
        out["bwt"] = (R[..., T, : T - 1] - diag[..., : T - 1]).mean(-1)
        out["fwt"] = np.stack([R[..., j - 1, j - 1] - R[..., 0, j - 1] for j in range(2, T + 1)], -1).mean(-1)
    else:
        out.update(forgetting=nan, forgetting_all_earlier=nan, worst_forgetting=nan, bwt=nan, fwt=nan)
    held = R[..., T:]
    out["heldout_delta"] = (held[..., T, :] - held[..., 0, :]).mean(-1) if held.shape[-1] else nan
    return out


def _matrix(r: dict) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in r["accuracy_matrix"]], dtype=float)


def _from_matrix(key: str) -> Callable[[dict], float | None]:
    def value(r: dict) -> float | None:
        v = float(matrix_measures(_matrix(r), len(r["train_tasks"]))[key])
        return None if math.isnan(v) else v

    return value


def _final(*keys) -> Callable[[dict], float | None]:
    return lambda r: dig(r["stages"][-1], *keys)


def _sampled(delta: bool) -> Callable[[dict], float | None]:
    """Mean over all columns of the sampled mean@n at the last stage (or its change from stage 0)."""

    def value(r: dict) -> float | None:
        last, first = r["stages"][-1].get("sampled_accuracy"), r["stages"][0].get("sampled_accuracy")
        if not last or any(last.get(c) is None for c in r["columns"]):
            return None
        mean = statistics.fmean(last[c] for c in r["columns"])
        if not delta:
            return mean
        if not first or any(first.get(c) is None for c in r["columns"]):
            return None
        return mean - statistics.fmean(first[c] for c in r["columns"])

    return value


MEASURES: tuple[Measure, ...] = (
    Measure("final_accuracy", "final avg accuracy (trained tasks)", _from_matrix("final_accuracy"), True),
    Measure("in_domain_gain", "in-domain gain R[j,j] - R[j-1,j]", _from_matrix("in_domain_gain"), True),
    Measure("forgetting", "avg forgetting (final)", _from_matrix("forgetting"), True),
    Measure("forgetting_all_earlier", "avg forgetting, max over all earlier stages (final)",
            _from_matrix("forgetting_all_earlier"), True),
    Measure("worst_forgetting", "worst avg forgetting", _from_matrix("worst_forgetting"), True),
    Measure("bwt", "BWT", _from_matrix("bwt"), True),
    Measure("fwt", "FWT", _from_matrix("fwt"), True),
    Measure("heldout_delta", "held-out Δ", _from_matrix("heldout_delta"), True),
    Measure("sampled_final", "sampled mean@n (final, all tasks)", _sampled(False)),
    Measure("sampled_delta", "sampled mean@n Δ from initial", _sampled(True)),
    Measure("relative_l2", "rel. L2 ‖θ-θ0‖/‖θ0‖", _final("params", "relative_l2")),
    Measure("one_minus_cosine", "1 - cosine(θ, θ0)",
            lambda r: None if _final("params", "cosine")(r) is None else 1.0 - _final("params", "cosine")(r)),
    Measure("mean_angle", "mean principal angle°", _final("params", "spectral", "mean_angle_deg"), digits=2),
    Measure("mean_overlap", "principal-subspace overlap", _final("params", "spectral", "mean_overlap"), digits=5),
    Measure("kl", "KL(cur‖init)/token", _final("eval", "overall", "kl"), digits=4),
    Measure("similarity", "similarity to initial", _final("eval", "overall", "similarity")),
    Measure("token_f1", "word F1 to initial", _final("eval", "overall", "token_f1")),
    Measure("repeated_answer_rate", "repeated answer rate", _final("eval", "overall", "artifacts", "repeated_answer_rate")),
    Measure("no_answer_rate", "no-answer rate", _final("eval", "overall", "artifacts", "no_answer_rate")),
    Measure("repeated_ngram_rate", "repeated 3-gram rate", _final("eval", "overall", "artifacts", "repeated_ngram_rate")),
    Measure("length_limit_rate", "length-limit rate", _final("eval", "overall", "artifacts", "length_limit_rate")),
    Measure("mean_length", "mean length (tokens)", _final("eval", "overall", "artifacts", "mean_length"), digits=1),
    Measure("mean_entropy", "entropy (nats/token)", _final("eval", "overall", "artifacts", "mean_entropy")),
)
MEASURE = {m.key: m for m in MEASURES}


def group_summary(group: RunGroup) -> dict[str, Stat]:
    return {m.key: mean_se([m.value(r) for r in group.records]) for m in MEASURES}


def stage_stats(group: RunGroup, per_stage: Callable[[dict], Sequence[float | None]]) -> list[Stat]:
    """Mean ± se over seeds at every stage of a per-stage series."""
    rows = [list(per_stage(r)) for r in group.records]
    width = max(len(x) for x in rows)
    return [mean_se([x[k] if k < len(x) else None for x in rows]) for k in range(width)]


# -------------------------------------------------------------------------------------- bootstrap


def prompt_successes(record: dict) -> list[np.ndarray] | None:
    """Per column, the per-prompt success ``[stage, prompt]`` (0/1) from ``responses/stage-NNN.jsonl``;
    None where a file is missing or does not reproduce the recorded accuracy matrix."""
    run = Path(record["run_dir"])
    K = len(record["stages"])
    per_col: list[list[list[float]]] = [[[] for _ in range(K)] for _ in record["columns"]]
    index = {c: i for i, c in enumerate(record["columns"])}
    for k in range(K):
        path = run / "responses" / f"stage-{k:03d}.jsonl"
        if not path.is_file():
            return None
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("task") in index and row.get("success") is not None:
                per_col[index[row["task"]]][k].append(float(row["success"]))
    out = []
    R = _matrix(record)
    for j, stages in enumerate(per_col):
        if len({len(s) for s in stages}) != 1 or not stages[0]:
            return None
        S = np.array(stages)
        if not np.allclose(S.mean(-1), R[:, j], atol=1e-9):
            return None
        out.append(S)
    return out


def bootstrap_group(group: RunGroup, *, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict[str, np.ndarray] | None:
    """``{accuracy measure or "final:<task>": B values}``: the group mean over a resample of its seeds
    (with replacement), each drawn seed's eval prompts resampled (with replacement, the same indices
    at every stage); None when a run has no per-prompt successes."""
    succ = [prompt_successes(r) for r in group.records]
    if any(s is None for s in succ):
        return None
    rng = np.random.default_rng(seed)
    n, T = group.n, len(group.records[0]["train_tasks"])
    draws = samples * n  # one independent prompt resample per (bootstrap sample, drawn seed slot)
    per_run: dict[str, list[np.ndarray]] = {}
    for S in succ:
        R = np.stack([s[:, rng.integers(0, s.shape[1], size=(draws, s.shape[1]))].mean(-1).T for s in S], -1)
        values = matrix_measures(R, T)
        values.update({f"final:{c}": R[:, T, j] for j, c in enumerate(group.records[0]["columns"])})
        for key, v in values.items():
            per_run.setdefault(key, []).append(v)
    pick = rng.integers(0, n, size=(samples, n))
    slot = np.arange(draws).reshape(samples, n)
    return {key: np.stack(v)[pick, slot].mean(-1) for key, v in per_run.items()}
