"""experiments/aligned_teacher.py: its run definitions, the teacher's record and the checks on the cached teacher
(no training here; `python experiments/aligned_teacher.py --model tiny ...` is the end-to-end smoke)."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "experiments" / "aligned_teacher.py"


@pytest.fixture(scope="module")
def exp():
    spec = importlib.util.spec_from_file_location("aligned_teacher", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup(exp, tmp_path):
    """The real experiment's settings, its folders moved under tmp_path, with a teacher.json and cached weights."""
    s = dataclasses.replace(exp.setup("default"), results=tmp_path / "results", work=tmp_path / "work",
                            rerun=tmp_path / "rerun")
    model = tmp_path / "cache" / "run" / "checkpoints" / "step-000096" / "model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    s.results.mkdir()
    s.teacher_json.write_text(json.dumps({"model_dir": str(model), "commit": "0" * 40,
                                          "safetensors_sha256": exp.file_sha256(model / "model.safetensors")}))
    return s, model


def test_six_configurations_three_seeds_and_their_commands(exp, setup):
    s, model = setup
    assert len(exp.RUNS) == 18 and set(exp.CONFIGS) == {"grpo", "sdpo_ema", "sdpo_frozen", "sdpo_aligned_frozen",
                                                         "sdpo_aligned_ema", "opd_aligned"}
    grid = exp.grid
    for name, spec in exp.RUNS.items():
        cmd = exp.command(s, name)
        i = cmd.index("continual") + 1
        assert cmd[cmd.index("--seed") + 1] == str(spec["seed"]) and "--teacher-probe" in cmd and "--resume" in cmd
        assert cmd[cmd.index("--output-dir") + 1] == str(s.work / name)
        assert cmd[i:i + len(grid.COMMON) + 40].count("--model") == 1  # the grid's shared settings, once
        for flag in grid.COMMON:
            assert flag in cmd
        first = exp._first_of_seed(spec["seed"])
        assert ("--initial-eval-from" in cmd) == (name != first)
        if spec["config"] in exp.ALIGNED:
            assert cmd[cmd.index("--teacher-path") + 1] == str(model)
        else:
            assert "--teacher-path" not in cmd
    # the baselines are the grid's configurations
    for c in ("grpo", "sdpo_ema", "sdpo_frozen"):
        assert exp.CONFIGS[c][1] == grid.RUNS[f"{c}-s0"]["args"]
    ema = exp.command(s, "sdpo_aligned_ema-s1")
    assert ema[ema.index("--teacher") + 1] == "ema" and ema[ema.index("--teacher-init-alpha") + 1] == "0.5"
    frozen = exp.command(s, "sdpo_aligned_frozen-s2")
    assert frozen[frozen.index("--teacher") + 1] == "frozen" and "--teacher-init-alpha" not in frozen
    opd = exp.command(s, "opd_aligned-s0")
    assert opd[opd.index("--objective") + 1] == "opd"


def test_the_teacher_build_is_sft_on_the_three_tasks_correct_replies(exp):
    s = exp.setup("default")
    cmd = exp.teacher_command(s, Path("/x/run"))
    assert cmd[2] == "sft" and cmd[cmd.index("--out") + 1] == "/x/run"
    assert cmd[cmd.index("--steps") + 1] == str(exp.TEACHER_STEPS) and cmd[cmd.index("--seed") + 1] == "0"
    assert exp.mix_task() == "mix:larger+subtract+multiply?exclude_eval_of=0,1,2"
    assert exp.teacher_key(s) == exp.teacher_key(exp.setup("default"))  # the cache key is a function of the command
    assert exp.teacher_key(exp.setup("tiny")).startswith("tiny-")


def test_the_sft_replies_are_correct_and_in_the_models_format(exp):
    from denser.tasks import get_task

    task = get_task(exp.mix_task(), seed=0)
    rows = list(task.train)[:300]
    assert {r["part"] for r in rows} == set(exp.TRAIN_TASKS)
    for r in rows:
        reply = exp.correct_reply(r)
        assert task.is_success(task.check(reply, r)), (r["question"], reply)
        wrong = reply.replace(f"Answer: {r['answer']}", f"Answer: {int(r['answer']) + 1}")
        assert not task.is_success(task.check(wrong, r))
    by_part = {r["part"]: exp.correct_reply(r) for r in rows}
    assert by_part["larger"].startswith("Answer: ")
    a, op, b = by_part["multiply"].split("\n")[0].split(" ")[:3]
    assert op == "*" and by_part["multiply"].endswith(f"Answer: {int(a) * int(b)}")


