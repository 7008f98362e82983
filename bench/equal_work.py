"""A task for ``bench.trl_loop --equal-work``: the ``addition`` task's prompts (same seed, same rows), every
completion scored 1.0. With completions held at the full budget (``--min-new-tokens``, TRL's
``generation_kwargs``), every step of either trainer then computes the same thing: 8 completions of 32
tokens, and under SDPO every sample distilled (each one's demonstration a sibling's completion), so
seconds per step compare without depending on what each side happened to sample. Loaded by
``denser train --import bench/equal_work.py --task addition-all-pass``."""

from __future__ import annotations

from typing import Any

from denser.tasks import register_task
from denser.tasks.base import Score
from denser.tasks.builtin import Addition

TASK = "addition-all-pass"


@register_task(TASK)
class AdditionAllPass(Addition):
    """``addition``'s prompts with every completion a success (a benchmark's workload, not a task to learn)."""

    description = "addition's prompts, every completion scored 1.0 (bench.trl_loop --equal-work)"

    def build_splits(self):
        # addition's own rows (its generator is seeded by the task's name)
        return Addition(seed=self.seed, num_train=self.num_train, num_eval=self.num_eval,
                        system_prompt=self.system_prompt, few_shot=self.few_shot).build_splits()

    def check(self, completion: str, row: dict[str, Any]) -> Score:
        return Score(1.0)
