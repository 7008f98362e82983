"""mix:A+B+C: the interleaving, equal shares, held-out questions, dispatch to the parts, per-part eval."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from denser.cli import main
from denser.tasks import get_task
from denser.tasks.mixed import MixedTask, part_accuracies


def test_round_robin_interleaving_with_equal_shares():
    mix = get_task("mix:larger+subtract+multiply", seed=3)
    parts = {n: get_task(n, seed=3) for n in ("larger", "subtract", "multiply")}
    longest = max(len(t.train) for t in parts.values())
    assert len(mix.train) == 3 * longest
    assert Counter(mix.train["part"]) == {n: longest for n in parts}
    for i in (0, 1, 2, 3, 4, 5, 3 * 100 + 1, len(mix.train) - 1):
        name = ("larger", "subtract", "multiply")[i % 3]
        own = parts[name].train
        row = mix.train[i]
        assert row["part"] == name
        assert json.loads(row["part_row"]) == dict(own[(i // 3) % len(own)])  # a shorter part repeats in order
    # eval: the first k rows of every part, in turn
    assert [mix.eval[i]["question"] for i in range(6)] == [parts[n].eval[k]["question"] for k in (0, 1)
                                                            for n in ("larger", "subtract", "multiply")]
    # deterministic: the same seed builds the same mix
    assert get_task("mix:larger+subtract+multiply", seed=3).train["part_row"] == mix.train["part_row"]


def test_prompt_and_score_are_the_parts_own():
    mix = get_task("mix:larger+subtract", seed=0)
    for i in range(4):
        row = mix.eval[i]
        part = get_task(row["part"], seed=0)
        own = json.loads(row["part_row"])
        assert mix.prompt(row) == part.prompt(own)
        for reply in (f"Answer: {own['answer']}", "Answer: 1000", "no answer"):
            assert mix.score(reply, row) == part.score(reply, own)
    assert mix.suggested_max_new_tokens == max(get_task(n).suggested_max_new_tokens for n in ("larger", "subtract"))


def test_exclude_eval_of_removes_other_seeds_eval_questions():
    mix = get_task("mix:subtract+multiply?exclude_eval_of=0,1,2", seed=0)
    train = set(mix.train["question"])
    for name in ("subtract", "multiply"):
        for s in (0, 1, 2):
            assert not train & set(get_task(name, seed=s).eval["question"]), (name, s)
    plain = set(get_task("mix:subtract+multiply", seed=0).train["question"])
    assert plain & set(get_task("multiply", seed=1).eval["question"])  # without it they overlap


@pytest.mark.parametrize("name,match", [("mix:larger", "at least two"), ("mix:larger+larger", "listed twice"),
                                        ("mix:larger+nope", "unknown task"),
                                        ("mix:larger+subtract?exclude_eval_of=a", "exclude_eval_of")])
def test_bad_mixes_fail_with_one_clear_line(name, match):
    with pytest.raises(ValueError, match=match):
        len(get_task(name).train)


def test_part_accuracies_by_hand():
    mix = get_task("mix:larger+subtract", seed=0)
    assert part_accuracies(mix, ["larger", "subtract", "larger", "subtract"], [1.0, 0.0, 0.0, 0.0]) == {
        "eval_accuracy/larger": 0.5, "eval_accuracy/subtract": 0.0}
    assert part_accuracies(get_task("larger"), ["larger"], [1.0]) == {}
    assert isinstance(mix, MixedTask)


def test_denser_train_on_a_mix_reports_each_part(tmp_path):
    out = tmp_path / "mix"
    assert main(["train", "--objective", "grpo", "--task", "mix:larger+subtract", "--model", "tiny", "--steps", "1",
                 "--max-new-tokens", "4", "--num-generations", "2", "--prompts-per-step", "2", "--eval-size", "4",
                 "--no-progress", "--output-dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert evals
    for r in evals:
        parts = [r["eval_accuracy/larger"], r["eval_accuracy/subtract"]]
        assert r["eval_accuracy"] == pytest.approx(sum(parts) / 2)  # 2 prompts of each part
