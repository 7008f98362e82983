"""Reward functions: the registry, weighted sums against a hand computation, feedback reaching the
SDPO teacher, the math-verify reward, and errors before any compute."""

from __future__ import annotations

import json
import random
import sys

import pytest

from denser.cli import main
from denser.engines import HFRolloutEngine
from denser.objectives.teacher import TeacherSpec, teacher_messages
from denser.tasks import (
    FileTaskError,
    Score,
    WeightedRewards,
    get_reward,
    get_task,
    list_rewards,
    per_reward_sums,
    register_reward,
    reward_descriptions,
    unregister_reward,
)
from denser.tasks.rewards import parse_reward_spec

BUILTIN = {"exact", "numeric", "contains", "format", "math"}


@pytest.fixture
def custom():
    """Two user rewards: a graded one with feedback and a plain number, removed afterwards."""

    @register_reward("t_overlap")
    def overlap(completion: str, row: dict) -> tuple[float, str | None]:
        """share of the answer's characters present in the reply"""
        want = set(row["answer"])
        value = len(want & set(completion)) / max(len(want), 1)
        return value, (None if value == 1 else f"missing {len(want - set(completion))} characters")

    @register_reward("t_short")
    def short(completion: str, row: dict) -> float:
        return 1.0 / (1.0 + len(completion))

    yield overlap, short
    unregister_reward("t_overlap")
    unregister_reward("t_short")


def _file(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_registry_lists_builtins_and_user_rewards(custom):
    assert BUILTIN <= set(list_rewards()) and {"t_overlap", "t_short"} <= set(list_rewards())
    assert all(reward_descriptions()[n] for n in BUILTIN)
    assert reward_descriptions()["t_overlap"] == "share of the answer's characters present in the reply"
    assert get_reward("t_short").fn is custom[1]
    with pytest.raises(ValueError, match="'t_short' is already registered"):
        register_reward("t_short")(lambda c, r: 0.0)
    with pytest.raises(ValueError, match="reward name 'a:b'"):
        register_reward("a:b")
    with pytest.raises(ValueError) as err:
        get_reward("nope")
    assert "unknown reward 'nope'" in str(err.value) and all(n in str(err.value) for n in BUILTIN)


@pytest.mark.parametrize("spec", ["t_a+t_b:0.25", "t_a:1,t_b:0.25", "t_a t_b:0.25", {"t_a": 1, "t_b": 0.25},
                                  [("t_a", 1.0), "t_b:0.25"]])
def test_spec_forms(spec):
    assert parse_reward_spec(spec) == [("t_a", 1.0), ("t_b", 0.25)]


@pytest.mark.parametrize("spec, needle", [("math:x", "weight 'x' of reward 'math'"), ("math:nan", "not a finite"),
                                          ("math+math:2", "named twice"), ("", "no reward named")])
def test_bad_specs(spec, needle):
    with pytest.raises(ValueError, match=needle):
        WeightedRewards(spec)


def test_weighted_sum_matches_a_hand_computation(custom):
    overlap, short = custom
    rng = random.Random(7)
    w1, w2, w3 = rng.uniform(0.1, 2), rng.uniform(-1, -0.1), rng.uniform(0.1, 1)
    rewards = WeightedRewards(f"t_overlap:{w1!r}+t_short:{w2!r}+format:{w3!r}")
    assert rewards.max_score == pytest.approx(w1 + w3)
    for _ in range(20):
        answer = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6)))
        reply = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(0, 30)))
        reply += rng.choice(["", f"\nAnswer: {answer}"])
        row = {"answer": answer}
        o, fb = overlap(reply, row)
        s = short(reply, row)
        f = 1.0 if "Answer:" in reply else 0.0
        got = rewards.score(reply, row)
        assert got.score == pytest.approx(w1 * o + w2 * s + w3 * f, rel=1e-12, abs=1e-12)
        assert got.rewards == pytest.approx({"t_overlap": o, "t_short": s, "format": f})
        want_feedback = [x for x in (fb, None if f else "No final answer found. End with 'Answer: <answer>'.") if x]
        assert got.feedback == ("\n".join(want_feedback) or None)


def test_file_task_with_several_rewards(tmp_path, custom):
    path = _file(tmp_path, [{"prompt": f"Spell {w}.", "answer": w} for w in ("cab", "bead", "face", "deaf", "bad")])
    task = get_task(f"file:{path}?rewards=exact+t_overlap:0.5&eval_fraction=0")
    assert task.success_threshold == 1.5
    row = task.train[0]
    right = task.score(f"Answer: {row['answer']}", row)
    assert right == Score(1.5, None, row["answer"], {"exact": 1.0, "t_overlap": 1.0}) and task.is_success(right)
    partial = task.score("Answer: zz" + row["answer"][0], row)
    o = 1 / len(set(row["answer"]))
    assert partial.score == pytest.approx(0.5 * o) and not task.is_success(partial)
    assert partial.feedback.splitlines()[0].startswith("Your answer 'zz") and "missing" in partial.feedback
    sums = per_reward_sums([right, partial, Score(1.0)])
    assert sums == {"exact": (1.0, 2), "t_overlap": (pytest.approx(1 + o), 2)}
    assert get_task(f"file:{path}?rewards=exact+t_overlap:0.5&success_threshold=1").success_threshold == 1.0


