"""What ``denser continual`` adds to the run flags of ``denser train``: :class:`ContinualConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from denser.objectives.fields import help_field as _f
from denser.tasks import list_tasks

SAMPLED_EVAL_STAGES = ("first-last", "all", "none")
LORA_STAGES = ("merge", "keep")


@dataclass
class ContinualConfig:
    """What ``denser continual`` adds to the run flags of ``denser train``: each field is a flag
    (``--tasks``, ``--steps-per-task``, ...; lists are comma-separated on the command line)."""

    tasks: list[str] = _f([], "training tasks in order, comma-separated (e.g. addition,compare,reverse)",
                          required=True, metavar="TASK[,TASK...]")
    eval_tasks: list[str] = _f([], "held-out tasks, never trained on, evaluated after every stage (comma-separated)",
                               metavar="TASK[,TASK...]")
    steps_per_task: int = _f(4, "training steps (rollout batches) on each task")
    carry_optimizer: bool = _f(False, "keep the AdamW state from stage to stage (default: reset it, as a new "
                               "fine-tuning job would; --reset-optimizer says so explicitly)")
    spectral_rank: int = _f(16, "r of the top-r singular subspace drift of each weight matrix (0 = off)")
    initial_eval_from: str = _f("", "reuse stage 0 (the initial model's measurement) of another continual run with "
                                "the same model, tasks and eval settings, instead of measuring it again",
                                metavar="RUN")
    teacher_reset: bool = _f(False, "the teacher restarts from each stage's starting policy (as SDPO-CL runs "
                             "restarted per stage); default: the EMA teacher keeps averaging across stages and a "
                             "frozen or trust-region teacher stays the initial model")
    teacher_probe: bool = _f(False, "at the start of every stage, measure the stage's teacher on the stage's task: the "
                             "teacher-minus-student log-prob of the correct reply 'Answer: <answer>' (first token and "
                             "whole reply) with the run's teacher and teacher context, and the teacher's greedy accuracy "
                             "where it can run as a policy (ema, frozen, live); recorded as each stage's teacher_probe")
    sampled_eval_stages: str = _f("first-last", "with --eval-samples N: the stages also measured by mean@N of "
                                  "sampled completions (first-last: the initial model and the final stage, to "
                                  "budget CPU; all; none)", metavar="first-last|all|none")
    lora_stages: str = _f("", "with --lora-r, required: merge (each stage's adapter becomes part of the weights "
                          "and the next stage trains a fresh adapter from there, as SDPO-CL restarts from the "
                          "previous stage's weights) or keep (one adapter trained through every stage)",
                          metavar="merge|keep")

    def __post_init__(self) -> None:
        self.tasks = [t.strip() for t in self.tasks if t.strip()]
        self.eval_tasks = [t.strip() for t in self.eval_tasks if t.strip()]
        problems = []
        if not self.tasks:
            problems.append("--tasks needs at least one task (comma-separated, e.g. addition,compare,reverse)")
        for group in (self.tasks, self.eval_tasks):
            dup = sorted({t for t in group if group.count(t) > 1})
            if dup:
                problems.append(f"task {dup[0]!r} is listed twice; each task appears once in a sequence")
        both = sorted(set(self.tasks) & set(self.eval_tasks))
        if both:
            problems.append(f"held-out task {both[0]!r} is also a training task; --eval-tasks are never trained on")
        known = set(list_tasks())
        for t in self.tasks + self.eval_tasks:
            if not t.startswith(("file:", "hf:")) and t.partition("?")[0] not in known:
                problems.append(f"unknown task {t!r}; known tasks: {', '.join(sorted(known))}, or file:PATH.jsonl, "
                                "hf:NAME[:CONFIG]")
        if self.steps_per_task < 1:
            problems.append(f"--steps-per-task must be >= 1, got {self.steps_per_task}")
        if self.spectral_rank < 0:
            problems.append(f"--spectral-rank must be >= 0, got {self.spectral_rank}")
        if self.sampled_eval_stages not in SAMPLED_EVAL_STAGES:
            problems.append(f"--sampled-eval-stages must be one of {', '.join(SAMPLED_EVAL_STAGES)}, "
                            f"got {self.sampled_eval_stages!r}")
        if self.lora_stages not in ("", *LORA_STAGES):
            problems.append(f"--lora-stages must be merge or keep, got {self.lora_stages!r}")
        if problems:
            raise ValueError("; ".join(problems))


def default_run_dir(objective: str) -> Path:
    return Path(f"runs/continual-{objective}")
