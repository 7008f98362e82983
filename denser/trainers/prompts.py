"""Which prompts each step trains on, and the check that every prompt fits the model's context.

The order is a function of (seed, step, process): the ``k``-th prompt drawn over the whole run is
row ``perm_e[k mod n]`` of the training split, ``perm_e`` a fresh permutation for each epoch ``e``
seeded by ``seed``; step ``t`` on process ``r`` of ``W`` takes draws
``[(t W + r) P, (t W + r + 1) P)``. So a resumed run sees exactly the prompts the uninterrupted run
would have, and processes never share a prompt within an epoch.

A prompt's global index in its step (:meth:`PromptSchedule.request_indices`) is its place among
every process's prompts of the step, ``r P + i``: with the same global batch ``W P`` the same draw
has the same index whatever ``W``. The rollout engine seeds the prompt's request with it
(docs/design.md, Contract 4), so the samples do not depend on the number of processes.

Dynamic sampling's further generation rounds (``round >= 1`` of at most ``rounds`` per step) draw
from a second stream, the same construction with other permutations: round ``j`` of step ``t`` on
process ``r`` takes its draws ``[((t (R - 1) + j - 1) W + r) P, ... + P)``. So the first round of
every step sees the prompts a run without dynamic sampling sees, and a resumed run the same refills.
"""

from __future__ import annotations

from typing import Any

import torch

from denser.tasks import Task
from denser.trainers.models import render_prompt

# Prompts checked against the model's context before any compute (the rest are checked as they are used).
MAX_PREFLIGHT_PROMPTS = 20_000


class PromptSchedule:
    """The prompts of a run. ``context_limit`` is the model's context (None: unchecked)."""

    def __init__(self, task: Task, tokenizer: Any, *, seed: int, prompts_per_step: int, rank: int, world: int,
                 max_new_tokens: int, context_limit: int | None, rounds: int = 1):
        self.task, self.tokenizer = task, tokenizer
        self.seed, self.per_step, self.rank, self.world = seed, prompts_per_step, rank, world
        self.max_new_tokens, self.context_limit = max_new_tokens, context_limit
        self.rounds = rounds
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def rows_for_step(self, step: int, round: int = 0) -> list[dict]:
        """Training rows of ``step`` on this process: its first generation round, or dynamic sampling's
        further round ``round`` (``1 <= round < rounds``)."""
        if round == 0:
            start, stream = (step * self.world + self.rank) * self.per_step, 0
        elif 0 < round < self.rounds:
            start, stream = ((step * (self.rounds - 1) + round - 1) * self.world + self.rank) * self.per_step, 1
        else:
            raise ValueError(f"generation round {round} of a step: a run has rounds 0..{self.rounds - 1}")
        return [self.task.train[self._perm_index(k, stream)] for k in range(start, start + self.per_step)]

    def request_indices(self) -> list[int]:
        """The global index in its step (or generation round) of each of this process's prompts, in
        the order :meth:`rows_for_step` gives them: their place among every process's prompts."""
        return [self.rank * self.per_step + i for i in range(self.per_step)]

    def prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        """Prompt token ids of ``rows``, each checked against the context."""
        ids = [render_prompt(self.tokenizer, self.task.prompt(r)) for r in rows]
        for p in ids:  # prompts beyond the preflight's sample are checked as they come
            self._check_fits(len(p), "a prompt of this batch")
        return ids

    def check_lengths(self, steps: int, eval_size: int) -> None:
        """Before any compute: every prompt a run of ``steps`` will use (up to MAX_PREFLIGHT_PROMPTS)
        and the first ``eval_size`` eval prompts fit the context together with the generation budget."""
        if not self.context_limit:
            return
        data = self.task.train
        needed = steps * self.world * self.per_step
        if needed >= len(data):
            train_idx = range(min(len(data), MAX_PREFLIGHT_PROMPTS))
        else:
            train_idx = sorted({int(self._perm_index(k)) for k in range(min(needed, MAX_PREFLIGHT_PROMPTS))})
        splits = [("train", data, train_idx), ("eval", self.task.eval, range(min(eval_size, len(self.task.eval))))]
        for split, rows, idx in splits:
            for i in idx:
                self._check_fits(len(render_prompt(self.tokenizer, self.task.prompt(rows[i]))), f"{split} row {i}")

    def _check_fits(self, prompt_tokens: int, where: str) -> None:
        """A prompt of ``prompt_tokens`` plus --max-new-tokens must fit the model's context."""
        limit = self.context_limit
        if limit and prompt_tokens + self.max_new_tokens > limit:
            raise ValueError(f"task {self.task.name!r}: the prompt of {where} has {prompt_tokens} tokens; with "
                             f"--max-new-tokens {self.max_new_tokens} it exceeds the model's context of {limit} "
                             "tokens; shorten or drop that prompt, or lower --max-new-tokens")

    def _perm_index(self, k: int, stream: int = 0) -> int:
        """Dataset index of the ``k``-th prompt drawn (over all steps and processes) of ``stream``
        (0: first rounds, 1: dynamic sampling's refills)."""
        n = len(self.task.train)
        epoch, pos = divmod(k, n)
        if (stream, epoch) not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + stream * 7_919_000_001)
            self._perms[stream, epoch] = torch.randperm(n, generator=g)
        return int(self._perms[stream, epoch][pos])
