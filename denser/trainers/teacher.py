"""The SDPO teacher: contexts built from a group's successes and feedback, and its weights.

Teacher context of sample i in a group (the SDPO recipe, as the public SDPO code builds it):
  - a demonstration: the first successful sibling's answer (reward >= success_threshold), never
    the sample's own when ``dont_reprompt_on_self_success``; ``<think>...</think>`` removed when
    ``remove_thinking``;
  - feedback: the task's feedback on sample i's own failed attempt, when ``include_feedback``
    (only when there is no demonstration, with ``feedback_only_without_solution``);
  - neither: no teacher for sample i (``teacher_mask`` False: it gets no distillation loss).
The context is the original prompt's messages with the demonstration and/or feedback appended to
the user turn, rendered with the chat template; the completion tokens stay the student's own.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

THINK_RE = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)
SOLUTION_TEMPLATE = "\n\nHere is a correct solution to this problem:\n{solution}"
FEEDBACK_TEMPLATE = "\n\nYour previous attempt was wrong. Feedback on it:\n{feedback}"
CLOSING = "\n\nCorrectly solve the original question."


@dataclass
class TeacherSettings:
    success_threshold: float = 0.5
    dont_reprompt_on_self_success: bool = True
    remove_thinking: bool = True
    include_feedback: bool = True
    feedback_only_without_solution: bool = True

    @classmethod
    def from_objective(cls, objective: Any) -> "TeacherSettings":
        source = getattr(objective, "sdpo_part", None)
        source = source() if callable(source) else objective
        kw = {k: getattr(source, k) for k in cls.__dataclass_fields__ if hasattr(source, k)}
        return cls(**kw)


def remove_thinking(text: str) -> str:
    return THINK_RE.sub("", text).strip()


def teacher_messages(
    prompt_messages: Sequence[dict[str, str]],
    group_texts: Sequence[str],
    group_rewards: Sequence[float],
    group_feedback: Sequence[str | None],
    index: int,
    settings: TeacherSettings,
) -> list[dict[str, str]] | None:
    """Chat messages of the teacher context of sample ``index`` of a group, or None (no teacher)."""
    demo = None
    for j, (text, reward) in enumerate(zip(group_texts, group_rewards)):
        if reward < settings.success_threshold:
            continue
        if j == index and settings.dont_reprompt_on_self_success:
            continue
        demo = remove_thinking(text) if settings.remove_thinking else text
        break
    feedback = None
    own_success = group_rewards[index] >= settings.success_threshold
    if settings.include_feedback and not own_success and group_feedback[index]:
        if demo is None or not settings.feedback_only_without_solution:
            feedback = group_feedback[index]
    if demo is None and feedback is None:
        return None
    extra = ""
    if demo is not None:
        extra += SOLUTION_TEMPLATE.format(solution=demo)
    if feedback is not None:
        extra += FEEDBACK_TEMPLATE.format(feedback=feedback)
    extra += CLOSING
    messages = [dict(m) for m in prompt_messages]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = messages[last_user]["content"] + extra
    return messages


class TeacherWeights:
    """Which weights score the teacher context: ``live`` (the policy itself), ``ema`` (an EMA copy
    updated after every optimiser step at ``rate``) or ``frozen`` (the initial weights)."""

    def __init__(self, policy: torch.nn.Module, mode: str, rate: float, shared_frozen: torch.nn.Module | None = None):
        if mode not in ("live", "ema", "frozen"):
            raise ValueError(f"teacher={mode!r} must be 'live', 'ema' or 'frozen'")
        self.mode, self.rate = mode, float(rate)
        if mode == "live":
            self.model = policy
        elif mode == "frozen" and shared_frozen is not None:
            self.model = shared_frozen
        else:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        if self.mode != "ema":
            return
        for t, p in zip(self.model.parameters(), policy.parameters()):
            t.lerp_(p.detach().to(t.dtype), self.rate)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()} if self.mode == "ema" else None

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.mode == "ema" and state is not None:
            self.model.load_state_dict(state)
