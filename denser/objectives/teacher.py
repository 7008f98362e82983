"""What an objective asks of its teacher: how teacher contexts are built and which weights score them.

An objective that declares ``Signal.TEACHER`` or ``Signal.TEACHER_LOGP`` returns a
:class:`TeacherSpec` from ``Objective.teacher_spec()``; the loop follows it and knows nothing else about
the objective. Teacher context of sample i in a group, as the public SDPO code builds it
(``ray_trainer._maybe_build_self_distillation_batch``; :func:`teacher_messages`):

  - a demonstration: the first successful sibling's reply (reward >= ``success_threshold``); with
    ``dont_reprompt_on_self_success`` the sample's own reply is never its demonstration (another
    successful sibling's still is); thinking removed when ``remove_thinking``;
  - feedback: the task's feedback on sample i's own attempt, when ``include_feedback`` and the task
    gave any (denser's tasks give it on failed attempts); with ``feedback_only_without_solution``
    only when there is no demonstration;
  - neither: no teacher for sample i (``teacher_mask`` False: it gets no distillation loss).

The context is the prompt's messages with the last user message replaced by
``reprompt_template.format(prompt=<its text>, solution=<solution section>, feedback=<feedback section>)``,
the sections being ``solution_template.format(successful_previous_attempt=...)`` and
``feedback_template.format(feedback_raw=...)`` (or empty); every other message is kept as it is.
The defaults are SDPO's templates word for word (``actor.yaml``, ``self_distillation``). The loop
renders the messages with the chat template, cuts the result on the right at
``TrainConfig.teacher_max_context_tokens`` (SDPO: ``max_reprompt_len`` 10240, ``reprompt_truncation:
right``), and keeps the completion tokens the student's own.

The weights that score it are ``mode``: ``live`` (the policy itself), ``ema`` (an exponential
moving average of the policy, ``teacher <- (1 - update_rate) * teacher + update_rate * policy``
once per rollout batch), ``frozen`` (the initial policy) or ``trust-region`` (SDPO's
``teacher_regularization: trust-region``: logits ``lerp(reference, policy, update_rate)``, both
evaluated on the teacher context, the reference being the frozen initial policy). ``path`` (SDPO-CL's
``teacher_path``) starts the teacher (``ema``, ``frozen``, or the reference of ``trust-region``)
from another model directory instead of the initial policy, and ``init_alpha`` (SDPO-CL's
``teacher_init_alpha``) starts it at ``init_alpha * teacher + (1 - init_alpha) * policy``, parameter
by parameter.

:class:`TeacherOptions` is the same set of choices as objective fields (CLI flags), for objectives
that distil (``sdpo``, the hybrids): ``TeacherSpec.from_options(objective)`` turns them into the spec.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Literal, Sequence

from denser.objectives.common import require

TeacherMode = Literal["live", "ema", "frozen", "trust-region"]
TEACHER_MODES: tuple[str, ...] = TeacherMode.__args__
# modes whose weights are a model of their own (not the policy): --teacher-path / --teacher-init-alpha apply
SEPARATE_TEACHER_MODES = ("ema", "frozen", "trust-region")

THINK_RE = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)
UNOPENED_THINK_RE = re.compile(r"^.*?</think>\s*", flags=re.DOTALL)  # "reasoning</think>answer" (SDPO-CL)

# SDPO's templates, word for word (lasgroup/SDPO verl/trainer/config/actor/actor.yaml, self_distillation)
REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}"
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}"
# the placeholders each template may use
TEMPLATE_FIELDS = {
    "reprompt_template": ("prompt", "solution", "feedback"),
    "solution_template": ("successful_previous_attempt",),
    "feedback_template": ("feedback_raw",),
}


def template_problem(name: str, template: str) -> str | None:
    """What is wrong with ``template`` (a field named in :data:`TEMPLATE_FIELDS`), or None."""
    allowed = TEMPLATE_FIELDS[name]
    try:
        used = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return f"{name}={template!r} is not a format string ({e}); write a literal brace as '{{{{' or '}}}}'"
    unknown = sorted({f for f in used if f not in allowed})
    if unknown:
        return (f"{name} uses the placeholder(s) {', '.join('{' + f + '}' for f in unknown)}; it may use "
                f"{', '.join('{' + f + '}' for f in allowed)} (a literal brace is '{{{{' or '}}}}')")
    return None


@dataclass(frozen=True)
class TeacherSpec:
    """How the loop builds teacher contexts and which weights score them (defaults: SDPO's
    ``actor.yaml``: EMA teacher at rate 0.05, success threshold 0.5, no reprompting on
    self-success, thinking removed, feedback only without a solution, SDPO's templates; the teacher
    starts from the initial policy)."""

    mode: TeacherMode = "ema"
    update_rate: float = 0.05  # EMA rate, or the trust-region mixing rate
    success_threshold: float = 0.5
    dont_reprompt_on_self_success: bool = True
    remove_thinking: bool = True
    include_feedback: bool = True
    feedback_only_without_solution: bool = True
    reprompt_template: str = REPROMPT_TEMPLATE  # {prompt}: the last user message's text; {solution}, {feedback}: the sections
    solution_template: str = SOLUTION_TEMPLATE  # {successful_previous_attempt}: the demonstration
    feedback_template: str = FEEDBACK_TEMPLATE  # {feedback_raw}: the task's feedback on the sample's attempt
    path: str | None = None  # a model directory (or denser checkpoint / run directory) the teacher starts from
    init_alpha: float = 1.0  # the teacher starts at init_alpha * teacher + (1 - init_alpha) * policy

    def __post_init__(self) -> None:
        if self.mode not in TEACHER_MODES:
            raise ValueError(f"teacher mode {self.mode!r} must be one of {', '.join(TEACHER_MODES)}")
        if not 0.0 <= self.update_rate <= 1.0:
            raise ValueError(f"teacher update_rate={self.update_rate} must be in [0, 1]")
        if not 0.0 <= self.init_alpha <= 1.0:
            raise ValueError(f"teacher init_alpha={self.init_alpha} must be in [0, 1]")
        if self.mode == "live" and (self.path or self.init_alpha != 1.0):
            raise ValueError("a 'live' teacher is the policy itself: a teacher path or init_alpha < 1 needs "
                             f"mode {', '.join(map(repr, SEPARATE_TEACHER_MODES))}")
        for name in TEMPLATE_FIELDS:
            problem = template_problem(name, getattr(self, name))
            if problem:
                raise ValueError(f"teacher {problem}")

    @classmethod
    def from_options(cls, options: "TeacherOptions") -> "TeacherSpec":
        """The spec of an objective's :class:`TeacherOptions` fields."""
        return cls(
            mode=options.teacher,
            update_rate=options.teacher_update_rate,
            success_threshold=options.success_threshold,
            dont_reprompt_on_self_success=options.dont_reprompt_on_self_success,
            remove_thinking=options.remove_thinking,
            include_feedback=options.include_feedback,
            feedback_only_without_solution=options.feedback_only_without_solution,
            reprompt_template=options.reprompt_template,
            solution_template=options.solution_template,
            feedback_template=options.feedback_template,
            path=options.teacher_path or None,
            init_alpha=options.teacher_init_alpha,
        )


