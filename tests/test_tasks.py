"""Tasks: deterministic disjoint splits, answer extraction, rewards with feedback, file tasks."""

from __future__ import annotations

import json

import pytest

from denser.tasks import (
    DEFAULT_TASK,
    FileTaskError,
    Score,
    Task,
    extract_answer,
    get_task,
    list_tasks,
    parse_number,
    task_descriptions,
)

BUILTIN = list_tasks()
#: the tasks with an ``Answer:`` line; ``code`` runs programs instead (tests/test_code_task.py)
ANSWER_TASKS = [n for n in BUILTIN if n != "code"]


def test_registry_lists_builtin_tasks():
    assert len(BUILTIN) >= 4
    assert {"addition", "reverse", "format", "logic"} <= set(BUILTIN)
    assert DEFAULT_TASK in BUILTIN
    assert all(task_descriptions()[n] for n in BUILTIN)


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError) as err:
        get_task("no_such_task")
    msg = str(err.value)
    assert "no_such_task" in msg and all(n in msg for n in BUILTIN) and "file:" in msg


def test_inline_options_and_bad_options():
    task = get_task("arithmetic?seed=3&num_train=10&num_eval=5")
    assert (task.seed, len(task.train), len(task.eval)) == (3, 10, 5)
    with pytest.raises(TypeError, match="bad options"):
        get_task("arithmetic", colour="blue")


@pytest.mark.parametrize("name", BUILTIN)
def test_splits_deterministic_and_disjoint(name):
    a, b = get_task(name, seed=0), get_task(name, seed=0)
    assert a.train.to_list() == b.train.to_list() and a.eval.to_list() == b.eval.to_list()
    assert len(a.train) > 0 and len(a.eval) > 0
    assert not set(a.train["question"]) & set(a.eval["question"])
    assert len(set(a.train["question"])) == len(a.train)
    c = get_task(name, seed=1)
    assert c.train["question"] != a.train["question"]


@pytest.mark.parametrize("name", ANSWER_TASKS)
def test_reward_right_wrong_and_missing(name):
    task = get_task(name, num_train=20, num_eval=5)
    for row in task.eval:
        messages = task.prompt(row)
        assert messages[-1] == {"role": "user", "content": row["question"]}
        assert "Answer:" in row["question"]
        right = task.score(f"Let me think.\nAnswer: {row['answer']}", row)
        assert right == Score(1.0, None, row["answer"]) and task.is_success(right)
        assert task.score(f"\\boxed{{{row['answer']}}}", row).score == 1.0
        wrong = task.score("Answer: zzz 12345 zzz", row)
        assert wrong.score == 0.0 and not task.is_success(wrong)
        assert isinstance(wrong.feedback, str) and 0 < len(wrong.feedback) < 200
        missing = task.score(f"I think it is {row['answer']}", row)
        assert missing.score == 0.0 and missing.answer is None and "Answer:" in missing.feedback
        # feedback never gives the solution away
        assert row["answer"] not in (wrong.feedback or "").split()


def test_few_shot_examples_are_outside_the_problem_space():
    for name in ANSWER_TASKS:
        task = get_task(name, num_train=3000, num_eval=10)  # every problem of the small tasks
        assert task.examples, name
        questions = set(task.train["question"]) | set(task.eval["question"])
        assert all(q not in questions for q, _ in task.examples)
        # each worked example is itself scored right by the task's reward rule
        assert all(extract_answer(reply) is not None for _, reply in task.examples)
        plain = get_task(name, few_shot=False, num_train=50, num_eval=10)
        assert plain.prompt(plain.eval[0]) == [{"role": "user", "content": plain.eval[0]["question"]}]


