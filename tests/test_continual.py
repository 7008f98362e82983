"""The continual runner, `denser report` and `denser compare` end to end on the tiny model."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from denser.cli import main
from denser.trainers.checkpoint import load_train_state

pytestmark = pytest.mark.slow

TINY = ["--model", "tiny", "--steps-per-task", "1", "--eval-size", "2", "--max-new-tokens", "6",
        "--num-generations", "2", "--prompts-per-step", "1", "--spectral-rank", "4", "--no-progress", "--lr", "1e-3",
        "--eval-samples", "2"]
PLOTS = ("accuracy_matrix.png", "accuracy_per_task.png", "drift.png", "artifacts.png", "training.png")


@pytest.fixture(scope="module")
def runs(tiny_continual_runs):
    """Two tiny continual runs (sdpo with the optimizer carried, grpo with it reset and sdpo's stage 0
    reused) through the CLI (tests/conftest.py)."""
    return tiny_continual_runs


def _record(run: Path) -> dict:
    return json.loads((run / "continual.json").read_text())


def test_continual_run_writes_matrix_drift_artifacts_and_plots(runs):
    sdpo, _ = runs
    r = _record(sdpo)
    assert r["status"] == "complete" and r["columns"] == ["addition", "compare", "reverse"]
    assert len(r["accuracy_matrix"]) == 3 and all(len(row) == 3 for row in r["accuracy_matrix"])
    assert all(0.0 <= v <= 1.0 for row in r["accuracy_matrix"] for v in row)
    assert [s["task"] for s in r["stages"]] == [None, "addition", "compare"]
    m = r["metrics"]
    assert set(m) >= {"average_accuracy", "average_forgetting", "backward_transfer", "forward_transfer", "heldout"}
    s0, s1, s2 = r["stages"]
    assert s0["params"]["relative_l2"] == 0.0 and s0["eval"]["overall"]["kl"] == 0.0
    for s in (s1, s2):
        p = s["params"]
        assert p["relative_l2"] > 0 and set(p["by_kind"]) == {"attention", "mlp", "embeddings", "norms"}
        assert p["spectral"]["rank"] == 4 and 0 <= p["spectral"]["mean_overlap"] <= 1
        ov = s["eval"]["overall"]
        assert ov["kl"] > 0 and 0 <= ov["similarity"] <= 1 and ov["tokens"] > 0
        arts = ov["artifacts"]
        assert arts["n"] == 6 and arts["length_limit_rate"] is not None and arts["mean_entropy"] > 0
        assert s["train"]["steps"] == 1 and s["train"]["updates"] == 1
        assert Path(s["checkpoint"], "model", "config.json").is_file()
    # stage 2 trained from stage 1's final weights, and wrote its accuracy into its own metrics.jsonl
    stage2 = sdpo / "stages" / "02-compare"
    assert str(Path(s1["checkpoint"]) / "model") in (stage2 / "config.yaml").read_text()
    rows = [json.loads(x) for x in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval_accuracy"] == r["accuracy_matrix"][1][1] and rows[-1]["eval_accuracy"] == r["accuracy_matrix"][2][1]
    for name in PLOTS:
        assert (sdpo / "plots" / name).stat().st_size > 5000
    report = (sdpo / "report.md").read_text()
    for section in ("## Accuracy matrix", "## Continual-learning measures", "## Drift from the initial model",
                    "## Formatting artifacts", "plots/drift.png", "denser continual --objective sdpo"):
        assert section in report
    # greedy accuracy with its standard error at every stage; mean@2 of sampled replies at the first and last only
    for s in (s0, s1, s2):
        assert set(s["accuracy_se"]) == set(r["columns"])
        for c in r["columns"]:
            assert s["eval"]["tasks"][c]["accuracy_se"] == s["accuracy_se"][c]
    assert r["eval"]["sampled"] == {"samples": 2, "temperature": 0.6, "top_p": 0.95, "seed": 0, "stages": "first-last"}
    assert s1["sampled_accuracy"] is None and "sampled" not in s1["eval"]["tasks"]["addition"]
    for s in (s0, s2):
        assert set(s["sampled_accuracy"]) == set(r["columns"])
        for c in r["columns"]:
            t = s["eval"]["tasks"][c]["sampled"]
            assert t["n"] == 2 and t["mean_at_n"] == s["sampled_accuracy"][c] and 0 <= t["mean_at_n"] <= 1
            assert t["mean_at_n_se"] is not None
    assert rows[0]["eval_accuracy_se"] == s1["accuracy_se"]["compare"]
    responses = (sdpo / "responses" / "stage-002.jsonl").read_text().splitlines()
    assert len(responses) == 6 and {json.loads(x)["task"] for x in responses} == {"addition", "compare", "reverse"}


def test_optimizer_state_is_carried_or_reset(runs):
    sdpo, grpo = runs

    def adam_steps(run):
        ckpt = next((run / "stages" / "02-compare" / "checkpoints").glob("step-*"))
        state = load_train_state(ckpt)[0]["optimizer"]["state"]
        return {int(v["step"]) for v in state.values()}

    assert adam_steps(sdpo) == {2}  # --carry-optimizer: one step in stage 1 + one in stage 2
    assert adam_steps(grpo) == {1}  # reset: a fresh AdamW in stage 2


def test_initial_eval_is_reused_only_when_it_is_the_same_measurement(runs, tmp_path, capsys):
    sdpo, grpo = runs
    a, b = _record(sdpo)["stages"][0], _record(grpo)["stages"][0]
    assert b.pop("reused_from") == str(sdpo) and a == b
    assert (grpo / "responses" / "stage-000.jsonl").read_text() == (sdpo / "responses" / "stage-000.jsonl").read_text()
    assert main(["continual", "--objective", "grpo", "--tasks", "addition", "--eval-tasks", "reverse",
                 "--output-dir", str(tmp_path / "other"), "--initial-eval-from", str(sdpo), *TINY]) == 2
    assert "a different initial measurement (columns" in capsys.readouterr().err


def test_ema_teacher_keeps_averaging_across_stages(runs):
    from safetensors.torch import load_file

    sdpo, _ = runs

    def final(stage):
        return next((sdpo / "stages" / stage / "checkpoints").glob("step-*"))

    t1 = load_file(str(final("01-addition") / "state" / "teacher.safetensors"))
    t2 = load_file(str(final("02-compare") / "state" / "teacher.safetensors"))
    p2 = load_file(str(final("02-compare") / "model" / "model.safetensors"))
    rate = _record(sdpo)["objective_args"]["teacher_update_rate"]
    name = "model.layers.0.mlp.up_proj.weight"
    # one EMA update in stage 2, from stage 1's teacher (not from stage 2's starting policy)
    assert torch.allclose(t2[name], (1 - rate) * t1[name] + rate * p2[name], atol=1e-7)


def test_teacher_reset_restarts_the_ema_teacher_from_each_stages_start(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "reset"
    assert main(["continual", "--objective", "sdpo", "--teacher", "ema", "--teacher-reset", "--tasks",
                 "addition,compare", "--output-dir", str(run), *TINY]) == 0
    record = _record(run)
    assert record["continual"]["teacher_reset"] is True

    def final(stage):
        return next((run / "stages" / stage / "checkpoints").glob("step-*"))

    p1 = load_file(str(final("01-addition") / "model" / "model.safetensors"))
    t1 = load_file(str(final("01-addition") / "state" / "teacher.safetensors"))
    t2 = load_file(str(final("02-compare") / "state" / "teacher.safetensors"))
    p2 = load_file(str(final("02-compare") / "model" / "model.safetensors"))
    rate = record["objective_args"]["teacher_update_rate"]
    name = "model.layers.0.mlp.up_proj.weight"
    # one EMA update in stage 2, from stage 2's starting policy (stage 1's final weights), not stage 1's teacher
    assert torch.allclose(t2[name], (1 - rate) * p1[name] + rate * p2[name], atol=1e-7)
    assert not torch.allclose(t2[name], (1 - rate) * t1[name] + rate * p2[name], atol=1e-7)


def test_report_rerenders_from_the_record(runs, tmp_path):
    sdpo, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(sdpo, copy, ignore=shutil.ignore_patterns("stages"))
    shutil.rmtree(copy / "plots")
    (copy / "report.md").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").exists() and all((copy / "plots" / n).exists() for n in PLOTS)


def test_compare_overlays_two_runs(runs, tmp_path, capsys):
    sdpo, grpo = runs
    out = tmp_path / "cmp"
    assert main(["compare", str(sdpo), str(grpo), "--out", str(out), "--labels", "dense,sparse"]) == 0
    report = (out / "report.md").read_text()
    assert "| dense |" in report and "| sparse |" in report and "denser compare" in report
    for name in ("compare_summary", "compare_accuracy", "compare_matrices", "compare_drift", "compare_artifacts"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 5000
    assert main(["compare", str(sdpo), "--out", str(out), "--labels", "a,b"]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err


def test_report_drift_between_two_checkpoints(runs, tmp_path, capsys):
    sdpo, _ = runs
    out = tmp_path / "drift"
    assert main(["report", "drift", f"{sdpo}@0", str(sdpo), "--eval-size", "2", "--max-new-tokens", "6",
                 "--spectral-rank", "4", "--out", str(out)]) == 0
    res = json.loads((out / "drift.json").read_text())
    last = _record(sdpo)["stages"][-1]
    # the same numbers as the continual run measured for its last stage against its initial model
    assert res["tasks"] == ["addition", "compare", "reverse"]
    assert res["params"]["relative_l2"] == pytest.approx(last["params"]["relative_l2"], rel=1e-6)
    assert res["b_eval"]["overall"]["kl"] == pytest.approx(last["eval"]["overall"]["kl"], rel=1e-3)
    assert res["b_eval"]["overall"]["similarity"] == pytest.approx(last["eval"]["overall"]["similarity"])
    assert "# Drift of B from A" in capsys.readouterr().out
    assert main(["report", "drift", "tiny", "tiny", "--eval-size", "1", "--max-new-tokens", "4",
                 "--tasks", "addition", "--out", str(out)]) == 0
    same = json.loads((out / "drift.json").read_text())
    assert same["params"]["relative_l2"] == 0.0 and same["b_eval"]["overall"]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["b_eval"]["overall"]["similarity"] == 1.0


def test_resume_finishes_only_the_missing_stages(runs, tmp_path):
    _, grpo = runs
    run = tmp_path / "resumed"
    shutil.copytree(grpo, run)
    r = _record(run)
    full = [row[:] for row in r["accuracy_matrix"]]
    for s in r["stages"][1:]:  # the copied run's checkpoints live under its new directory
        s["checkpoint"] = s["checkpoint"].replace(str(grpo), str(run))
    r["stages"], r["accuracy_matrix"], r["status"], r["metrics"] = r["stages"][:2], r["accuracy_matrix"][:2], "running", None
    (run / "continual.json").write_text(json.dumps(r))
    shutil.rmtree(run / "stages" / "02-compare")
    assert main(["continual", "--objective", "grpo", "--tasks", "addition,compare", "--eval-tasks", "reverse",
                 "--output-dir", str(run), "--resume", *TINY]) == 0
    done = _record(run)
    assert done["status"] == "complete" and len(done["stages"]) == 3
    assert done["stages"][1] == r["stages"][1]
    assert done["accuracy_matrix"][:2] == full[:2]
    assert (run / "stages" / "02-compare" / "checkpoints").is_dir()


@pytest.mark.parametrize("args, message", [
    (["--tasks", "addition", "--task", "compare"], "--task is a `denser train` flag"),
    (["--tasks", "addition", "--steps", "3"], "--steps is a `denser train` flag"),
    (["--tasks", "addition,compare", "--eval-tasks", "compare"], "also a training task"),
    (["--tasks", "addition,addition"], "listed twice"),
    (["--tasks", "addition,nosuchtask"], "unknown task 'nosuchtask'"),
    (["--eval-tasks", "reverse"], "--tasks is required"),
    (["--tasks", "addition", "--steps-per-task", "0"], "--steps-per-task must be >= 1"),
    (["--tasks", "addition", "--sampled-eval-stages", "some"], "--sampled-eval-stages"),
])
def test_continual_cli_errors(args, message, capsys, tmp_path):
    assert main(["continual", "--objective", "grpo", "--model", "tiny", "--output-dir", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_existing_run_needs_resume_or_overwrite(runs, capsys):
    sdpo, _ = runs
    assert main(["continual", "--objective", "sdpo", "--tasks", "addition,compare", "--eval-tasks", "reverse",
                 "--output-dir", str(sdpo), *TINY]) == 2
    assert "already holds a continual run" in capsys.readouterr().err


def _trainer(tmp_path, name, objective, **kwargs):
    from denser.objectives import get_objective
    from denser.trainers.config import TrainConfig
    from denser.trainers.loop import Trainer

    obj_name, _, args = objective.partition(":")
    obj_args = dict(a.split("=") for a in args.split(",")) if args else {}
    obj_args = {k: float(v) if k == "kl_coef" else v for k, v in obj_args.items()}
    cfg = TrainConfig(model="tiny", steps=1, eval_size=2, max_new_tokens=6, num_generations=2, prompts_per_step=1,
                      progress=False, output_dir=str(tmp_path / name), **kwargs.pop("cfg", {}))
    return Trainer(cfg, get_objective(obj_name, **obj_args), log=lambda m: None, **kwargs)


def test_anchor_is_the_frozen_reference_and_teacher_but_not_the_ema_teacher(tmp_path):
    """What the continual runner relies on: a stage's frozen reference and frozen teacher are the initial
    model of the sequence (``anchor``), not the weights the stage starts from."""
    from denser.trainers.models import build_tiny_model

    anchor, _ = build_tiny_model(seed=1)  # the stage itself starts from tiny with seed 0
    ref = _trainer(tmp_path, "ref", "grpo:kl_coef=0.1", anchor=anchor)
    frozen = _trainer(tmp_path, "frozen", "sdpo:teacher=frozen", anchor=anchor)
    ema = _trainer(tmp_path, "ema", "sdpo:teacher=ema", anchor=anchor)
    assert ref.reference is anchor and frozen.teacher.model is anchor
    assert not any(p.requires_grad for p in anchor.parameters())
    for t in (ref, frozen, ema):
        assert not torch.equal(t.policy.lm_head.weight, anchor.lm_head.weight)
    # an EMA teacher starts from the stage's own weights: the anchor does not reset it
    assert ema.teacher.model is not anchor and torch.equal(ema.teacher.model.lm_head.weight, ema.policy.lm_head.weight)


def test_carry_state_continues_adamw_and_the_ema_teacher_with_this_runs_learning_rate(tmp_path):
    first = _trainer(tmp_path, "first", "sdpo:teacher=ema")
    for p in first.policy.parameters():
        p.grad = torch.ones_like(p)
    first.optimizer.step()
    with torch.no_grad():
        for p in first.teacher.model.parameters():
            p.add_(1.0)
    carried = first.carry_state()
    second = _trainer(tmp_path, "second", "sdpo:teacher=ema", cfg={"lr": 1e-3}, evaluator=lambda t: 0.25, **carried)
    assert {int(s["step"]) for s in second.optimizer.state_dict()["state"].values()} == {1}
    assert [g["lr"] for g in second.optimizer.param_groups] == [1e-3]
    for (name, t), t0 in zip(second.teacher.model.named_parameters(), first.teacher.model.parameters()):
        assert torch.equal(t, t0), name
    assert not torch.equal(second.teacher.model.lm_head.weight, second.policy.lm_head.weight)
    assert second.evaluate() == 0.25  # the evaluator replaces the greedy eval
    fresh = _trainer(tmp_path, "fresh", "sdpo:teacher=ema")
    assert fresh.optimizer.state_dict()["state"] == {} and fresh.carry_state()["teacher_state"] is not None
    assert _trainer(tmp_path, "live", "sdpo:teacher=live").carry_state()["teacher_state"] is None


def test_overwrite_removes_only_what_a_continual_run_wrote(tmp_path):
    from denser.continual import ContinualConfig, ContinualRunner
    from denser.trainers.config import TrainConfig

    run = tmp_path / "run"
    (run / "stages" / "01-addition").mkdir(parents=True)
    (run / "continual.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    runner = ContinualRunner(TrainConfig(model="tiny", output_dir=str(run), overwrite=True), None,
                             ContinualConfig(tasks=["addition"]))
    runner._prepare()
    assert (run / "notes.txt").read_text() == "mine"
    assert not (run / "continual.json").exists() and not (run / "stages" / "01-addition").exists()
    (run / "config.yaml").write_text("objective: grpo\n")
    with pytest.raises(ValueError, match="holds a `denser train` run"):
        runner._prepare()