_DEFAULT = TeacherSpec()


def remove_thinking(text: str) -> str:
    """``text`` without ``<think>...</think>`` blocks (as SDPO) and without an unopened
    ``...</think>`` prefix (as SDPO-CL: a reply whose opening tag was in the prompt)."""
    return UNOPENED_THINK_RE.sub("", THINK_RE.sub("", text))


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
    raw = group_feedback[index]
    has_feedback = spec.include_feedback and isinstance(raw, str) and bool(raw.strip())
    use_feedback = has_feedback and (demo is None or not spec.feedback_only_without_solution)
    if demo is None and not use_feedback:
        return None
    solution = "" if demo is None else spec.solution_template.format(successful_previous_attempt=demo)
    feedback = spec.feedback_template.format(feedback_raw=raw) if use_feedback else ""
    messages = [dict(m) for m in prompt_messages]
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError("a teacher context needs a user message in the prompt; the prompt has none")
    last = users[-1]
    messages[last]["content"] = spec.reprompt_template.format(prompt=messages[last]["content"], solution=solution,
                                                              feedback=feedback)
    return messages


@dataclass
class TeacherOptions:
    """The teacher choices of a distilling objective as its fields (every field a CLI flag).

    ``teacher`` is the flag ``--teacher {live,ema,frozen,trust-region}`` (``TeacherSpec.mode``); the
    objective's ``teacher_spec()`` returns ``TeacherSpec.from_options(self)``."""

    teacher: TeacherMode = field(
        default=_DEFAULT.mode,
        metadata={
            "help": "teacher weights: 'live' = the current policy, 'ema' = exponential moving average of the "
            "policy, 'frozen' = the initial policy, 'trust-region' = logits lerp(initial, current policy, "
            "teacher_update_rate), both on the teacher context (SDPO's trust-region teacher)"
        },
    )
    teacher_update_rate: float = field(
        default=_DEFAULT.update_rate,
        metadata={"help": "EMA rate (ema: teacher <- (1 - rate) * teacher + rate * policy after each rollout batch), "
                          "or the trust-region mixing rate (the weight of the current policy's logits)"},
    )
    teacher_path: str | None = field(
        default=None,
        metadata={"help": "start the teacher (ema, frozen, or trust-region's reference) from this model instead of "
                          "the initial policy: a local HF model directory, a denser checkpoint or run directory "
                          "(SDPO-CL's teacher_path); its vocabulary must be the policy's"},
    )
    teacher_init_alpha: float = field(
        default=_DEFAULT.init_alpha,
        metadata={"help": "the teacher starts at a * teacher + (1 - a) * policy, parameter by parameter "
                          "(SDPO-CL's teacher_init_alpha; 1 = the teacher as loaded)"},
    )
    success_threshold: float = field(
        default=_DEFAULT.success_threshold,
        metadata={"help": "a sibling whose reward is >= this is a successful demonstration for the teacher"},
    )
    dont_reprompt_on_self_success: bool = field(
        default=_DEFAULT.dont_reprompt_on_self_success,
        metadata={"help": "a sample's own successful reply is never its demonstration (another successful "
                          "sibling's still is, as in SDPO's code)"},
    )
    remove_thinking: bool = field(
        default=_DEFAULT.remove_thinking,
        metadata={"help": "strip <think>...</think> (and an unopened ...</think> prefix) from a demonstration "
                          "before putting it in the teacher context"},
    )
    include_feedback: bool = field(
        default=_DEFAULT.include_feedback,
        metadata={"help": "put the task's feedback on the sample's attempt (given on failures) in the teacher context"},
    )
    feedback_only_without_solution: bool = field(
        default=_DEFAULT.feedback_only_without_solution,
        metadata={"help": "use the feedback only when no successful demonstration is available"},
    )
    reprompt_template: str = field(
        default=REPROMPT_TEMPLATE,
        metadata={"help": "the teacher's last user message: {prompt} (the original one's text), {solution}, "
                          "{feedback} (the sections below, or empty); SDPO's wording"},
    )
    solution_template: str = field(
        default=SOLUTION_TEMPLATE,
        metadata={"help": "the solution section: {successful_previous_attempt}; SDPO's wording"},
    )
    feedback_template: str = field(
        default=FEEDBACK_TEMPLATE,
        metadata={"help": "the feedback section: {feedback_raw}; SDPO's wording"},
    )

    def check_teacher_options(self, name: str) -> None:
        """Raise ``ValueError("objective 'name': ...")`` for a bad teacher field."""
        require(self.teacher in TEACHER_MODES, name,
                f"teacher={self.teacher!r} must be one of {', '.join(map(repr, TEACHER_MODES))}")
        require(0.0 <= self.teacher_update_rate <= 1.0, name,
                f"teacher_update_rate={self.teacher_update_rate} must be in [0, 1]")
        require(0.0 <= self.teacher_init_alpha <= 1.0, name,
                f"teacher_init_alpha={self.teacher_init_alpha} must be in [0, 1]")
        if self.teacher == "live":
            require(not self.teacher_path, name, "teacher_path needs a teacher of its own: "
                    f"--teacher {' | '.join(SEPARATE_TEACHER_MODES)} (a 'live' teacher is the policy)")
            require(self.teacher_init_alpha == 1.0, name, "teacher_init_alpha < 1 needs a teacher of its own: "
                    f"--teacher {' | '.join(SEPARATE_TEACHER_MODES)} (a 'live' teacher is the policy)")
        for template in TEMPLATE_FIELDS:
            problem = template_problem(template, getattr(self, template))
            require(problem is None, name, problem or "")