def test_specific_feedback():
    add = get_task("addition")
    row = {"question": "What is 3 + 4?", "answer": "7"}
    assert add.score("Answer: 9", row).feedback == "Your answer 9 is wrong: it is too high."
    assert add.score("Answer: 5", row).feedback == "Your answer 5 is wrong: it is too low."
    assert "not a single number" in add.score("Answer: 3 or 4", row).feedback
    assert add.score("3 + 4 = 7.\nAnswer: 3 + 4 = 7", row).score == 1.0

    rev = get_task("reverse")
    row = {"question": "q", "answer": "tac", "word": "cat"}
    assert "unchanged" in rev.score("Answer: cat", row).feedback
    assert "wrong order" in rev.score("Answer: atc", row).feedback
    assert "length" in rev.score("Answer: tacs", row).feedback
    assert rev.score("Answer: T-A-C", row).score == 1.0

    logic = get_task("logic")
    row = {"question": "q", "answer": "Ann", "people": "Ann Bob Cid", "ask": "tallest"}
    assert logic.score("Answer: Ann.", row).score == 1.0
    assert logic.score("Answer: Bob", row).feedback == "Bob is not the tallest: Ann is taller than Bob."
    assert "exactly one" in logic.score("Answer: Ann or Bob", row).feedback

    fmt = get_task("format")
    row = {"question": "q", "answer": "CAT", "word": "cat", "kind": "upper"}
    assert fmt.score("Answer: CAT", row).score == 1.0
    assert "capital" in fmt.score("Answer: Cat", row).feedback
    assert "itself" in fmt.score("Answer: dog", row).feedback
    row = {"question": "q", "answer": "[cat]", "word": "cat", "kind": "brackets"}
    assert "square brackets" in fmt.score("Answer: (cat)", row).feedback
    row = {"question": "q", "answer": "c-a-t", "word": "cat", "kind": "dashes"}
    assert "dash" in fmt.score("Answer: c a t", row).feedback


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: 7", "7"),
        ("answer: 7.", "7"),
        ("**Answer:** 42", "42"),
        ("Final answer: -3", "-3"),
        ("The answer is 12.", "12"),
        ("Answer:\n\n  8", "8"),
        ("so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("Answer: 3\nwait, no.\nAnswer: 5", "5"),  # the last marker wins
        ("\\boxed{4} ... Answer: 6", "6"),
        ("Answer: 6 ... \\boxed{4}", "4"),
        ("Answer: \\boxed{9}", "9"),
        ("Answer: 'tac'", "tac"),
        ("no marker 7", None),
        ("", None),
        ("the canswer: 5", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_parse_number():
    assert parse_number("7") == 7 and parse_number("+7.0") == 7 and parse_number("1,000") == 1000
    assert parse_number("x = 12") == 12 and parse_number("3 + 4 = 7") == 7
    assert parse_number("3 or 4") is None and parse_number("seven") is None and parse_number(None) is None


def test_too_few_problems_for_eval():
    with pytest.raises(ValueError, match="distinct problems"):
        _ = get_task("addition", num_eval=196).train


# ---------------------------------------------------------------------------------------- file tasks


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_file_task_exact_numeric_contains(tmp_path):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    task = get_task(f"file:{path}?reward=numeric&eval_fraction=0.25")
    assert isinstance(task, Task) and len(task.train) == 15 and len(task.eval) == 5
    assert not set(task.train["question"]) & set(task.eval["question"])
    again = get_task(f"file:{path}", reward="numeric", eval_fraction=0.25)
    assert again.eval["question"] == task.eval["question"]
    row = task.eval[0]
    assert task.prompt(row)[-1]["content"].endswith("End with 'Answer: <answer>'.")
    assert task.score(f"Answer: {row['answer']}.0", row).score == 1.0
    assert "too high" in task.score(f"Answer: {int(row['answer']) + 1}", row).feedback

    exact = get_task(f"file:{path}", reward="exact")
    assert exact.score(f"  {row['answer']} ", row).score == 1.0  # no marker: the whole reply
    assert exact.score("Answer: nope", row).score == 0.0

    contains = get_task(f"file:{path}", reward="contains")
    assert "Answer" not in contains.prompt(row)[-1]["content"]
    assert contains.score(f"it is {row['answer']} I think", row).score == 1.0
    assert contains.score("no idea", row).feedback


def test_file_task_split_column_messages_and_parquet(tmp_path):
    rows = [
        {"prompt": "a?", "answer": "A", "split": "train"},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "b?"}], "answer": "B",
         "split": "train"},
        {"prompt": "c?", "answer": "C", "split": "test"},
    ]
    task = get_task(f"file:{_write_jsonl(tmp_path / 's.jsonl', rows)}")
    assert task.train["answer"] == ["A", "B"] and task.eval["answer"] == ["C"]
    assert task.prompt(task.train[1])[0] == {"role": "system", "content": "Be brief."}

    from datasets import Dataset

    pq = tmp_path / "d.parquet"
    Dataset.from_list([{"prompt": f"q{i}", "answer": i} for i in range(10)]).to_parquet(str(pq))
    task = get_task(f"file:{pq}", reward="numeric")
    assert len(task.train) + len(task.eval) == 10 and task.train[0]["answer"].isdigit()


