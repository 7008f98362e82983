"""What an objective asks of its teacher: how teacher contexts are built and which weights score them.

An objective that declares ``Signal.TEACHER`` or ``Signal.TEACHER_LOGP`` returns a
:class:`TeacherSpec` from ``Objective.teacher_spec()``; the loop follows it and knows nothing else about
the objective. Teacher context of sample i in a group (the SDPO recipe, as the public SDPO code
builds it; :func:`teacher_messages`):

  - a demonstration: the first successful sibling's answer (reward >= ``success_threshold``), never
    the sample's own when ``dont_reprompt_on_self_success``; ``<think>...</think>`` removed when
    ``remove_thinking``;
  - feedback: the task's feedback on sample i's own failed attempt, when ``include_feedback``
    (only when there is no demonstration, with ``feedback_only_without_solution``);
  - neither: no teacher for sample i (``teacher_mask`` False: it gets no distillation loss).

The context is the original prompt's messages with the demonstration and/or feedback appended to
the user turn (``solution_template``, ``feedback_template``, ``closing``); the loop renders it with
the chat template and keeps the completion tokens the student's own. The weights that score it
are ``mode``: ``live`` (the policy itself), ``ema`` (an exponential moving average of the policy,
``teacher <- (1 - update_rate) * teacher + update_rate * policy`` once per rollout batch) or
``frozen`` (the initial policy).

:class:`TeacherOptions` is the same set of choices as objective fields (CLI flags), for objectives
that distil (``sdpo``, the hybrids): ``TeacherSpec.from_options(objective)`` turns them into the spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

from denser.objectives.common import require

TeacherMode = Literal["live", "ema", "frozen"]
TEACHER_MODES: tuple[str, ...] = TeacherMode.__args__

THINK_RE = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)
SOLUTION_TEMPLATE = "\n\nHere is a correct solution to this problem:\n{solution}"
FEEDBACK_TEMPLATE = "\n\nYour previous attempt was wrong. Feedback on it:\n{feedback}"
CLOSING = "\n\nCorrectly solve the original question."


@dataclass(frozen=True)
class TeacherSpec:
    """How the loop builds teacher contexts and which weights score them (defaults: SDPO's
    ``actor.yaml``: EMA teacher at rate 0.05, success threshold 0.5, no reprompting on
    self-success, thinking removed, feedback only without a solution)."""

    mode: TeacherMode = "ema"
    update_rate: float = 0.05
    success_threshold: float = 0.5
    dont_reprompt_on_self_success: bool = True
    remove_thinking: bool = True
    include_feedback: bool = True
    feedback_only_without_solution: bool = True
    solution_template: str = SOLUTION_TEMPLATE  # appended to the user turn; {solution} is the demonstration
    feedback_template: str = FEEDBACK_TEMPLATE  # {feedback} is the task's feedback on the sample's attempt
    closing: str = CLOSING  # appended after the demonstration and/or feedback

    def __post_init__(self) -> None:
        if self.mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode {self.mode!r} must be one of {', '.join(TEACHER_MODES)}")
        if not 0.0 <= self.update_rate <= 1.0:
            raise ValueError(f"teacher update_rate={self.update_rate} must be in [0, 1]")

    @classmethod
    def from_options(cls, options: "TeacherOptions") -> "TeacherSpec":
        """The spec of an objective's :class:`TeacherOptions` fields (templates: the defaults)."""
        return cls(
            mode=options.teacher,
            update_rate=options.teacher_update_rate,
            success_threshold=options.success_threshold,
            dont_reprompt_on_self_success=options.dont_reprompt_on_self_success,
            remove_thinking=options.remove_thinking,
            include_feedback=options.include_feedback,
            feedback_only_without_solution=options.feedback_only_without_solution,
        )


_DEFAULT = TeacherSpec()


def remove_thinking(text: str) -> str:
    return THINK_RE.sub("", text).strip()


def teacher_messages(
    prompt_messages: Sequence[dict[str, str]],
    group_texts: Sequence[str],
    group_rewards: Sequence[float],
    group_feedback: Sequence[str | None],
    index: int,
    spec: TeacherSpec = _DEFAULT,
) -> list[dict[str, str]] | None:
    """Chat messages of the teacher context of sample ``index`` of a group, or None (no teacher).

    Pure text: ``group_*`` are the group's completions, rewards and feedback in sample order;
    ``prompt_messages`` is left unchanged."""
    demo = None
    for j, (text, reward) in enumerate(zip(group_texts, group_rewards)):
        if reward < spec.success_threshold:
            continue
        if j == index and spec.dont_reprompt_on_self_success:
            continue
        demo = remove_thinking(text) if spec.remove_thinking else text
        break
    feedback = None
    own_success = group_rewards[index] >= spec.success_threshold
    if spec.include_feedback and not own_success and group_feedback[index]:
        if demo is None or not spec.feedback_only_without_solution:
            feedback = group_feedback[index]
    if demo is None and feedback is None:
        return None
    extra = ""
    if demo is not None:
        extra += spec.solution_template.format(solution=demo)
    if feedback is not None:
        extra += spec.feedback_template.format(feedback=feedback)
    extra += spec.closing
    messages = [dict(m) for m in prompt_messages]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    messages[last_user]["content"] = messages[last_user]["content"] + extra
    return messages


@dataclass
class TeacherOptions:
    """The teacher choices of a distilling objective as its fields (every field a CLI flag).

    ``teacher`` is the flag ``--teacher {live,ema,frozen}`` (``TeacherSpec.mode``); the objective's
    ``teacher_spec()`` returns ``TeacherSpec.from_options(self)``."""

    teacher: TeacherMode = field(
        default=_DEFAULT.mode,
        metadata={
            "help": "teacher weights: 'live' = the current policy, 'ema' = exponential moving average of the "
            "policy, 'frozen' = the initial policy"
        },
    )
    teacher_update_rate: float = field(
        default=_DEFAULT.update_rate,
        metadata={"help": "EMA rate: teacher <- (1 - rate) * teacher + rate * policy after each step"},
    )
    success_threshold: float = field(
        default=_DEFAULT.success_threshold,
        metadata={"help": "a sibling whose reward is >= this is a successful demonstration for the teacher"},
    )
    dont_reprompt_on_self_success: bool = field(
        default=_DEFAULT.dont_reprompt_on_self_success,
        metadata={"help": "a sample that succeeded itself gets no teacher built from a sibling's success"},
    )
    remove_thinking: bool = field(
        default=_DEFAULT.remove_thinking,
        metadata={"help": "strip <think>...</think> from a demonstration before putting it in the teacher context"},
    )
    include_feedback: bool = field(
        default=_DEFAULT.include_feedback,
        metadata={"help": "put the environment's feedback on a failed attempt in the teacher context"},
    )
    feedback_only_without_solution: bool = field(
        default=_DEFAULT.feedback_only_without_solution,
        metadata={"help": "use the feedback only when no successful demonstration is available"},
    )

    def check_teacher_options(self, name: str) -> None:
        """Raise ``ValueError("objective 'name': ...")`` for a bad teacher field."""
        require(self.teacher in TEACHER_MODES, name, f"teacher={self.teacher!r} must be 'live', 'ema' or 'frozen'")
        require(0.0 <= self.teacher_update_rate <= 1.0, name,
                f"teacher_update_rate={self.teacher_update_rate} must be in [0, 1]")
