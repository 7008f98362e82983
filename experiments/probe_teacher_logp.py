"""Probe: where SDPO's self-teacher and the student disagree on the default task.

For the first ``--prompts`` problems of the addition eval split, two replies of the student and, for
each, the log-prob the student (the plain prompt) and the teacher (the same weights on SDPO's
teacher context) give one token of it:

- ``Answer``: the first token of the ``Answer:`` line in a correct reply ``a + b = c\\nAnswer: c``;
  the sample succeeded itself, so its teacher context shows a correct sibling's solution;
- ``stop``: the stop token (EOS) right after a reply that lacks the ``Answer:`` line (``a + b = c``);
  the sample failed, so its teacher context shows a correct sibling (and feedback when the
  objective's options include it with a solution).

With ``--task NAME`` (any other built-in task whose answers are checked from an ``Answer: <x>`` line,
e.g. the continual grid's ``larger``), one case instead:

- ``first``: the first token of the one-line correct reply ``Answer: <answer>``, which the sample
  wrote itself; its teacher context shows that reply as a correct sibling's solution. This is the
  whole reply in the worked example of ``larger`` and ``smaller``; tasks whose example works the
  problem first (``a - b = c`` then ``Answer:``) make it an unlikely opening for both contexts.

The teacher context is built by the loop's own builder, :func:`denser.objectives.teacher_messages`,
with the objective's ``teacher_spec()`` (its templates and options), and rendered with the model's
chat template as the loop renders it; log-probs are ``token_stats(...).logp`` on both contexts at
temperature 1. At step 0 the live, EMA and frozen teachers are all the initial weights.

    PYTHONPATH=. python experiments/probe_teacher_logp.py                 # embedded model, 16 prompts
    PYTHONPATH=. python experiments/probe_teacher_logp.py --task larger --prompts 48
    PYTHONPATH=. python experiments/probe_teacher_logp.py --model tiny --prompts 2

Prints a table of means over prompts ± standard error (the difference is paired per prompt).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch

from denser.analysis.estimators import mean_stderr
from denser.engines.packing import build_packed_batch, completion_hidden_states, lm_head_params
from denser.kernels import token_stats
from denser.objectives import get_objective, teacher_messages
from denser.tasks import get_task
from denser.trainers.models import load_model, render_prompt

QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


def _answer_position(tokenizer, head: str, reply: str) -> tuple[list[int], int]:
    """Token ids of ``reply`` and the index of the first token of the text after ``head``."""
    ids = tokenizer.encode(reply, add_special_tokens=False)
    for k in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:k])) > len(head):
            return ids, k - 1
    raise ValueError(f"no token after {head!r} in {reply!r}")


@torch.no_grad()
def _logps(model, contexts, completions, pad_token_id) -> list[torch.Tensor]:
    """Per sample, the log-probs of its completion tokens after its context."""
    packed = build_packed_batch(contexts, completions, pad_token_id=pad_token_id)
    hidden = completion_hidden_states(model, packed)
    weight, bias = lm_head_params(model)
    logp = token_stats(hidden, weight, packed.targets, bias=bias).logp
    return list(torch.split(logp, [len(c) for c in completions]))


def _cases(task, row, tokenizer, stop):
    """``(case, reply, reply token ids, position probed (None: the last), the reply's Score)`` of one problem."""
    if task.name != "addition":
        reply = f"Answer: {row['answer']}"
        own = task.check(reply, row)
        if own.score < task.success_threshold:
            raise ValueError(f"task {task.name!r} does not accept {reply!r} as a correct reply; the probe needs a "
                             "task whose answer is checked from an 'Answer: <x>' line")
        return [("first", reply, tokenizer.encode(reply, add_special_tokens=False), 0, own)], reply
    a, b = QUESTION.search(row["question"]).groups()
    c = int(a) + int(b)
    head = f"{a} + {b} = {c}\n"
    correct = f"{head}Answer: {c}"
    lacking = f"{a} + {b} = {c}"
    ids, k = _answer_position(tokenizer, head, correct)
    return [
        ("Answer", correct, ids, k, task.check(correct, row)),
        ("stop", lacking, tokenizer.encode(lacking, add_special_tokens=False) + [stop], None, task.check(lacking, row)),
    ], correct


def probe(model_name: str = "default", prompts: int = 16, objective: str = "sdpo", seed: int = 0,
          task_name: str = "addition") -> dict:
    """``{case: {"student": (mean, se), "teacher": ..., "teacher_minus_student": ...}, "prompts": n}``."""
    task = get_task(task_name, seed=seed)
    obj = get_objective(objective)
    spec = obj.teacher_spec()
    if spec is None:
        raise ValueError(f"objective {objective!r} has no teacher (teacher_spec() is None)")
    model, tokenizer = load_model(model_name, seed=seed)
    model.eval()
    stop = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop
    rows = [task.eval[i] for i in range(min(prompts, len(task.eval)))]
    student_ctx, teacher_ctx, completions, positions, cases = [], [], [], [], []
    for row in rows:
        messages = task.prompt(row)
        row_cases, correct = _cases(task, row, tokenizer, stop)
        for case, reply, tokens, pos, own in row_cases:
            # the group: the sample itself (index 0) and a sibling with the correct reply
            teacher = teacher_messages(messages, [reply, correct], [own.score, 1.0], [own.feedback, None], 0, spec)
            if teacher is None:
                raise ValueError(f"objective {objective!r}: no teacher context for the {case!r} case")
            student_ctx.append(render_prompt(tokenizer, messages))
            teacher_ctx.append(render_prompt(tokenizer, teacher))
            completions.append(tokens)
            positions.append(len(tokens) - 1 if pos is None else pos)
            cases.append(case)
    s = _logps(model, student_ctx, completions, pad)
    t = _logps(model, teacher_ctx, completions, pad)
    out: dict = {"prompts": len(rows), "model": model_name, "objective": objective, "task": task.name}
    for case in dict.fromkeys(cases):
        idx = [i for i, c in enumerate(cases) if c == case]
        vs = [float(s[i][positions[i]]) for i in idx]
        vt = [float(t[i][positions[i]]) for i in idx]
        out[case] = {"student": mean_stderr(vs), "teacher": mean_stderr(vt),
                     "teacher_minus_student": mean_stderr([b - a for a, b in zip(vs, vt)])}
    return out


def table(result: dict) -> str:
    def cell(pair):
        mean, se = pair
        return f"{mean:+.3f}" + (f" ± {se:.3f}" if se is not None else "")

    lines = [f"log-prob (nats) on {result['prompts']} {result['task']} prompts, model {result['model']}, "
             f"teacher context of {result['objective']!r}; mean ± standard error over prompts",
             f"{'token':<40}{'student':>18}{'teacher':>18}{'teacher - student':>20}"]
    names = {"Answer": "'Answer' in a correct reply", "stop": "stop after a reply without 'Answer:'",
             "first": "first token of 'Answer: <answer>'"}
    for case in (c for c in names if c in result):
        r = result[case]
        lines.append(f"{names[case]:<40}{cell(r['student']):>18}{cell(r['teacher']):>18}"
                     f"{cell(r['teacher_minus_student']):>20}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="'default' (embedded), 'tiny' or a model directory")
    p.add_argument("--prompts", type=int, default=16, help="eval problems of the task (default 16)")
    p.add_argument("--task", default="addition", help="'addition' (two cases) or another built-in task whose "
                   "answers are checked from an 'Answer: <x>' line, such as 'larger' (one case)")
    p.add_argument("--objective", default="sdpo", help="whose teacher_spec() builds the teacher context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the result to this file")
    args = p.parse_args(argv)
    if args.prompts < 2:
        print("probe_teacher_logp: --prompts must be >= 2 (a standard error needs two prompts)", file=sys.stderr)
        return 2
    result = probe(args.model, args.prompts, args.objective, args.seed, args.task)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