def test_file_task_errors(tmp_path):
    with pytest.raises(FileTaskError, match="does not exist"):
        get_task(f"file:{tmp_path / 'missing.jsonl'}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(FileTaskError, match="no rows"):
        get_task(f"file:{empty}")
    nocol = _write_jsonl(tmp_path / "nocol.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(FileTaskError, match=r"missing column\(s\) prompt.*found: answer, question"):
        get_task(f"file:{nocol}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(FileTaskError, match="line 2"):
        get_task(f"file:{bad}")
    words = _write_jsonl(tmp_path / "w.jsonl", [{"prompt": "q", "answer": "seven"}])
    with pytest.raises(FileTaskError, match="not a single number"):
        get_task(f"file:{words}", reward="numeric")
    with pytest.raises(FileTaskError, match="unknown reward"):
        get_task(f"file:{words}", reward="fuzzy")
    other = tmp_path / "d.txt"
    other.write_text("x")
    with pytest.raises(FileTaskError, match="unsupported extension"):
        get_task(f"file:{other}")


# ------------------------------------------------------------------------------- continual-learning tasks

CONTINUAL_TASKS = ("larger", "smaller", "multiply", "units", "subtract")
# independent table of the unit conversions the `units` task asks about
FACTORS = {("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("weeks", "days"): 7, ("days", "hours"): 24,
           ("meters", "centimeters"): 100, ("kilograms", "grams"): 1000, ("dozens", "eggs"): 12,
           ("years", "months"): 12}


def _expected(name: str, question: str) -> int:
    """The right answer, recomputed from the question text alone."""
    import re

    if name in ("larger", "smaller"):
        a, b = map(int, re.fullmatch(r"Which number is (?:larger|smaller): (\d+) or (\d+)\? .*", question).groups())
        assert a != b and 10 <= min(a, b) and max(a, b) <= 99
        return max(a, b) if name == "larger" else min(a, b)
    if name == "units":
        n, big = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\? .*", question).groups()[1:]
        small = re.fullmatch(r"How many (\w+) are in.*", question).group(1)
        return int(n) * FACTORS[(big, small)]
    a, op, b = re.fullmatch(r"What is (\d+) ([*-]) (\d+)\? .*", question).groups()
    return int(a) * int(b) if op == "*" else int(a) - int(b)


@pytest.mark.parametrize("name", CONTINUAL_TASKS)
def test_continual_tasks_answers_and_ranges(name):
    task = get_task(name, seed=3)
    assert name in BUILTIN and task.suggested_max_new_tokens == 24
    assert len(task.eval) == 48 and len(task.train) >= 100  # 48 eval prompts, and a train split to learn from
    for row in list(task.eval) + list(task.train)[:200]:
        assert int(row["answer"]) == _expected(name, row["question"]), row
        assert row["question"].endswith("End with 'Answer: <number>'.")
    ops = {"multiply": (3, 19), "subtract": (1, 19)}
    if name in ops:
        lo, hi = ops[name]
        for q in task.train["question"]:
            a, b = (int(x) for x in q.split("?")[0].split()[-3::2])  # "What is A op B?"
            assert lo <= a <= hi and lo <= b <= hi
            assert name != "subtract" or a >= b  # non-negative differences
    # the same seed gives the same problems, another seed other ones
    assert get_task(name, seed=3).eval.to_list() == task.eval.to_list()
    assert get_task(name, seed=4).eval["question"] != task.eval["question"]


def test_larger_smaller_feedback_and_example_pair():
    larger, smaller = get_task("larger"), get_task("smaller")
    row = {"question": "Which number is larger: 38 or 83? End with 'Answer: <number>'.", "answer": "83", "other": "38"}
    assert larger.score("Answer: 83", row) == Score(1.0, None, "83")
    assert larger.score("83 is larger than 38.\nAnswer: **83**.", row).score == 1.0
    assert larger.score("Answer: 38", row).feedback == "38 is the smaller of the two numbers."
    assert larger.score("Answer: 8", row).feedback == "Your answer '8' is not one of the two numbers."
    assert larger.score("Answer: 38 or 83", row).score == 0.0
    srow = {"question": "q", "answer": "38", "other": "83"}
    assert smaller.score("Answer: 38", srow).score == 1.0
    assert smaller.score("Answer: 83", srow).feedback == "83 is the larger of the two numbers."
    # the worked example's pair (and its mirror) never appears as a problem
    for task in (larger, smaller):
        big = get_task(task.name, num_train=8000, num_eval=10)  # every pair but the example's
        pairs = {tuple(sorted(map(int, q.split(":")[1].split("?")[0].split(" or ")))) for q in
                 list(big.train["question"]) + list(big.eval["question"])}
        assert (47, 74) not in pairs and len(pairs) == 90 * 89 // 2 - 1


def test_arithmetic_and_units_feedback():
    mul = get_task("multiply")
    row = {"question": "What is 13 * 7? End with 'Answer: <number>'.", "answer": "91"}
    assert mul.score("13 * 7 = 91\nAnswer: 91", row).score == 1.0
    assert mul.score("13 * 7 = 81\nAnswer: 81", row).feedback == "Your answer 81 is wrong: it is too low."
    sub = get_task("subtract")
    row = {"question": "What is 12 - 1? End with 'Answer: <number>'.", "answer": "11"}
    assert sub.score("12 - 1 = 11\nAnswer: 11", row).score == 1.0
    assert sub.score("12 - 1 = 12\nAnswer: 12", row).feedback == "Your answer 12 is wrong: it is too high."
    assert "Answer:" in sub.score("12 - 1 = 11", row).feedback  # no marker: told how to answer
    units = get_task("units")
    row = {"question": "How many minutes are in 3 hours? End with 'Answer: <number>'.", "answer": "180",
           "unit": "minutes"}
    assert units.score("3 * 60 = 180\nAnswer: 180", row).score == 1.0
    assert units.score("Answer: 180 minutes", row).score == 1.0
    assert units.score("Answer: 300", row).feedback == "Your answer 300 is wrong: it is too high."
    assert units.score("Answer: 3 or 180", row).feedback == "Your answer '3 or 180' is not a single number of minutes."
    assert units.score("3 hours", row).feedback == "No final answer found. End with 'Answer: <number of minutes>'."
