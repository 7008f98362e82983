"""Verifiable tasks: locally generated datasets, prompts, and rewards with feedback.

    from denser.tasks import get_task, list_tasks, DEFAULT_TASK
    task = get_task(DEFAULT_TASK, seed=0)
    task.train, task.eval                      # datasets.Dataset, disjoint questions
    task.prompt(row) -> chat messages          # render with denser.trainers.models.render_prompt
    task.score(completion_text, row) -> Score(score, feedback, answer, rewards)

The contract is :mod:`denser.tasks.base`; the registry :mod:`denser.tasks.registry`. Built-in
tasks are in :mod:`denser.tasks.builtin`; ``file:PATH`` and ``hf:NAME`` tasks (through
``datasets``) in :mod:`denser.tasks.file_task`; reward functions (``@register_reward``, weighted
sums, ``math`` on math-verify) in :mod:`denser.tasks.rewards`; the answer-extraction rule in
:mod:`denser.tasks.answers`. A guide with examples: ``docs/tasks.md``.
"""

from denser.tasks import builtin as _builtin  # noqa: F401  (registers the built-in tasks)
from denser.tasks import code as _code  # noqa: F401  (registers the code task)
from denser.tasks.answers import ANSWER_INSTRUCTION, extract_answer, parse_number
from denser.tasks.base import Score, Task
from denser.tasks.file_task import FileTask, FileTaskError, HFTask
from denser.tasks.registry import get_task, list_tasks, register_task, task_descriptions, unregister_task
from denser.tasks.rewards import (
    Reward,
    WeightedRewards,
    get_reward,
    list_rewards,
    per_reward_sums,
    register_reward,
    reward_descriptions,
    unregister_reward,
)

#: the task ``denser train`` uses when none is given. Chosen by measuring the embedded
#: SmolLM2-135M-Instruct at temperature 1: ~50% of samples succeed and almost every group of 8 has
#: a success (see :class:`denser.tasks.builtin.Addition`). Suggested budget: 32 new tokens.
DEFAULT_TASK = "addition"

__all__ = [
    "ANSWER_INSTRUCTION",
    "DEFAULT_TASK",
    "FileTask",
    "FileTaskError",
    "HFTask",
    "Reward",
    "Score",
    "Task",
    "WeightedRewards",
    "extract_answer",
    "get_reward",
    "get_task",
    "list_rewards",
    "list_tasks",
    "parse_number",
    "per_reward_sums",
    "register_reward",
    "register_task",
    "reward_descriptions",
    "task_descriptions",
    "unregister_reward",
    "unregister_task",
]
