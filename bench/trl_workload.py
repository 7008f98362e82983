"""TRL's side of a comparison with `denser train` on the embedded model: the same weights (the embedded
model's safetensors directory), denser's tokenizer (its chat template and pad token fix-ups), the task's
train prompts (those of ``denser train``'s first steps in its order, or the first ``n_prompts``) as a
``datasets.Dataset`` and the task's own reward, in the signature TRL's trainers call
(``reward(completions, idx=...)``). Used by ``bench.trl_loop`` and ``bench.memory_fixes``, so both compare
against TRL on one workload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class TrlWorkload:
    tokenizer: Any
    dataset: Any  # datasets.Dataset with "prompt" (chat messages) and "idx" (the row it came from)
    reward: Callable[..., list[float]]

    @staticmethod
    def model():
        """A fresh fp32 copy of the embedded model, loaded the way TRL users load one."""
        import torch
        from transformers import AutoModelForCausalLM

        from denser.trainers.models import ensure_embedded_model

        return AutoModelForCausalLM.from_pretrained(str(ensure_embedded_model()), dtype=torch.float32)


def trl_workload(task_name: str = "addition", seed: int = 0, n_prompts: int = 64,
                 prompts_per_step: int | None = None) -> TrlWorkload:
    """With ``prompts_per_step``, the rows are the prompts `denser train --seed seed --prompts-per-step
    prompts_per_step` gives its first steps, in its order (give TRL ``shuffle_dataset=False``), so both sides
    train on the same prompts step by step; without, the task's first ``n_prompts`` train rows."""
    from datasets import Dataset

    from denser.tasks import get_task
    from denser.trainers.models import load_model
    from denser.trainers.prompts import PromptSchedule

    _, tokenizer = load_model("default", empty=True)  # denser's tokenizer; the weights stay unread (meta)
    task = get_task(task_name, seed=seed)
    if prompts_per_step:
        schedule = PromptSchedule(task, tokenizer, seed=seed, prompts_per_step=prompts_per_step, rank=0, world=1,
                                  max_new_tokens=0, context_limit=None)
        rows = [r for step in range(-(-n_prompts // prompts_per_step)) for r in schedule.rows_for_step(step)]
    else:
        rows = [task.train[i] for i in range(n_prompts)]
    dataset = Dataset.from_list([{"prompt": task.prompt(r), "idx": i} for i, r in enumerate(rows)])

    def reward(completions, idx, **kw):
        # TRL passes conversational completions as message lists, plain ones as strings
        return [task.score(c[-1]["content"] if isinstance(c, list) else c, rows[i]).score
                for c, i in zip(completions, idx)]

    return TrlWorkload(tokenizer, dataset, reward)
