"""The teacher an objective distils from, as one spec: which weights score which context.

An objective that declares ``Signal.TEACHER`` or ``Signal.TEACHER_LOGP`` returns a
:class:`TeacherSpec` from ``Objective.teacher_spec()``; the loop follows it and knows nothing else about
the objective. The spec has two independent axes.

**The context** (``teacher_context``), built by the loop (``trainers/signals.py``) from the text of
each sample's group (:func:`teacher_messages`):

- ``reprompt`` (SDPO; the default): the context of sample i in a group, as the public SDPO code builds
  it (``ray_trainer._maybe_build_self_distillation_batch``), holds

  - a demonstration: the first successful sibling's reply (reward >= ``success_threshold``); with
    ``dont_reprompt_on_self_success`` the sample's own reply is never its demonstration (another
    successful sibling's still is); thinking removed when ``remove_thinking``;
  - feedback: the task's feedback on sample i's own attempt, when ``include_feedback`` and the task
    gave any (denser's tasks give it on failed attempts); with ``feedback_only_without_solution``
    only when there is no demonstration;
  - neither: no teacher for sample i (``teacher_mask`` False: it gets no distillation loss).

  It is the prompt's messages with the last user message replaced by
  ``reprompt_template.format(prompt=<its text>, solution=<solution section>, feedback=<feedback section>)``,
  the sections being ``solution_template.format(successful_previous_attempt=...)`` and
  ``feedback_template.format(feedback_raw=...)`` (or empty); every other message is kept as it is.
  The defaults are SDPO's templates word for word (``actor.yaml``, ``self_distillation``). The loop
  renders the messages with the chat template and cuts the result on the right at
  ``TrainConfig.teacher_max_context_tokens`` (SDPO: ``max_reprompt_len`` 10240, ``reprompt_truncation:
  right``).
- ``prompt``: the sample's own prompt, unchanged (the token ids the student was given); every sample
  has a teacher. For a teacher that is not the student conditioned on more (a model of its own).

Either way the completion tokens scored are the student's own.

**The weights** (``teacher``), built by ``denser.trainers.teacher.build_teacher``: ``live`` (the policy
itself), ``ema`` (an exponential moving average of the policy, ``teacher <- (1 - teacher_update_rate) *
teacher + teacher_update_rate * policy`` once per rollout batch), ``frozen`` (the initial policy) or
``trust-region`` (SDPO's ``teacher_regularization: trust-region``: logits ``lerp(reference, policy,
teacher_update_rate)``, both evaluated on the teacher context, the reference being the frozen initial
policy). ``teacher_path`` (SDPO-CL's ``teacher_path``) starts the teacher (``ema``, ``frozen``, or the
reference of ``trust-region``) from another model directory instead of the initial policy, and
``teacher_init_alpha`` (SDPO-CL's) starts it at ``teacher_init_alpha * teacher + (1 -
teacher_init_alpha) * policy``, parameter by parameter.

The fields carry the names of their flags (``--teacher``, ``--teacher-path``, ...): the objectives that
distil (``sdpo``, the hybrids) derive from :class:`TeacherSpec`, so its fields are theirs, declared
once, and their ``teacher_spec()`` is ``TeacherSpec.of(self)``.
"""

from __future__ import annotations

import dataclasses
import re
import string
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

TeacherMode = Literal["live", "ema", "frozen", "trust-region"]
TEACHER_MODES: tuple[str, ...] = TeacherMode.__args__
TeacherContext = Literal["reprompt", "prompt"]
TEACHER_CONTEXTS: tuple[str, ...] = TeacherContext.__args__
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


