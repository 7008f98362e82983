"""file: and hf: tasks load through ``datasets``: every format round-trips, answers stay strings,
bad columns and splits are one line naming what exists, and nothing touches the network."""

from __future__ import annotations

import json
import socket

import datasets
import huggingface_hub.constants
import pytest
from datasets import Dataset, DatasetDict

from denser.cli import main
from denser.engines import HFRolloutEngine
from denser.tasks import FileTaskError, HFTask, get_task

ANSWERS = ["007", "12", "NA", "x = 3", "\\frac{1}{2}", "-0.50", "None", "true"]
ROWS = [{"prompt": f"Question {i}?", "answer": a, "level": str(i % 3)} for i, a in enumerate(ANSWERS)]
TINY = ["--model", "tiny", "--steps", "2", "--max-new-tokens", "4", "--num-generations", "2", "--prompts-per-step", "2",
        "--eval-size", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Offline mode, a private datasets cache, and any socket connection recorded as a failure."""
    attempts = []

    def connect(self, address, *a, **k):
        attempts.append(address)
        raise OSError(f"network access in a test: {address}")

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    yield
    assert not attempts, f"the test tried the network: {attempts}"


def _all_rows(task):
    return sorted((r["question"], r["answer"]) for split in (task.train, task.eval) for r in split)


def _expected(rows=ROWS):
    return sorted((r["prompt"], r["answer"]) for r in rows)


def _write(tmp_path, fmt: str, rows=ROWS):
    """``rows`` written in ``fmt`` the way a user would, with pandas/json/datasets writers."""
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        import pandas as pd

        path = tmp_path / "d.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        Dataset.from_list(rows).to_parquet(str(path))
    elif fmt == "arrow":
        Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
        path = next((tmp_path / "saved").glob("*.arrow"))
    elif fmt == "save_to_disk":
        path = tmp_path / "saved"
        Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise AssertionError(fmt)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "arrow", "save_to_disk"])
def test_every_format_round_trips_with_answers_as_strings(tmp_path, fmt):
    path = _write(tmp_path, fmt)
    task = get_task(f"file:{path}?eval_fraction=0.25", seed=3)
    assert _all_rows(task) == _expected()  # '007' stays '007', 'NA', 'None' and 'true' stay strings
    assert len(task.eval) == 2 and not set(task.train["question"]) & set(task.eval["question"])
    assert all(isinstance(a, str) for a in task.train["answer"])
    row = next(r for r in task.train if r["question"] == "Question 3?") if "Question 3?" in task.train["question"] \
        else next(r for r in task.eval if r["question"] == "Question 3?")
    assert row["level"] == "0" and row["answer"] == "x = 3"  # other columns are kept
    assert task.score("Answer: x = 3", row).score == 1.0
    again = get_task(f"file:{path}?eval_fraction=0.25", seed=3)  # cached or not, the same splits
    assert again.eval.to_list() == task.eval.to_list()


def test_csv_never_infers_numbers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer,n\nWhat is 7?,007,1\nWhat is 1.50?,1.50,2\nEmpty?,,3\n")
    task = get_task(f"file:{path}?eval_fraction=0", reward="contains")
    assert task.train["answer"] == ["007", "1.50", ""] and task.train["n"] == ["1", "2", "3"]
    assert task.score("it is 007", task.train[0]).score == 1.0 and task.score("it is 7", task.train[0]).score == 0.0


def test_json_numbers_become_their_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a?", "answer": 7}\n\n{"prompt": "b?", "answer": "x"}\n{"prompt": "c?", "answer": 2.5}\n')
    task = get_task(f"file:{path}?eval_fraction=0")
    assert task.train["answer"] == ["7", "x", "2.5"]


def test_columns_are_chosen_by_options(tmp_path):
    rows = [{"question": f"q{i}", "solution": str(i), "prompt": "not this"} for i in range(6)]
    path = _write(tmp_path, "jsonl", rows)
    task = get_task(f"file:{path}?prompt_column=question&answer_column=solution&eval_fraction=0")
    assert task.train["question"] == [f"q{i}" for i in range(6)] and task.train["answer"] == [str(i) for i in range(6)]
    assert task.prompt(task.train[0])[-1]["content"].startswith("q0")


def test_a_bad_column_is_one_line_naming_it_and_the_available_ones(tmp_path):
    path = _write(tmp_path, "parquet")
    with pytest.raises(FileTaskError) as err:
        get_task(f"file:{path}?prompt_column=question")
    msg = str(err.value)
    assert "\n" not in msg and "missing column(s) question (prompt_column)" in msg
    assert "found: answer, level, prompt" in msg
    with pytest.raises(FileTaskError, match=r"missing column\(s\) solution \(answer_column\).*found: answer, level, prompt"):
        get_task(f"file:{path}", answer_column="solution")


def test_a_bad_column_from_the_command_line_fails_before_compute(tmp_path, capsys, monkeypatch):
    def generate(*a, **k):
        raise AssertionError("generation started")

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)
    path = _write(tmp_path, "csv")
    code = main(["train", *TINY, "--task", f"file:{path}?prompt_column=question", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "missing column(s) question" in err[0] and "found: answer, level, prompt" in err[0]
    assert not (tmp_path / "r").exists()


def test_errors_name_the_row(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,answer\nok?,1\n,2\n")
    with pytest.raises(FileTaskError, match=r"row 1: 'prompt' must be a non-empty string"):
        get_task(f"file:{path}")
    path = _write(tmp_path, "parquet", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "two"}])
    with pytest.raises(FileTaskError, match=r"row 1: reward 'numeric': answer 'two' is not a single number"):
        get_task(f"file:{path}", reward="numeric")
    path = _write(tmp_path, "jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}])
    with pytest.raises(FileTaskError, match=r"missing column\(s\) answer \(first in row 1\)"):
        get_task(f"file:{path}")
    header_only = tmp_path / "h.csv"
    header_only.write_text("prompt,answer\n")
    with pytest.raises(FileTaskError, match="has no rows"):
        get_task(f"file:{header_only}")
    with pytest.raises(FileTaskError, match="unsupported extension '.txt'.*.arrow"):
        (tmp_path / "d.txt").write_text("x")
        get_task(f"file:{tmp_path / 'd.txt'}")


def _dataset_dict(tmp_path):
    train = Dataset.from_list([{"question": f"What is {i} + 1?", "target": i + 1} for i in range(8)])
    test = Dataset.from_list([{"question": f"What is {i} + 2?", "target": i + 2} for i in range(3)])
    return DatasetDict(train=train, test=test)


def test_save_to_disk_dataset_dict_uses_its_splits(tmp_path):
    path = tmp_path / "dd"
    _dataset_dict(tmp_path).save_to_disk(str(path))
    opts = "prompt_column=question&answer_column=target"
    task = get_task(f"file:{path}?{opts}&reward=numeric")
    assert len(task.train) == 8 and len(task.eval) == 3 and task.eval["answer"] == ["2", "3", "4"]
    swapped = get_task(f"file:{path}?{opts}&split=test&eval_split=train")
    assert len(swapped.train) == 3 and len(swapped.eval) == 8
    held = get_task(f"file:{path}?{opts}&eval_split=&eval_fraction=0.25")  # no eval split: hold out of train
    assert len(held.train) == 6 and len(held.eval) == 2
    with pytest.raises(FileTaskError, match="no split 'validation'; available splits: train, test"):
        get_task(f"file:{path}?{opts}&eval_split=validation")
    with pytest.raises(FileTaskError, match="single table without named splits"):
        get_task(f"file:{_write(tmp_path, 'jsonl')}?split=train")


def test_hf_task_offline_from_a_save_to_disk_directory(tmp_path):
    path = tmp_path / "dd"
    _dataset_dict(tmp_path).save_to_disk(str(path))
    task = get_task(f"hf:{path}?prompt_column=question&answer_column=target&reward=numeric")
    assert isinstance(task, HFTask) and task.name.startswith("hf:")
    assert len(task.train) == 8 and task.eval["answer"] == ["2", "3", "4"]
    row = task.eval[0]
    assert task.score("Answer: 2", row).score == 1.0 and "too high" in task.score("Answer: 3", row).feedback


def test_hf_task_offline_from_a_directory_of_data_files(tmp_path):
    """A hub dataset repository's layout, cloned: data/<split>-*.parquet, no loading script."""
    repo = tmp_path / "my_dataset"
    (repo / "data").mkdir(parents=True)
    dd = _dataset_dict(tmp_path)
    dd["train"].to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    dd["test"].to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    (repo / "README.md").write_text("# my dataset\n")
    task = get_task(f"hf:{repo}", prompt_column="question", answer_column="target", reward="numeric")
    assert len(task.train) == 8 and len(task.eval) == 3
    same = get_task(f"file:{repo}?prompt_column=question&answer_column=target")  # file: reads it too
    assert same.train["answer"] == task.train["answer"]
    with pytest.raises(FileTaskError, match=r"missing column\(s\) prompt, answer \(first in train row 0\).*found: question, target"):
        get_task(f"hf:{repo}")


def test_hf_task_unknown_dataset_offline_is_one_line(tmp_path):
    with pytest.raises(FileTaskError) as err:
        get_task("hf:nobody-denser-test/no_such_dataset:main?prompt_column=q")
    msg = str(err.value)
    assert "\n" not in msg and "dataset 'nobody-denser-test/no_such_dataset:main'" in msg and "offline" in msg
    with pytest.raises(FileTaskError, match="name a dataset"):
        get_task("hf:")
