"""Teacher alignment (denser.analysis.teacher_probe) against a plain forward pass, and `denser continual
--teacher-probe`: recorded per stage, the run otherwise unchanged."""

from __future__ import annotations

import json

import pytest
import torch

from denser.analysis.teacher_probe import teacher_alignment, teacher_policy
from denser.cli import main
from denser.objectives import get_objective, teacher_messages
from denser.tasks import get_task
from denser.trainers.models import build_tiny_model, load_model, render_prompt
from denser.trainers.teacher import TeacherWeights


def _reference_logps(model, tokenizer, messages, reply) -> torch.Tensor:
    """Per-token log-probs of ``reply`` after ``messages`` from one full forward's logits."""
    ctx = render_prompt(tokenizer, messages)
    comp = tokenizer.encode(reply, add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ctx + comp])).logits[0].float()
    logp = torch.log_softmax(logits[len(ctx) - 1:-1], -1)
    return logp[torch.arange(len(comp)), torch.tensor(comp)]


@pytest.mark.parametrize("objective,mode", [("sdpo", "frozen"), ("sdpo", "live"), ("opd", "frozen")])
def test_teacher_alignment_matches_a_plain_forward(objective, mode):
    policy, tok = load_model("tiny", seed=0)
    other = build_tiny_model(seed=5)[0]  # another model as the teacher (same vocabulary)
    policy.eval()
    teacher = TeacherWeights(policy, mode, 0.05, weights=None if mode == "live" else other.eval())
    spec = get_objective(objective, teacher=mode).teacher_spec()
    task = get_task("larger", seed=1)
    rows = [task.eval[i] for i in range(3)]
    got = teacher_alignment(task, rows, tok, policy, teacher, spec)
    t_model = policy if mode == "live" else other
    first, whole = [], []
    for row in rows:
        reply = f"Answer: {row['answer']}"
        s = _reference_logps(policy, tok, task.prompt(row), reply)
        ctx = teacher_messages(task.prompt(row), [reply, reply], [1.0, 1.0], [None, None], 0, spec)
        if objective == "opd":
            assert ctx == task.prompt(row)  # opd's teacher reads the plain prompt
        else:
            assert ctx != task.prompt(row)
        t = _reference_logps(t_model, tok, ctx, reply)
        first.append(float(t[0] - s[0]))
        whole.append(float(t.sum() - s.sum()))
    assert got["prompts"] == 3
    assert got["first"]["teacher_minus_student"][0] == pytest.approx(sum(first) / 3, abs=1e-4)
    assert got["reply_logp"]["teacher_minus_student"][0] == pytest.approx(sum(whole) / 3, abs=1e-3)
    if mode == "live" and objective == "sdpo":
        assert abs(got["first"]["teacher_minus_student"][0]) > 1e-6  # same weights, other context: it differs
    assert teacher_policy(teacher, policy) is (policy if mode == "live" else other)
    assert teacher_policy(TeacherWeights(policy, "trust-region", 0.05, weights=other), policy) is None


TINY = ["--model", "tiny", "--tasks", "larger", "--steps-per-task", "1", "--eval-size", "3",
        "--max-new-tokens", "5", "--num-generations", "2", "--prompts-per-step", "2", "--spectral-rank", "0",
        "--no-progress", "--lr", "1e-3", "--objective", "sdpo", "--teacher", "frozen"]


def test_continual_teacher_probe_is_recorded_and_changes_nothing_else(tmp_path):
    assert main(["continual", *TINY, "--output-dir", str(tmp_path / "plain")]) == 0
    assert main(["continual", *TINY, "--teacher-probe", "--output-dir", str(tmp_path / "probe")]) == 0
    plain = json.loads((tmp_path / "plain" / "continual.json").read_text())
    probe = json.loads((tmp_path / "probe" / "continual.json").read_text())
    assert probe["accuracy_matrix"] == plain["accuracy_matrix"]
    for a, b in zip(plain["stages"][1:], probe["stages"][1:]):
        assert [s["loss"] for s in a["train"]["steps_log"]] == [s["loss"] for s in b["train"]["steps_log"]]
        assert a["params"]["relative_l2"] == b["params"]["relative_l2"]
        assert "teacher_probe" not in a
    assert "teacher_probe" not in probe["stages"][0]
    p1 = probe["stages"][1]["teacher_probe"]
    assert (p1["stage"], p1["task"], p1["teacher"], p1["prompts"]) == (1, "larger", "frozen", 3)
    # stage 1's frozen teacher is the initial model: its greedy accuracy is stage 0's on the same prompts
    assert p1["teacher_accuracy"] == pytest.approx(probe["stages"][0]["accuracy"]["larger"])
    for k in (1,):  # saved at the stage's start: what a run resumed inside the stage records
        saved = json.loads((tmp_path / "probe" / "teacher_probe" / f"stage-{k:02d}.json").read_text())
        assert saved == probe["stages"][k]["teacher_probe"]