@dataclass
class TeacherSpec:
    """The teacher an objective distils from: its weights (``teacher``, ``teacher_update_rate``,
    ``teacher_path``, ``teacher_init_alpha``) and its context (``teacher_context`` and, for SDPO's
    reprompt, the fields after it). Defaults: SDPO's ``actor.yaml`` (an EMA teacher at rate 0.05
    started from the initial policy, the reprompt context with success threshold 0.5, no
    reprompting on self-success, thinking removed, feedback only without a solution, SDPO's templates).

    The fields are named as the flags and config keys of the objectives that distil: such an
    objective derives from this class (``class SDPO(Objective, TeacherSpec)``), so every field is one
    of its own (a CLI flag, a key of ``objective_args`` in config.yaml), and its ``teacher_spec()``
    is :meth:`of` itself. :meth:`problem` is the one validation of these fields."""

    teacher: TeacherMode = field(
        default="ema",
        metadata={
            "help": "teacher weights: 'live' = the current policy, 'ema' = exponential moving average of the "
            "policy, 'frozen' = the initial policy, 'trust-region' = logits lerp(initial, current policy, "
            "teacher_update_rate), both on the teacher context (SDPO's trust-region teacher)"
        },
    )
    teacher_update_rate: float = field(
        default=0.05,
        metadata={"help": "EMA rate (ema: teacher <- (1 - rate) * teacher + rate * policy after each rollout batch), "
                          "or the trust-region mixing rate (the weight of the current policy's logits)"},
    )
    teacher_path: str | None = field(
        default=None,
        metadata={"help": "start the teacher (ema, frozen, or trust-region's reference) from this model instead of "
                          "the initial policy: a local HF model directory, a denser checkpoint or run directory, or "
                          "default/tiny (SDPO-CL's teacher_path; opd's teacher model); its vocabulary must be the "
                          "policy's"},
    )
    teacher_init_alpha: float = field(
        default=1.0,
        metadata={"help": "the teacher starts at a * teacher + (1 - a) * policy, parameter by parameter "
                          "(SDPO-CL's teacher_init_alpha; 1 = the teacher as loaded)"},
    )
    success_threshold: float = field(
        default=0.5,
        metadata={"help": "a sibling whose reward is >= this is a successful demonstration for the teacher"},
    )
    dont_reprompt_on_self_success: bool = field(
        default=True,
        metadata={"help": "a sample's own successful reply is never its demonstration (another successful "
                          "sibling's still is, as in SDPO's code)"},
    )
    remove_thinking: bool = field(
        default=True,
        metadata={"help": "strip <think>...</think> (and an unopened ...</think> prefix) from a demonstration "
                          "before putting it in the teacher context"},
    )
    include_feedback: bool = field(
        default=True,
        metadata={"help": "put the task's feedback on the sample's attempt (given on failures) in the teacher context"},
    )
    feedback_only_without_solution: bool = field(
        default=True,
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
    teacher_context: TeacherContext = field(
        default="reprompt",
        metadata={"help": "what the teacher reads: 'reprompt' = the prompt with a successful sibling's reply and/or "
                          "the task's feedback (SDPO; samples with neither get no teacher), 'prompt' = the sample's "
                          "own prompt unchanged (every sample gets a teacher; the reprompt fields are unused)"},
    )

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise ValueError(f"teacher: {problem}")
        self.teacher_path = self.teacher_path or None  # an empty path (a config file's '') is no path

    def problem(self) -> str | None:
        """What is wrong with these fields (one sentence naming the field), or None: the one check of
        a teacher's choices (an objective deriving from this class calls it from its own ``__post_init__``)."""
        if self.teacher not in TEACHER_MODES:
            return f"teacher={self.teacher!r} must be one of {', '.join(map(repr, TEACHER_MODES))}"
        if self.teacher_context not in TEACHER_CONTEXTS:
            return f"teacher_context={self.teacher_context!r} must be one of {', '.join(map(repr, TEACHER_CONTEXTS))}"
        if not 0.0 <= self.teacher_update_rate <= 1.0:
            return f"teacher_update_rate={self.teacher_update_rate} must be in [0, 1]"
        if not 0.0 <= self.teacher_init_alpha <= 1.0:
            return f"teacher_init_alpha={self.teacher_init_alpha} must be in [0, 1]"
        if self.teacher == "live" and self.teacher_path:
            return (f"teacher_path needs a teacher of its own: --teacher {' | '.join(SEPARATE_TEACHER_MODES)} "
                    "(a 'live' teacher is the policy)")
        if self.teacher == "live" and self.teacher_init_alpha != 1.0:
            return (f"teacher_init_alpha < 1 needs a teacher of its own: --teacher {' | '.join(SEPARATE_TEACHER_MODES)} "
                    "(a 'live' teacher is the policy)")
        for name in TEMPLATE_FIELDS:
            problem = template_problem(name, getattr(self, name))
            if problem:
                return problem
        return None

    @classmethod
    def of(cls, holder: Any) -> "TeacherSpec":
        """The spec of an object that holds these fields (an objective deriving from this class):
        each field's value taken as it is, by name."""
        return cls(**{f.name: getattr(holder, f.name) for f in dataclasses.fields(cls)})


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
    ``prompt_messages`` is left unchanged. With ``spec.teacher_context == "prompt"``: a copy of
    ``prompt_messages`` (every sample has a teacher)."""
    if spec.teacher_context == "prompt":
        return [dict(m) for m in prompt_messages]
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
