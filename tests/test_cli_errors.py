"""Bad input fails before any compute, from the command line, with one clear line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from denser.cli import main
from denser.engines import HFRolloutEngine
from denser.trainers import loop

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--steps", "2", "--max-new-tokens", "4", "--num-generations", "2", "--prompts-per-step", "2",
        "--eval-size", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    """Every error here must come before the first generation."""

    def generate(*a, **k):
        raise AssertionError("generation started: the error should have come before any compute")

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)


def fails(capsys, argv, *needles) -> str:
    """``denser train ARGV`` exits 2 with exactly one line on stderr holding every needle."""
    code = main(["train", *argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("denser train: error: "), line
    assert "Traceback" not in out + err and "usage:" not in out + err
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _config(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------------- config files


def test_config_unknown_key_names_it_and_lists_the_valid_ones(tmp_path, capsys):
    fails(capsys, ["--config", _config(tmp_path, "objective: grpo\nlearning_rate: 0.1\n")],
          "unknown key 'learning_rate'", "valid keys:", "lr", "steps", "clip_low")
    fails(capsys, ["--config", _config(tmp_path, "num-generation: 4\n")], "unknown key 'num-generation'",
          "did you mean 'num_generations'?")
    fails(capsys, ["--config", _config(tmp_path, "objective: sdpo\nobjective_args:\n  clip_low: 0.1\n")],
          "unknown key 'clip_low'", "valid objective_args of 'sdpo'", "alpha")
    # the command line's objective decides which keys are valid
    fails(capsys, ["--objective", "grpo", "--config", _config(tmp_path, "alpha: 0.3\n")], "unknown key 'alpha'")


@pytest.mark.parametrize("text, needles", [
    ("steps: three\n", ["key 'steps' must be an int", "'three'"]),
    ("steps: 2.5\n", ["key 'steps' must be an int"]),
    ("lr: [0.1]\n", ["key 'lr' must be a float"]),
    ("resume: maybe\n", ["key 'resume' must be a bool"]),
    ("objective: sdpo\nalpha: high\n", ["key 'alpha' must be a float"]),
    ("objective: sdpo\nteacher: warm\n", ["key 'teacher' must be one of", "'ema'"]),
    ("dtype: float16\n", ["key 'dtype' must be one of", "'bfloat16'"]),
    ("objective: 3\n", ["'objective' must be a name"]),
    ("objective: nope\n", ["unknown objective 'nope'", "grpo"]),
    ("steps: [\n", ["not valid YAML"]),
    ("- steps\n- 3\n", ["expected a mapping", "list"]),
    ("objective_args: 3\n", ["'objective_args' must be a mapping"]),
    ("steps: 0\n", ["--steps must be >= 1, got 0"]),
])
def test_config_wrong_types_and_values_name_the_key(tmp_path, capsys, text, needles):
    fails(capsys, ["--config", _config(tmp_path, text)], *needles)


def test_config_file_that_cannot_be_read(tmp_path, capsys):
    fails(capsys, ["--config", str(tmp_path / "missing.yaml")], "no such file")
    fails(capsys, ["--config", str(tmp_path)], "no such file")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00steps")
    fails(capsys, ["--config", str(tmp_path / "bin.yaml")], "not a UTF-8 text file")


# ---------------------------------------------------------------------------------- flags


@pytest.mark.parametrize("argv, needles", [
    (["--steps", "x"], ["argument --steps: 'x' is not a valid int", "--help"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["--objective"], ["argument --objective: expected one argument"]),
    (["--dtype", "float16"], ["argument --dtype: invalid choice: 'float16'"]),
    (["--objective", "nope"], ["unknown objective 'nope'", "sdpo"]),
    (["--lr", "nan"], ["--lr must be a finite number"]),
    (["--lr", "-1"], ["--lr must be > 0"]),
    (["--top-p", "2"], ["--top-p must be in (0, 1]"]),
    (["--backend", "cuda"], ["--backend must be one of", "chunked"]),
    (["--resume", "--overwrite"], ["contradict"]),
    (["--objective", "sdpo", "--alpha", "2"], ["objective 'sdpo'", "alpha=2.0 must be in [0, 1]"]),
    (["--unrecognized\nflag"], ["unrecognized arguments"]),  # a newline in user input stays on one line
])
def test_bad_flags_are_one_line(capsys, argv, needles):
    fails(capsys, argv, *needles)


# ----------------------------------------------------------------------------- run directories


def test_an_output_dir_holding_another_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("objective: grpo\n")
    fails(capsys, [*TINY, "--objective", "grpo", "--output-dir", str(run)], "already holds a run", "--resume",
          "--overwrite", "--output-dir")
    other = tmp_path / "other"
    (other / "checkpoints").mkdir(parents=True)  # checkpoints without a config.yaml are a run too
    fails(capsys, [*TINY, "--objective", "grpo", "--output-dir", str(other)], "already holds a run (checkpoints)")
    afile = tmp_path / "file"
    afile.write_text("x")
    fails(capsys, [*TINY, "--output-dir", str(afile)], "is a file, not a directory")
    assert not (other / "config.yaml").exists()  # a refused run writes nothing


def test_overwrite_replaces_only_the_run_files(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000001").mkdir(parents=True)
    (run / "config.yaml").write_text("objective: sdpo\n")
    (run / "metrics.jsonl").write_text('{"step": 0}\n')
    (run / "notes.txt").write_text("mine")
    monkeypatch.setattr(loop.Trainer, "train", lambda self: {})
    assert main(["train", *TINY, "--objective", "grpo", "--output-dir", str(run), "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["objective"] == "grpo"


@pytest.mark.parametrize("old, argv, needles", [
    ({"objective": "grpo", "model": "tiny", "task": "addition"}, ["--objective", "sdpo"],
     ["holds a different run", "objective 'grpo' -> 'sdpo'", "--config"]),
    ({"objective": "grpo", "model": "default", "task": "addition"}, ["--objective", "grpo"],
     ["model 'default' -> 'tiny'"]),
    ({"objective": "grpo", "model": "tiny", "task": "compare"}, ["--objective", "grpo"],
     ["task 'compare' -> 'addition'"]),
])
def test_resume_of_a_different_run_says_what_differs(tmp_path, capsys, old, argv, needles):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(old))
    fails(capsys, [*TINY, *argv, "--task", "addition", "--output-dir", str(run), "--resume"], *needles)


def test_resume_beyond_steps_and_unreadable_run_config(tmp_path, capsys):
    run = tmp_path / "run"
    from denser.trainers import checkpoint as ckpt

    step5 = run / "checkpoints" / "step-000005"
    (step5 / "state").mkdir(parents=True)
    for name in ckpt.STATE_FILES:  # contents never read: the step alone is beyond --steps
        (step5 / "state" / name).write_text("{}")
    (step5 / "COMPLETE").write_text(json.dumps(ckpt.manifest(step5, 5)))
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": "grpo", "model": "tiny", "task": "addition"}))
    fails(capsys, [*TINY, "--objective", "grpo", "--output-dir", str(run), "--resume"],
          "step-000005 is at step 5, beyond --steps 2", "--steps 5")
    (run / "config.yaml").write_text("objective: [")
    fails(capsys, [*TINY, "--objective", "grpo", "--output-dir", str(run), "--resume"], "cannot read", "config.yaml")


# ------------------------------------------------------------------------------------- data


def _jsonl(tmp_path, rows, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"file:{path}"


def test_prompts_longer_than_the_context_fail_before_compute(tmp_path, capsys):
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    rows[5]["prompt"] = "x" * 1100  # the tiny model is byte-level with a 1024-token context
    task = _jsonl(tmp_path, rows)
    run = tmp_path / "run"
    fails(capsys, [*TINY, "--objective", "grpo", "--task", task, "--steps", "20", "--output-dir", str(run)],
          "row", "exceeds the model's context of 1024 tokens", "--max-new-tokens")
    assert not run.exists()  # nothing written
    fails(capsys, [*TINY, "--objective", "grpo", "--task", "addition", "--max-new-tokens", "1000",
                   "--output-dir", str(run)], "with --max-new-tokens 1000 it exceeds the model's context")


@pytest.mark.parametrize("rows, needles", [
    ([{"question": "What is 1 + 1?", "answer": "2"}], ["missing column(s) prompt", "found: answer, question"]),
    ([{"prompt": "What is 1 + 1?"}], ["missing column(s) answer"]),
    ([], ["has no rows"]),
    ([{"prompt": "a?", "answer": "1", "split": "eval"}], ["no training rows"]),
])
def test_bad_task_files(tmp_path, capsys, rows, needles):
    fails(capsys, [*TINY, "--task", _jsonl(tmp_path, rows), "--output-dir", str(tmp_path / "run")], *needles)


def test_bad_task_names_and_options(tmp_path, capsys):
    fails(capsys, [*TINY, "--task", f"file:{tmp_path / 'none.jsonl'}", "--output-dir", str(tmp_path / "r")],
          "does not exist")
    fails(capsys, [*TINY, "--task", "addition?bogus=1", "--output-dir", str(tmp_path / "r")], "bad options")
    fails(capsys, [*TINY, "--task", "nope", "--output-dir", str(tmp_path / "r")], "unknown task 'nope'", "addition")


def test_an_empty_training_split_is_an_error_before_loading_the_model(tmp_path):
    from datasets import Dataset

    from denser.cli import parse_train_args
    from denser.tasks import get_task

    task = get_task("addition")
    task._splits = (Dataset.from_list([]), task.eval)
    cfg, objective = parse_train_args([*TINY, "--objective", "grpo", "--output-dir", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="task 'addition' has no training rows"):
        loop.Trainer(cfg, objective, task=task)


def test_the_installed_entry_point_prints_one_line_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: many\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "denser", "train", "--config", str(bad)], capture_output=True,
                          text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"denser train: error: --config {bad}: key 'steps' must be an int, "
                                                "got 'many' (str)"]
    proc = subprocess.run([sys.executable, "-m", "denser", "train", "--steps"], capture_output=True, text=True,
                          env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "usage" not in proc.stderr


def test_denser_score_prints_reward_and_feedback_as_json(tmp_path, capsys):
    """`denser score` scores one completion against one row (the task's own check, independently
    recomputed here) and exits 0 whatever the completion; bad input is one line, exit 2."""
    import json

    from denser.cli import main
    from denser.tasks import get_task

    task = get_task("addition", seed=3)
    row = task.train[2]
    right, wrong = tmp_path / "right.txt", tmp_path / "wrong.txt"
    right.write_text(f"Let me add.\nAnswer: {row['answer']}")
    wrong.write_text("no answer here")
    for path, reward in ((right, 1.0), (wrong, 0.0)):
        assert main(["score", "--task", "addition", "--seed", "3", "--row", "2", "--completion", str(path)]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["reward"] == reward == task.score(path.read_text(), row).score
        assert out["success"] is (reward == 1.0) and out["row"] == 2 and out["task"] == "addition"
    assert out["feedback"] and out["feedback"] == task.score("no answer here", row).feedback
    for argv, message in ((["--task", "addition", "--row", "99999", "--completion", str(right)], "outside the train split"),
                          (["--task", "nosuchtask", "--row", "0", "--completion", str(right)], "--task nosuchtask"),
                          (["--task", "addition", "--row", "0", "--completion", str(tmp_path / "none")], "no such file")):
        assert main(["score", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
