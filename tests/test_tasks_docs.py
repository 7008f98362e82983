"""docs/tasks.md: the custom reward and the custom task run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from denser.tasks import list_rewards, list_tasks, unregister_reward, unregister_task

DOC = Path(__file__).resolve().parents[1] / "docs" / "tasks.md"


def block(heading: str) -> str:
    section = DOC.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r}"
    return match.group(1)


def _run(code: str) -> dict:
    namespace: dict = {"__name__": "docs_tasks"}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace


def test_custom_reward_example_runs(tmp_path, monkeypatch, capsys):
    code = block("Write your own reward")
    assert len(code.strip().splitlines()) <= 20
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(2, 12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    unregister_reward("brevity")
    try:
        ns = _run(code)
        assert "brevity" in list_rewards() and "Score(" in capsys.readouterr().out
        task, row = ns["task"], ns["task"].train[0]
        assert task.rewards.names == ["exact", "brevity"] and task.success_threshold == pytest.approx(1.2)
        right = task.score(f"Answer: {row['answer']}", row)
        assert right.score == pytest.approx(1.2) and right.rewards == {"exact": 1.0, "brevity": 1.0}
        long = task.score("word " * 40 + f"\nAnswer: {row['answer']}", row)
        assert long.score == pytest.approx(1.0) and long.feedback == "Your reply has 42 words; stay under 30."
    finally:
        unregister_reward("brevity")


def test_custom_task_example_runs(capsys):
    code = block("Write your own task")
    assert len(code.strip().splitlines()) <= 25
    unregister_task("double")
    try:
        ns = _run(code)
        assert "double" in list_tasks() and "What is twice" in capsys.readouterr().out
        task = ns["task"]
        assert len(task.train) == 100 and len(task.eval) == 10
        assert not set(task.train["question"]) & set(task.eval["question"])
        row = task.eval[0]
        assert task.score(f"Answer: {row['answer']}", row).score == 1.0
        wrong = task.score("Answer: 1", row)
        assert wrong.score == 0.0 and wrong.feedback == "Your answer 1 is wrong."
        assert "Answer:" in task.score("no idea", row).feedback
    finally:
        unregister_task("double")
