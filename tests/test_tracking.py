"""--report-to: what reaches the trackers, read back from TensorBoard's event files; missing
tracker packages and unknown names fail before any compute."""

from __future__ import annotations

import json

import pytest

from denser.cli import main
from denser.engines import HFRolloutEngine
from denser.trainers import tracking
from denser.trainers.tracking import Tracker, flatten_config

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

SMALL = ["--model", "tiny", "--max-new-tokens", "4", "--num-generations", "2", "--prompts-per-step", "2",
         "--eval-size", "2", "--no-progress"]


def events(folder):
    """Scalars ``{tag: {step: value}}`` and texts ``{tag: {step: str}}`` of a TensorBoard folder."""
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
    texts = {t.removesuffix("/text_summary"): {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode()
                                               for e in acc.Tensors(t)} for t in acc.Tags()["tensors"]}
    return scalars, texts


def hparams(folder):
    """The hyper-parameters of a TensorBoard run (written by ``add_hparams`` in a sub-folder)."""
    for sub in folder.iterdir():
        if sub.is_dir() and any(p.name.startswith("events.out") for p in sub.iterdir()):
            acc = EventAccumulator(str(sub))
            acc.Reload()
            data = plugin_data_pb2.HParamsPluginData.FromString(
                acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
            return {k: (v.number_value if v.WhichOneof("kind") == "number_value" else v.string_value)
                    for k, v in data.session_start_info.hparams.items()}
    raise AssertionError(f"no hparams under {folder}")


def test_train_logs_metrics_samples_and_config_to_tensorboard(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--objective", "grpo", *SMALL, "--steps", "2", "--lr", "3e-5", "--report-to", "tensorboard",
                 "--tracker-project", "proj", "--output-dir", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # written as always
    scalars, texts = events(run / "tensorboard" / "proj")
    steps = [r for r in rows if "loss" in r]
    for key in ("reward_mean", "loss", "grad_norm", "response_length", "clip_frac_low"):
        if key in steps[0]:
            assert scalars[key] == pytest.approx({r["step"]: r[key] for r in steps}, rel=1e-6), key
    evals = {r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}
    assert sorted(evals) == [0, 2] and scalars["eval_accuracy"] == pytest.approx(evals)
    assert "processes" not in scalars and "step" not in scalars
    # a few completions per step as a markdown table: prompt, completion, reward
    assert sorted(texts["samples"]) == [1, 2]
    table = texts["samples"][1].split("\n")
    assert table[0] == "| prompt | completion | reward |" and len(table) == 2 + tracking.SAMPLES_PER_STEP
    assert "What is" in table[2]
    params = hparams(run / "tensorboard" / "proj")
    assert params["lr"] == pytest.approx(3e-5) and params["objective"] == "grpo" and params["model"] == "tiny"
    assert params["objective_args/clip_low"] == pytest.approx(0.2)


def test_continual_logs_one_run_with_stage_prefixed_keys(tmp_path, capsys):
    run = tmp_path / "cont"
    assert main(["continual", "--objective", "grpo", "--tasks", "addition,compare", "--eval-tasks", "logic",
                 "--steps-per-task", "2", "--model", "tiny", "--max-new-tokens", "4", "--num-generations", "2",
                 "--prompts-per-step", "2", "--eval-size", "2", "--spectral-rank", "0", "--no-progress",
                 "--report-to", "tensorboard", "--output-dir", str(run)]) == 0
    folders = [p for p in (run / "tensorboard").iterdir() if p.is_dir()]
    assert [p.name for p in folders] == ["denser"]  # one tracker run for the whole sequence
    scalars, texts = events(folders[0])
    # stage k's step j is logged at (k - 1) * steps_per_task + j
    assert sorted(scalars["stage1/addition/reward_mean"]) == [1, 2]
    assert sorted(scalars["stage2/compare/reward_mean"]) == [3, 4]
    assert sorted(texts["stage2/compare/samples"]) == [3, 4]
    record = json.loads((run / "continual.json").read_text())
    for stage in record["stages"]:
        for column in ("addition", "compare", "logic"):
            assert scalars[f"eval/{column}/accuracy"][2 * stage["stage"]] == pytest.approx(stage["accuracy"][column])
    rows = [json.loads(x) for x in (run / "stages" / "02-compare" / "metrics.jsonl").read_text().splitlines()]
    assert scalars["stage2/compare/loss"] == pytest.approx({2 + r["step"]: r["loss"] for r in rows if "loss" in r})
    assert scalars["drift/relative_l2"][4] == pytest.approx(record["stages"][2]["params"]["relative_l2"])


def test_scoped_views_prefix_and_shift_and_leave_the_run_open(tmp_path):
    logged = []

    class FakeAccelerator:
        is_main_process = True
        trackers = []

        def log(self, values, step):
            logged.append((values, step))

        def end_training(self):
            logged.append("end")

    tracker = Tracker("tensorboard", tmp_path)
    tracker._run.accelerator = FakeAccelerator()
    view = tracker.scoped("stage2/compare/", step_offset=4)
    view.log({"step": 1, "loss": 0.5, "skipped": 0, "note": "text", "missing": None, "bad": float("nan"), "ok": True})
    view.finish()  # a view leaves the run open
    tracker.log({"eval/x": 1.0}, step=6)
    tracker.finish()
    tracker.finish()
    assert logged == [({"stage2/compare/loss": 0.5, "stage2/compare/skipped": 0}, 5), ({"eval/x": 1.0}, 6), "end"]


def test_flatten_config():
    assert flatten_config({"a": {"b": 1, "c": {"d": None}}, "e": [1, 2], "f": "x", "g": True}) == \
        {"a/b": 1, "a/c/d": "none", "e": "[1, 2]", "f": "x", "g": True}


@pytest.fixture
def no_compute(monkeypatch):
    def generate(*a, **k):
        raise AssertionError("generation started: the error should have come before any compute")

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)


@pytest.mark.parametrize("command", ["train", "continual"])
def test_missing_tracker_package_is_one_line_before_compute(tmp_path, capsys, monkeypatch, no_compute, command):
    monkeypatch.setitem(tracking.TRACKERS, "wandb", (("denser_no_such_wandb",), "wandb"))
    extra = ["--tasks", "addition"] if command == "continual" else []
    code = main([command, *SMALL, *extra, "--report-to", "tensorboard,wandb", "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--report-to wandb: the denser_no_such_wandb package is not installed; pip install 'denser[wandb]'" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value, needle", [
    ("tensorbored", "unknown tracker 'tensorbored'; choose from none, tensorboard, trackio, wandb, mlflow"),
    ("none,tensorboard", "'none' cannot be combined"),
])
def test_bad_report_to_values(capsys, no_compute, value, needle):
    assert main(["train", *SMALL, "--report-to", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