def test_feedback_from_any_reward_reaches_the_sdpo_teacher(tmp_path, custom):
    """The loop hands ``scores[j].feedback`` of each group to ``teacher_messages``."""
    path = _file(tmp_path, [{"prompt": "Spell cab.", "answer": "cab"}, {"prompt": "Spell bad.", "answer": "bad"}])
    task = get_task(f"file:{path}?rewards=t_overlap&eval_fraction=0")
    row = task.train[0]
    texts = ["c", "a"]  # both fail: no demonstration, so the teacher sees each one's own feedback
    scores = task.score_batch(texts, [row, row])
    assert [s.feedback for s in scores] == ["missing 2 characters", "missing 2 characters"]
    settings = TeacherSpec(success_threshold=1.0)
    messages = teacher_messages(task.prompt(row), texts, [s.score for s in scores], [s.feedback for s in scores], 0,
                                settings)
    assert "unsuccessful earlier attempt:\n\nmissing 2 characters" in messages[-1]["content"]


def test_reward_options_and_answer_checks(tmp_path):
    path = _file(tmp_path, [{"prompt": "Capital of France?", "answer": "Paris"}, {"prompt": "2+2?", "answer": "4"}])
    loose = get_task(f"file:{path}?reward=exact&eval_fraction=0")
    strict = get_task(f"file:{path}?reward=exact&case_sensitive=true&eval_fraction=0")
    row = loose.train[0]
    assert loose.score("Answer: paris", row).score == 1.0 and strict.score("Answer: paris", row).score == 0.0
    assert get_task(f"file:{path}?rewards=contains&case_sensitive=true").score("PARIS", row).score == 0.0
    with pytest.raises(FileTaskError, match="row 0: reward 'numeric': answer 'Paris' is not a single number"):
        get_task(f"file:{path}?rewards=format+numeric")
    with pytest.raises(FileTaskError, match="give reward= or rewards=, not both"):
        get_task(f"file:{path}?reward=exact&rewards=format")


def test_a_reward_returning_garbage_is_named():
    register_reward("t_bad")(lambda c, r: "high")
    try:
        with pytest.raises(ValueError, match="reward 't_bad' returned 'high'"):
            WeightedRewards("t_bad").score("x", {"answer": "y"})
    finally:
        unregister_reward("t_bad")


def test_unknown_reward_fails_before_compute_with_one_line(tmp_path, capsys, monkeypatch):
    def generate(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)
    path = _file(tmp_path, [{"prompt": "a?", "answer": "1"}, {"prompt": "b?", "answer": "2"}])
    for task, needles in [(f"file:{path}?rewards=math+shiny:0.2", ["unknown reward 'shiny'", "known rewards:",
                                                                   "contains, exact, format, math, numeric"]),
                          (f"file:{path}?reward=fuzzy", ["unknown reward 'fuzzy'"])]:
        code = main(["train", "--model", "tiny", "--steps", "1", "--no-progress", "--task", task,
                     "--output-dir", str(tmp_path / "r")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert all(n in err[0] for n in needles), err[0]
    assert not (tmp_path / "r").exists()


def test_math_reward_without_math_verify_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    with pytest.raises(ValueError, match=r"reward 'math' needs the 'math_verify' package.*pip install 'denser\[math\]'"):
        WeightedRewards("format+math")
    path = _file(tmp_path, [{"prompt": "a?", "answer": "1"}])
    with pytest.raises(FileTaskError) as err:
        get_task(f"file:{path}?rewards=math")
    assert "\n" not in str(err.value) and "denser[math]" in str(err.value)


# ------------------------------------------------------------------------------------ math-verify


@pytest.mark.parametrize("reply, answer, expected", [
    ("Answer: 0.5", "\\frac{1}{2}", 1.0),
    ("Answer: \\frac{1}{2}", "0.5", 1.0),
    ("so the result is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("Answer: $\\dfrac{2}{4}$", "1/2", 1.0),
    ("\\boxed{0.51}", "\\frac{1}{2}", 0.0),
    ("Answer: (x+1)^2", "x^2 + 2x + 1", 1.0),
    ("Answer: x^2 + 1", "x^2 + 2x + 1", 0.0),
    ("Answer: \\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2", 1.0),
    ("Answer: 1,000", "1000", 1.0),
    ("Answer: 007", "7", 1.0),
    ("Answer: Paris", "Paris", 1.0),
    ("Answer: Sirap", "Paris", 0.0),  # a word answer compares as text, not as the product p*a*r*i*s
    ("I think 1/2", "0.5", 0.0),  # no final-answer marker
])
def test_math_reward_equivalences(reply, answer, expected):
    pytest.importorskip("math_verify")
    s = WeightedRewards("math").score(reply, {"answer": answer})
    assert s.score == expected, s
    assert (s.feedback is None) == (expected == 1.0)
    if "Answer" not in reply and "boxed" not in reply:
        assert "No final answer found" in s.feedback


def test_math_reward_in_a_file_task(tmp_path):
    pytest.importorskip("math_verify")
    path = tmp_path / "m.csv"
    path.write_text('prompt,answer\nHalf of 1?,\\frac{1}{2}\nA third of 3?,1\n')
    task = get_task(f"file:{path}?rewards=math+format:0.2&eval_fraction=0")
    row = task.train[0]
    s = task.score("Half of one is \\boxed{0.5}", row)
    assert s.score == pytest.approx(1.2) and s.rewards == {"math": 1.0, "format": 1.0} and task.is_success(s)
    s = task.score("Answer: 0.25", row)
    assert s.score == pytest.approx(0.2) and s.feedback == "Your answer '0.25' is wrong."
