"""What ``denser continual`` adds to the run flags of ``denser train``: :class:`ContinualConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from denser.tasks import list_tasks

SAMPLED_EVAL_STAGES = ("first-last", "all", "none")


@dataclass
class ContinualConfig:
    """What ``denser continual`` adds to the run flags of ``denser train``."""

    tasks: list[str] = field(default_factory=list)
    eval_tasks: list[str] = field(default_factory=list)
    steps_per_task: int = 4
    carry_optimizer: bool = False
    spectral_rank: int = 16  # 0 = no spectral drift
    initial_eval_from: str = ""  # a continual run whose stage-0 measurement (same model and eval) is reused
    teacher_reset: bool = False  # the teacher restarts from each stage's starting policy (else: EMA carried, frozen = stage 0)
    sampled_eval_stages: str = "first-last"  # stages measured with --eval-samples too: first-last | all | none

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
        if problems:
            raise ValueError("; ".join(problems))


def default_run_dir(objective: str) -> Path:
    return Path(f"runs/continual-{objective}")