def test_a_missing_or_changed_teacher_fails_with_one_line(exp, setup):
    s, model = setup
    assert exp.check_teacher(s) == model
    (model / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(SystemExit, match="does not have teacher.json's SHA-256"):
        exp.check_teacher(s)
    (model / "model.safetensors").unlink()
    with pytest.raises(SystemExit, match="is gone; rebuild it"):
        exp.check_teacher(s)
    s.teacher_json.unlink()
    with pytest.raises(SystemExit, match="build the teacher first"):
        exp.command(s, "opd_aligned-s0")
    assert "--teacher-path" not in exp.command(s, "grpo-s0")  # the baselines need no teacher


def test_only_refuses_a_run_whose_stage0_source_is_not_scheduled(exp, setup, capsys, monkeypatch):
    s, _ = setup
    monkeypatch.setattr(exp, "setup", lambda model: s)  # the fixture's folders
    with pytest.raises(SystemExit):
        exp.main(["run", "--only", "sdpo_ema-s0"])
    assert "reuses grpo-s0's measurement of the initial model" in capsys.readouterr().err


def test_clearly_above_is_the_paired_two_se_rule(exp, monkeypatch, tmp_path):
    s = exp.setup("tiny")
    before = {t: {"0": [0.0, 1.0, 0.0, 1.0], "1": [0.0, 0.0, 1.0, 0.0]} for t in exp.TRAIN_TASKS}
    after = {"larger": {"0": [1.0, 1.0, 1.0, 1.0], "1": [1.0, 1.0, 1.0, 1.0]},  # +5/8, paired se small
             "subtract": {"0": [0.0, 1.0, 0.0, 1.0], "1": [0.0, 0.0, 1.0, 1.0]},  # +1/8
             "multiply": {"0": [1.0, 0.0, 0.0, 1.0], "1": [0.0, 0.0, 1.0, 0.0]}}  # 0
    import denser.trainers.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: (models.build_tiny_model(seed=0)[0], None))
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x")
    rec = exp.teacher_record(s, before, after, ["python", "-m", "denser"], model, 1.0, tmp_path)
    d = [1, 0, 1, 0, 1, 1, 0, 1]
    mean = sum(d) / 8
    se = (sum((v - mean) ** 2 for v in d) / 7 / 8) ** 0.5
    assert rec["accuracy"]["larger"]["gain"] == pytest.approx(mean)
    assert rec["accuracy"]["larger"]["gain_se"] == pytest.approx(se)
    assert rec["accuracy"]["larger"]["clearly_above"] == (mean > 2 * se)
    assert rec["accuracy"]["subtract"]["gain"] == pytest.approx(1 / 8) and not rec["accuracy"]["subtract"]["clearly_above"]
    assert rec["accuracy"]["multiply"]["initial"]["per_seed"] == {"0": 0.5, "1": 0.25}
    assert rec["all_clearly_above"] is False


def test_a_rebuild_with_other_bits_keeps_the_earlier_build_on_record(exp):
    def record(sha, commit, seeds):
        return {"commit": commit, "cpu": "cpu " + commit, "weights_sha256": sha, "safetensors_sha256": sha + "f",
                "build_time_s": 1.0, "accuracy": {"larger": {"teacher": {"per_seed": seeds}}}}

    first = record("aaa", "c1", {"0": 0.5, "1": 0.75})
    second = record("bbb", "c2", {"0": 0.5, "1": 0.75})
    second["earlier_builds"] = exp.earlier_builds(first, second)
    assert [(b["weights_sha256"], b["commit"], b["cpu"], b["same_accuracy"]) for b in second["earlier_builds"]] \
        == [("aaa", "c1", "cpu c1", True)]
    third = record("ccc", "c3", {"0": 0.25, "1": 0.75})  # a third CPU, another greedy answer
    assert [(b["weights_sha256"], b["same_accuracy"]) for b in exp.earlier_builds(second, third)] \
        == [("bbb", False), ("aaa", True)]  # newest first; each compared when it was replaced
    same = record("bbb", "c4", {"0": 0.5, "1": 0.75})  # the same bits again: nothing new to keep
    assert exp.earlier_builds(second, same) == second["earlier_builds"]
    assert exp.cpu_name()  # names this machine's CPU
