"""A step's row of ``metrics.jsonl``: sums and counts over processes, then means (rewards, each
reward of a multi-reward task, the objective's metrics over every micro-batch of every update,
lengths, dynamic sampling and overlong shaping, timings), and what it is made of: each update's
:class:`UpdateResult` and the step's :class:`PhaseTimer`."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from denser.kernels import Metric, merge_metrics
from denser.tasks.rewards import per_reward_sums
from denser.trainers.config import TrainConfig
from denser.trainers.scoring import RolloutBatch, Scores

#: sums a tensor over the run's processes (the identity in a single process)
Reduce = Callable[[torch.Tensor], torch.Tensor]


class PhaseTimer:
    """Wall time per named phase of a step, summed over the phase's entries: ``with timer("update"): ...``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class UpdateResult:
    """What one optimiser update reports."""

    loss: float  # summed over micro-batches and processes
    grad_norm: float
    applied: bool  # False: a non-finite loss or gradient norm; the update was skipped
    metrics: list[dict[str, Metric]]  # per micro-batch, from the objective


def per_reward_means(scores: Scores, reduce: Reduce) -> dict[str, float]:
    """``reward/<name>``: the mean of each of a multi-reward task's rewards (same names on every process)."""
    parts = per_reward_sums(scores.scores)
    names = sorted(parts)
    if not names:
        return {}
    totals = reduce(torch.tensor([list(parts[k]) for k in names], dtype=torch.float64))
    return {f"reward/{k}": float(totals[i, 0] / totals[i, 1]) for i, k in enumerate(names)}

def sampling_metrics(batch: RolloutBatch, cfg: TrainConfig, world: int, reduce: Reduce) -> dict[str, float]:
    """Dynamic sampling's and overlong shaping's metrics, when they are on (over processes):
    ``generation_rounds`` (mean over processes), ``groups_dropped``, ``groups_filled`` (sums),
    ``overlong_penalty`` (mean over samples)."""
    out: dict[str, float] = {}
    if cfg.dynamic_sampling:
        t = reduce(torch.tensor([float(batch.rounds), float(batch.dropped), float(batch.filled)]))
        out.update(generation_rounds=float(t[0]) / world, groups_dropped=float(t[1]),
                   groups_filled=float(t[2]))
    if batch.scores.overlong is not None:
        t = reduce(torch.tensor([float(batch.scores.overlong.sum()),
                                                   float(batch.scores.overlong.numel())]))
        out["overlong_penalty"] = float(t[0] / t[1].clamp_min(1))
    return out

def metrics_row(step: int, batch: RolloutBatch, updates: list[UpdateResult], timer: PhaseTimer, *,
                cfg: TrainConfig, world: int, lr: float, reduce: Reduce) -> dict[str, Any]:
    """The step's row of metrics.jsonl: sums and counts over processes (the objective's metrics over
    every micro-batch of every update), then means; ``loss`` and ``grad_norm`` are means over the
    updates, ``updates`` the optimiser updates applied and ``skipped`` those skipped."""
    rollout, scores = batch.rollout, batch.scores
    merged = merge_metrics([part for u in updates for part in u.metrics])
    names = sorted(merged)
    sums = torch.tensor([[float(merged[k].sum), float(merged[k].count)] for k in names] or [[0.0, 0.0]])
    sums = reduce(sums)
    rewards = scores.rewards
    stat = reduce(torch.stack([
        rewards.sum(), (rewards ** 2).sum(), scores.success.sum(), rollout.lengths.float().sum(),
        rollout.truncated.float().sum(), torch.tensor(float(rollout.num_samples))])).tolist()
    n = max(stat[5], 1.0)
    mean_r = stat[0] / n
    per_reward = per_reward_means(scores, reduce)
    elapsed = timer.elapsed()
    return {
        "step": step + 1,
        "processes": world,
        "reward_mean": mean_r,
        "reward_std": math.sqrt(max(stat[1] / n - mean_r ** 2, 0.0)),
        **per_reward,
        **sampling_metrics(batch, cfg, world, reduce),
        "success_rate": stat[2] / n,
        "loss": sum(u.loss for u in updates) / len(updates),
        **{k: (float(sums[i, 0] / sums[i, 1]) if float(sums[i, 1]) > 0 else None) for i, k in enumerate(names)},
        "response_length": stat[3] / n,
        "truncated_frac": stat[4] / n,
        "grad_norm": sum(u.grad_norm for u in updates) / len(updates),
        "lr": lr,
        "updates": sum(u.applied for u in updates),
        "skipped": sum(not u.applied for u in updates),
        "time_generate_s": timer.seconds.get("generate", 0.0),
        "time_signals_s": timer.seconds.get("signals", 0.0),
        "time_update_s": timer.seconds.get("update", 0.0),
        # an engine with its own copy of the weights (vllm): the weight sync after the updates
        **({"time_sync_s": timer.seconds["sync"]} if "sync" in timer.seconds else {}),
        "step_time_s": elapsed,
        "tokens_per_s": stat[3] / elapsed,
    }
