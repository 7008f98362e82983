"""experiments/continual_grid.py: the determinism check that compares a rerun's record with the committed one."""

import copy
import importlib.util
import random
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "experiments" / "continual_grid.py"


@pytest.fixture(scope="module")
def grid():
    spec = importlib.util.spec_from_file_location("continual_grid", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(rng: random.Random, out: str, stages: int = 4, done: int | None = None) -> dict:
    done = stages if done is None else done
    rows = [[rng.random() for _ in range(5)] for _ in range(stages)]
    return {
        "config": {"output_dir": out, "seed": 0},
        "command": f"denser continual --output-dir {out}",
        "status": "complete" if done == stages else "running",
        "metrics": {"average_accuracy": [rng.random() for _ in range(stages)]} if done == stages else None,
        "elapsed_s": rng.random() * 1e3,
        "accuracy_matrix": rows[:done],
        "stages": [{"stage": k, "checkpoint": f"{out}/stages/{k:02d}/checkpoints/step-000008",
                    "measure_time_s": rng.random(), "params": {"relative_l2": rng.random()},
                    "train": {"time_s": rng.random(), "loss": rng.random(),
                              "steps_log": [{"step": i, "loss": rng.random(), "step_time_s": rng.random()}
                                            for i in range(3)]}}
                   for k in range(done)],
    }


def _rerun_of(original: dict, out: str, rng: random.Random) -> dict:
    """The same record, run again into ``out``: other wall-clock times, other paths."""
    text = repr(original).replace(original["config"]["output_dir"], out)
    rerun = eval(text)  # noqa: S307 (our own repr of plain data)
    rerun["elapsed_s"] = rng.random() * 1e3
    for stage in rerun["stages"]:
        stage["measure_time_s"] = rng.random()
        stage["train"]["time_s"] = rng.random()
        for row in stage["train"]["steps_log"]:
            row["step_time_s"] = rng.random()
    return rerun


def test_a_rerun_that_differs_only_in_times_and_its_directory_is_identical(grid):
    rng = random.Random(1)
    original = _record(rng, "/a/runs/continual_grid/x")
    rerun = _rerun_of(original, "/b/runs/continual_grid_rerun/x", rng)
    assert grid.record_differences(original, rerun, "/a/runs/continual_grid/x", "/b/runs/continual_grid_rerun/x") == ([], 4)


@pytest.mark.parametrize("where", ["matrix", "loss", "drift", "config"])
def test_any_other_difference_is_reported(grid, where):
    rng = random.Random(2)
    original = _record(rng, "/a/x")
    rerun = _rerun_of(original, "/b/x", rng)
    if where == "matrix":
        rerun["accuracy_matrix"][2][3] += 1 / 48
        expected = ".accuracy_matrix[2][3]"
    elif where == "loss":
        rerun["stages"][3]["train"]["steps_log"][1]["loss"] *= 1 + 1e-7
        expected = ".stages[3].train.steps_log[1].loss"
    elif where == "drift":
        rerun["stages"][1]["params"]["relative_l2"] += 1e-12
        expected = ".stages[1].params.relative_l2"
    else:
        rerun["config"]["seed"] = 1
        expected = ".config.seed"
    assert grid.record_differences(original, rerun, "/a/x", "/b/x") == ([expected], 4)


def test_a_rerun_still_going_is_compared_on_its_finished_stages(grid):
    rng = random.Random(3)
    original = _record(rng, "/a/x")
    partial = _rerun_of(original, "/b/x", rng)
    partial["stages"], partial["accuracy_matrix"] = partial["stages"][:2], partial["accuracy_matrix"][:2]
    partial["status"], partial["metrics"], partial["in_progress"] = "running", None, {"stage": 2}
    assert grid.record_differences(original, partial, "/a/x", "/b/x") == ([], 2)
    wrong = copy.deepcopy(partial)
    wrong["accuracy_matrix"][1][0] = 1 - wrong["accuracy_matrix"][1][0]
    assert grid.record_differences(original, wrong, "/a/x", "/b/x") == ([".accuracy_matrix[1][0]"], 2)
    # a finished rerun with a stage missing is a difference, not a partial comparison
    short = copy.deepcopy(partial)
    short["status"] = "complete"
    diffs, _ = grid.record_differences(original, short, "/a/x", "/b/x")
    assert ".accuracy_matrix (length 4 vs 2)" in diffs and ".stages (length 4 vs 2)" in diffs


def test_verify_says_what_is_missing(grid, capsys, tmp_path):
    assert grid.verify("grpo-s0", tmp_path / "nowhere") == 2
    assert "needs a rerun" in capsys.readouterr().err


def test_diff_separates_what_runs_measured_from_what_they_were_told(grid, tmp_path, capsys):
    rng = random.Random(4)
    sdpo = _record(rng, "/w/sdpo")
    sdpo.update(objective="sdpo", objective_args={"alpha": 0.5})
    hybrid = _rerun_of(sdpo, "/w/hybrid", rng)
    hybrid.update(objective="hybrid", objective_args={"alpha": 0.5, "lam": 0.0})
    hybrid["command"] = hybrid["command"] + " --objective hybrid --lam 0"
    for name, record in (("hybrid_lam0-s0", hybrid), ("sdpo_ema-s0", sdpo)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "continual.json").write_text(grid.json.dumps(record))
    assert grid.diff_runs("hybrid_lam0-s0", "sdpo_ema-s0", tmp_path) == 0
    text = (tmp_path / "diff-hybrid_lam0-s0-sdpo_ema-s0.md").read_text()
    assert "the same measurements (4 stages)" in text and "measured fields that differ: none" in text
    assert "differs: .command, .objective, .objective_args.lam" in text
    # one step's loss apart is a measured difference
    hybrid["stages"][2]["train"]["steps_log"][0]["loss"] += 1e-9
    (tmp_path / "runs" / "hybrid_lam0-s0" / "continual.json").write_text(grid.json.dumps(hybrid))
    assert grid.diff_runs("hybrid_lam0-s0", "sdpo_ema-s0", tmp_path) == 1
    assert "measured fields that differ: .stages[2].train.steps_log[0].loss" in capsys.readouterr().out
    assert grid.diff_runs("hybrid_lam0-s0", "grpo-s1", tmp_path) == 2
