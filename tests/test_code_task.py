"""The built-in ``code`` task (denser/tasks/code.py): prompts, hidden tests run in the sandbox, rewards
and SDPO-style feedback."""

from __future__ import annotations

import json
import random
import sys

import pytest

from denser.tasks import get_task
from denser.tasks.code import FAMILIES, CodeTask, extract_program

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")


def _row(task: CodeTask, name: str, seed: int = 0) -> dict:
    family = next(f for f in FAMILIES if f[0] == name)
    return task.make_problem(random.Random(seed), family)


def _table_program(row: dict) -> str:
    """A program that answers exactly the row's hidden tests from a table: scores 1 if the tests
    survive the trip through the sandbox as data."""
    table = {json.dumps(args): expected for args, expected in json.loads(row["tests"])}
    return f"import json\nT = {table!r}\ndef {row['function']}(*a):\n    return T[json.dumps(list(a))]\n"


def test_extract_program():
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1"
    assert extract_program("```py\na = 1\n```\n```python\nb = 2\n```") == "b = 2"  # the last block
    assert extract_program("```\nx = 3\n```") == "x = 3"
    assert extract_program("```python\nunclosed = 1\n") == "unclosed = 1"
    assert extract_program("def f(x): return x") == "def f(x): return x"


def test_splits_hold_each_function_once_and_prompts_show_an_example():
    task = get_task("code", seed=0)
    names = list(task.train["function"]) + list(task.eval["function"])
    assert len(names) == len(set(names)) == len(FAMILIES)
    assert len(task.eval) == 40 and not set(task.train["function"]) & set(task.eval["function"])
    row = task.eval[0]
    msgs = task.prompt(row)
    assert msgs[-1]["content"] == row["question"] and "```python" in msgs[1]["content"]  # the worked example
    assert f"`{row['function']}(" in row["question"] and "For example, " in row["question"]
    tests = json.loads(row["tests"])
    assert len(tests) == 5
    example_args = row["question"].split("For example, ")[1].split(" returns ")[0]
    assert all(f"{row['function']}({', '.join(map(repr, a))})" != example_args for a, _ in tests)
    assert list(get_task("code", seed=1).eval["function"]) != list(task.eval["function"])
    with pytest.raises(ValueError, match="not enough"):
        _ = get_task("code", num_eval=1000).train


@pytest.mark.parametrize("seed", [0, 1])
def test_no_problem_is_passed_by_a_constant_function(seed):
    """Every problem's hidden tests expect at least two different values, so `return <constant>`
    never scores 1 (before, 16 of 133 functions, e.g. `count_b` on words without a 'b', had tests
    that all expected the same value)."""
    task = get_task("code", seed=seed)
    for row in list(task.train) + list(task.eval):
        expected = {json.dumps(e) for _, e in json.loads(row["tests"])}
        assert len(expected) > 1, (row["function"], expected)


def test_right_wrong_partial_and_all_or_nothing():
    task = get_task("code", num_eval=5)
    for row in task.eval:
        assert task.score(_table_program(row), row).score == 1.0
        s = task.score(f"```python\ndef {row['function']}(*a):\n    return None\n```", row)
        assert s.score == 0.0 and s.feedback.startswith("5 of 5 tests failed: " + row["function"] + "(")
        assert "returned None, expected" in s.feedback and "\n" not in s.feedback
    add7 = _row(task, "add_7")
    assert task.score("```python\ndef add_7(x):\n    return x + 7\n```", add7) == task.score(
        "def add_7(x):\n    return 7 + x", add7)
    assert task.score("def add_7(x):\n    return x + 7", add7).score == 1.0
    partial = "def add_7(x):\n    return x + 7 if x % 2 == 0 else x"
    n_even = sum(args[0] % 2 == 0 for args, _ in json.loads(add7["tests"]))
    assert task.score(partial, add7).score == pytest.approx(n_even / 5)
    strict = get_task("code", all_or_nothing=True)
    assert strict.score(partial, add7).score == (1.0 if n_even == 5 else 0.0)
    count_e = _row(task, "count_e")
    assert task.score("def count_e(s):\n    return sum(ch == 'e' for ch in s)", count_e).score == 1.0
    last_2 = _row(task, "last_2")
    assert task.score("def last_2(xs):\n    return xs[len(xs) - 2:] if len(xs) > 2 else xs", last_2).score == 1.0


def test_feedback_for_errors_and_timeouts():
    task = get_task("code")
    row = _row(task, "square")
    assert task.score("", row).feedback.startswith("No code found")
    s = task.score("def square(x):\n    return x * y", row)
    assert s.score == 0.0 and "raised NameError: name 'y' is not defined" in s.feedback
    s = task.score("def square(x:\n", row)
    assert s.feedback.startswith("The program failed before the tests ran: SyntaxError")
    slow = dict(row, cpu_s=1)
    s = task.score("def square(x):\n    while True:\n        pass", slow)
    assert s.score == 0.0 and s.feedback.startswith("Timed out after 1 s (in test 1 of 5)")


def test_score_batch_in_parallel_equals_one_at_a_time():
    task = get_task("code", workers=2, num_eval=4)
    rows = list(task.eval)
    replies = [_table_program(rows[0]), "nonsense(", f"def {rows[2]['function']}(*a):\n    return 0", ""]
    batch = task.score_batch(replies, rows)
    assert batch == [task.score(c, r) for c, r in zip(replies, rows)]
    assert [s.score for s in batch][0] == 1.0 and batch[1].score == 0.0
    with pytest.raises(ValueError, match="workers"):
        get_task("code", workers=0)


