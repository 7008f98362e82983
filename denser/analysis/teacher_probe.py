"""How much a run's teacher knows about a task that the student does not: teacher alignment.

For each of a task's fixed eval prompts, the correct one-line reply ``Answer: <answer>`` (the reply
``experiments/probe_teacher_logp.py --task`` probes), and the log-probs the student (the policy on
the plain prompt) and the teacher (the run's teacher weights on the run's teacher context) give it:

- ``first``: the log-prob of the reply's first token (the probe's measure: on ``larger`` the
  initial model's SDPO teacher gives it 0.08 where the student gives 0.90);
- ``reply``: the log-prob of the whole reply (the sum over its tokens);

each as the mean over prompts ± standard error, for the student, the teacher, and the paired
difference teacher − student (positive: the teacher puts more mass on the correct reply). The
teacher context is the objective's (``teacher_spec()``), built by the loop's own builder
(:func:`denser.objectives.teacher_messages`) for a group of two: the sample (this correct reply,
which succeeded) and a sibling with the same correct reply; an objective whose teacher reads the
plain prompt (``opd``) gets the plain prompt. The teacher is anything with the loop's teacher
interface, ``outputs(packed) -> (hidden, weight, bias)`` (:class:`denser.trainers.teacher.TeacherWeights`:
``live``, ``ema``, ``frozen`` and ``trust-region``'s logit mixture alike).

:func:`teacher_policy` says which model the teacher is when it can run as a policy (its greedy
accuracy on the plain prompts is then a second alignment measure): the teacher's own model for
``ema`` and ``frozen``, the policy for ``live``, none for ``trust-region`` (a mixture of two models'
logits, not one model).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from denser.analysis.estimators import mean_stderr
from denser.engines.packing import build_packed_batch, completion_hidden_states, lm_head_params
from denser.kernels import token_stats
from denser.objectives import teacher_messages
from denser.trainers.models import render_prompt


def correct_reply(row: dict[str, Any]) -> str:
    return f"Answer: {row['answer']}"


@torch.no_grad()
def _logps(hidden_weight_bias, packed, completions) -> list[torch.Tensor]:
    hidden, weight, bias = hidden_weight_bias
    logp = token_stats(hidden, weight, packed.targets.to(hidden.device), bias=bias).logp
    return list(torch.split(logp.float().cpu(), [len(c) for c in completions]))


@torch.no_grad()
def teacher_alignment(task, rows: Sequence[dict], tokenizer, student, teacher, spec) -> dict[str, Any]:
    """The measures of the module docstring on ``rows`` of ``task``: ``{"prompts", "reply",
    "teacher_context", "first": {"student", "teacher", "teacher_minus_student"}, "reply_logp": {...}}``
    (each a ``[mean, se]`` pair). ``student``: the policy model; ``teacher``: its ``outputs(packed)``
    is the teacher's (hidden, weight, bias); ``spec``: the objective's ``TeacherSpec``."""
    if not rows:
        raise ValueError("teacher_alignment needs at least one prompt")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    student_ctx, teacher_ctx, completions = [], [], []
    for row in rows:
        messages = task.prompt(row)
        reply = correct_reply(row)
        own = task.score(reply, row)
        if not task.is_success(own):
            raise ValueError(f"task {task.name!r} does not accept {reply!r} as a correct reply; teacher alignment "
                             "needs a task whose answers are read from an 'Answer: <x>' line")
        context = teacher_messages(messages, [reply, reply], [own.score, own.score], [own.feedback, None], 0, spec)
        if context is None:
            raise ValueError(f"the objective's teacher context is empty for a correct reply of {task.name!r}")
        student_ctx.append(render_prompt(tokenizer, messages))
        teacher_ctx.append(render_prompt(tokenizer, context))
        completions.append(tokenizer.encode(reply, add_special_tokens=False))
    s_packed = build_packed_batch(student_ctx, completions, pad_token_id=pad)
    t_packed = build_packed_batch(teacher_ctx, completions, pad_token_id=pad)
    s = _logps((completion_hidden_states(student, s_packed), *lm_head_params(student)), s_packed, completions)
    out = teacher.outputs(t_packed)
    t = _logps((out.hidden, out.weight, out.bias), t_packed, completions)
    result: dict[str, Any] = {"prompts": len(rows), "reply": "Answer: <answer>",
                              "teacher_context": spec.teacher_context}
    for key, pick in (("first", lambda x: float(x[0])), ("reply_logp", lambda x: float(x.sum()))):
        vs, vt = [pick(x) for x in s], [pick(x) for x in t]
        result[key] = {"student": list(mean_stderr(vs)), "teacher": list(mean_stderr(vt)),
                       "teacher_minus_student": list(mean_stderr([b - a for a, b in zip(vs, vt)]))}
    return result


def teacher_policy(teacher, policy):
    """The model the teacher is, when it can run as a policy (see the module docstring); else None."""
    if teacher is None:
        return None
    if teacher.mode == "live":
        return policy
    if teacher.mode in ("ema", "frozen"):
        return teacher.model
    return None
