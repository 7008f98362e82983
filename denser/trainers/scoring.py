"""Scoring a step's rollouts: the task's verdicts (``Scores``, :func:`score_rollout`) and DAPO's two
loop options, overlong reward shaping and dynamic sampling.

    scores = score_rollout(task, rollout, rows, cfg)                         rewards [S], successes, feedback
    rewards += overlong_penalty(lengths, max_new_tokens, buffer, factor)    (in score_rollout)
    batch = dynamic_batch(generate_round, prompts_per_step, max_rounds)     (Trainer._rollout_batch)

Overlong shaping (DAPO's "soft overlong punishment", verl's ``overlong_buffer``): a completion of
``L`` tokens out of a budget of ``L_max`` gets ``-factor * clip((L - (L_max - buffer)) / buffer, 0, 1)``
added to its reward: 0 up to ``L_max - buffer`` tokens, then linearly down to ``-factor`` at the
budget (a truncated completion, which used it all, gets the full penalty).

Dynamic sampling (DAPO): a group whose rewards are all equal has advantage 0 for every sample and
gives GRPO no gradient; such groups are dropped and further prompts generated, round after round,
until the step holds ``prompts_per_step`` groups with varied rewards (extra ones are discarded, as
verl does) or ``max_rounds`` rounds are spent. Then the batch is filled up with dropped groups in the
order they were generated, so every process trains on a batch of the same size (DDP needs the same
number of micro-batches everywhere), and the fill-ins are counted (``groups_filled``). The rewards
compared are those the advantages are computed from (after overlong shaping).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from denser.engines.base import Rollout
from denser.tasks import Score, Task
from denser.trainers.config import TrainConfig


@dataclass
class Scores:
    """The task's verdict on every sample of a rollout."""

    scores: list[Score]  # score and feedback text per sample
    rewards: Tensor  # [S] fp32: the scores, plus the overlong penalty when that shaping is on
    success: Tensor  # [S] fp32, 1.0 where task.is_success
    overlong: Tensor | None = None  # [S] fp32 <= 0: the overlong penalty in ``rewards`` (shaping on)

    def select(self, samples: Sequence[int]) -> Scores:
        """The scores of ``samples``, in that order."""
        idx = torch.tensor(list(samples), dtype=torch.long)
        return Scores([self.scores[i] for i in idx.tolist()], self.rewards[idx], self.success[idx],
                      None if self.overlong is None else self.overlong[idx])

    @staticmethod
    def concat(parts: Sequence[Scores]) -> Scores:
        """One ``Scores`` of ``parts``, one after the other."""
        overlong = [p.overlong for p in parts]
        return Scores([s for p in parts for s in p.scores], torch.cat([p.rewards for p in parts]),
                      torch.cat([p.success for p in parts]),
                      None if any(o is None for o in overlong) else torch.cat(overlong))


def overlong_penalty(lengths: Tensor, max_len: int, buffer: int, factor: float) -> Tensor:
    """``[S]`` fp32, ``<= 0``: DAPO's soft overlong penalty of completions of ``lengths`` tokens, over the last
    ``buffer`` tokens of a budget of ``max_len`` (a buffer longer than the budget covers all of it)."""
    buffer = min(int(buffer), int(max_len))
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    over = (lengths.float() - (max_len - buffer)) / buffer
    return -float(factor) * over.clamp(min=0.0, max=1.0)


def score_rollout(task: Task, rollout: Rollout, rows: list[dict], cfg: TrainConfig) -> Scores:
    """Rewards (and feedback) of every sample; sample ``s`` answers ``rows[s // G]``. With
    ``--overlong-buffer`` the rewards carry DAPO's overlong penalty (``scores.overlong``)."""
    g = rollout.num_generations
    sample_rows = [rows[s // g] for s in range(rollout.num_samples)]
    scores = task.score_batch(rollout.texts, sample_rows)
    rewards = torch.tensor([s.score for s in scores], dtype=torch.float32)
    success = torch.tensor([float(task.is_success(s)) for s in scores])
    overlong = None
    if cfg.overlong_buffer > 0:
        overlong = overlong_penalty(rollout.lengths, cfg.max_new_tokens, cfg.overlong_buffer, cfg.overlong_penalty)
        rewards = rewards + overlong
    return Scores(scores, rewards, success, overlong)


def varied_groups(rewards: Tensor, num_generations: int) -> Tensor:
    """``[P]`` bool: the group's rewards are not all equal (so its group advantages are not all 0)."""
    r = rewards.reshape(-1, num_generations)
    return r.amax(dim=1) != r.amin(dim=1)


@dataclass
class RolloutBatch:
    """The samples a step trains on: ``rollout``, the dataset ``rows`` of its prompts, their ``scores``;
    with dynamic sampling, the generation ``rounds`` it took, the groups generated but ``dropped``, and the
    dropped groups ``filled`` back in because the round cap was reached."""

    rollout: Rollout
    rows: list[dict]
    scores: Scores
    rounds: int = 1
    dropped: int = 0
    filled: int = 0


def dynamic_batch(generate_round: Callable[[int], tuple[Rollout, list[dict], Scores]], prompts: int,
                  max_rounds: int) -> RolloutBatch:
    """DAPO's dynamic sampling. ``generate_round(j)`` generates and scores round ``j`` (``prompts`` prompts);
    the result holds ``prompts`` groups: the first ones with varied rewards, in generation order, filled up
    with the first uniform ones when ``max_rounds`` rounds did not give enough."""
    varied: list[tuple[int, int]] = []  # (round, group) in generation order
    uniform: list[tuple[int, int]] = []
    rounds: list[tuple[Rollout, list[dict], Scores]] = []
    for j in range(max_rounds):
        rollout, rows, scores = generate_round(j)
        rounds.append((rollout, rows, scores))
        flags = varied_groups(scores.rewards, rollout.num_generations).tolist()
        for p, ok in enumerate(flags):
            (varied if ok else uniform).append((j, p))
        if len(varied) >= prompts:
            break
    filled = max(0, prompts - len(varied))
    chosen = sorted(varied[:prompts] + uniform[:filled])
    g = rounds[0][0].num_generations
    parts = [(rounds[j][0].select_groups([p]), rounds[j][1][p], rounds[j][2].select(range(p * g, (p + 1) * g)))
             for j, p in chosen]
    return RolloutBatch(rollout=Rollout.concat([r for r, _, _ in parts]), rows=[row for _, row, _ in parts],
                        scores=Scores.concat([s for _, _, s in parts]), rounds=len(rounds),
                        dropped=len(rounds) * prompts - len(chosen), filled=filled)