def test_tests_reward_on_the_docs_three_row_file(tmp_path):
    """docs/tasks.md's file, in LiveCodeBench's two test shapes, scored through a file: task."""
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text()
    (tmp_path / "code.jsonl").write_text(re.search(r"```json\n(.*?)```", page, re.S).group(1))
    task = get_task(f"file:{tmp_path / 'code.jsonl'}?reward=tests&answer_column=tests&format_hint=false"
                    "&eval_fraction=0")
    rows = {r["prompt"].split()[0]: r for r in task.train}
    assert sorted(rows) == ["Complete", "Read", "Write"]
    assert "Answer:" not in task.prompt(rows["Read"])[-1]["content"]
    right = {"Read": "a, b = map(int, input().split())\nprint(a + b)",
             "Write": "def add(a, b):\n    return a + b",
             "Complete": "class Solution:\n    def maxOfList(self, nums):\n        return max(nums)"}
    for key, row in rows.items():
        assert task.score(f"```python\n{right[key]}\n```", row).score == 1.0, key
    wrong = task.score("print(0)", rows["Read"])
    assert wrong.score == 0.0 and wrong.feedback == (
        "2 of 2 tests failed: input '1 2\\n': expected output '3\\n', got '0\\n'; "
        "input '-4 10\\n': expected output '6\\n', got '0\\n'.")
    half = task.score("def add(a, b):\n    return a + b if isinstance(a, int) else b", rows["Write"])
    assert half.score == 0.5 and "add([1], [2]) returned [2], expected [1, 2]" in half.feedback
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "tests": [{"input": "1", "output": "2", "testtype": "other"}]}\n')
    with pytest.raises(Exception, match="testtype must be 'stdin' or 'functional'"):
        _ = get_task(f"file:{bad}?reward=tests&answer_column=tests&eval_fraction=0").train


def test_feedback_reaches_sdpos_teacher_context():
    """The failing tests of a sample's own program are its teacher's context when no sibling succeeded
    (SDPO's include_feedback, through feedback_template; with a successful sibling its program is the
    demonstration instead, SDPO's feedback_only_without_solution default)."""
    from denser.objectives.teacher import teacher_messages

    task = get_task("code")
    row = _row(task, "times_3")
    replies = ["def times_3(x):\n    return x + 3", "oops(", "def times_3(x):\n    return 3 * x"]
    scores = task.score_batch(replies, [row] * 3)
    assert [s.score for s in scores] == [0.0, 0.0, 1.0]
    prompt, rewards, feedback = task.prompt(row), [s.score for s in scores], [s.feedback for s in scores]
    failed_only = teacher_messages(prompt, replies[:2], rewards[:2], feedback[:2], 0)[-1]["content"]
    assert feedback[0].startswith("5 of 5 tests failed: times_3(") and feedback[0] in failed_only
    assert row["question"] in failed_only
    assert "SyntaxError" in teacher_messages(prompt, replies[:2], rewards[:2], feedback[:2], 1)[-1]["content"]
    with_demo = teacher_messages(prompt, replies, rewards, feedback, 0)[-1]["content"]
    assert "return 3 * x" in with_demo and feedback[0] not in with_demo


def test_reward_workers_score_that_many_at_once_and_reach_the_task_from_the_run(tmp_path):
    """A task that runs programs scores --reward-workers completions at a time: two scores that each
    wait for the other (a barrier of 2) finish only when two run at once; the order is kept. A task
    that runs none scores one at a time. resolve_run hands --reward-workers to the task; a file task
    with the `tests` reward runs programs."""
    import threading

    from denser.tasks.base import Score, Task
    from denser.trainers import resolve_run

    class Waits(Task):
        name, runs_programs = "waits", True

        def __init__(self, parties):
            super().__init__()
            self.barrier = threading.Barrier(parties, timeout=10)

        def check(self, completion, row):
            self.barrier.wait()
            return Score(float(completion), None, None)

    task = Waits(2)
    task.reward_workers = 2
    assert [s.score for s in task.score_batch(["1", "0", "1", "0"], [{}] * 4)] == [1.0, 0.0, 1.0, 0.0]
    one = Waits(1)
    one.runs_programs = False
    one.reward_workers = 2  # ignored: nothing to wait for, no threads
    assert [s.score for s in one.score_batch(["1", "0"], [{}] * 2)] == [1.0, 0.0]

    run = resolve_run({"model": "tiny", "reward_workers": 3, "output_dir": str(tmp_path / "r")}, "grpo", "code")
    assert run.task.reward_workers == 3 and run.task.runs_programs
    assert resolve_run({"model": "tiny"}, "grpo", "code?workers=2").task.reward_workers == 2
    with pytest.raises(ValueError, match="--reward-workers must be >= 0"):
        resolve_run({"model": "tiny", "reward_workers": -1}, "grpo", "code")
    data = tmp_path / "t.jsonl"
    data.write_text('{"prompt": "p", "tests": [{"input": "1", "output": "1", "testtype": "stdin"}]}\n')
    assert get_task(f"file:{data}?reward=tests&answer_column=tests").runs_programs
    assert not get_task(f"file:{data}?answer_column=tests").runs_programs
