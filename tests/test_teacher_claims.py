"""`denser compare`'s teacher claims (the conditional claim, "and still forgets more", "stable teachers beat
EMA teachers") and teacher alignment against outcome, on synthetic records with known matrices."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from denser.analysis.claims import (
    CONTRADICTED,
    NOT_RESOLVED,
    REPRODUCED,
    stage_alignment,
    teacher_claim_rows,
    teacher_roles,
)
from denser.analysis.compare import alignment_stats, write_compare_report
from denser.analysis.forgetting import continual_metrics
from denser.analysis.records import load_run
from denser.analysis.seeds import group_runs, group_summary

TASKS = ["a", "b", "c"]
ALIGNED = {"teacher": "frozen", "teacher_path": "/cache/aligned"}
CONFIGS = {  # label -> (objective, args, per-stage gain, forgetting of task 1 in stage 2, probe log-prob delta)
    "grpo": ("grpo", {}, 0.05, 0.0, None),
    "opd aligned": ("opd", dict(ALIGNED), 0.30, 0.20, 1.5),
    "sdpo aligned frozen": ("sdpo", dict(ALIGNED), 0.25, 0.0, 1.2),
    "sdpo aligned ema": ("sdpo", {"teacher": "ema", "teacher_path": "/cache/aligned", "teacher_init_alpha": 0.5},
                         0.10, 0.0, 0.6),
    "sdpo frozen": ("sdpo", {"teacher": "frozen"}, -0.20, 0.0, -2.0),
    "sdpo ema": ("sdpo", {"teacher": "ema"}, -0.25, 0.0, -2.2),
}


def _matrix(rng, gain: float, forget: float) -> list[list[float]]:
    """Start 0.4 on every task; stage j moves task j by ``gain`` (+ noise), stage 2 lowers task 1 by ``forget``."""
    R = [[0.4, 0.4, 0.4]]
    for k in range(1, 4):
        row = list(R[-1])
        row[k - 1] = row[k - 1] + gain + 0.02 * rng.standard_normal()
        if k == 2:
            row[0] -= forget + 0.01 * rng.standard_normal()
        R.append(row)
    return R


def _record(tmp_path, label, seed, rng) -> str:
    objective, args, gain, forget, delta = CONFIGS[label]
    R = _matrix(rng, gain, forget)
    stages = []
    for k in range(4):
        stage = {"stage": k, "task": None if k == 0 else TASKS[k - 1], "accuracy": dict(zip(TASKS, R[k])),
                 "params": {}, "eval": {"overall": {"artifacts": {}}}}
        if k and delta is not None:
            d = delta + 0.1 * rng.standard_normal()
            stage["teacher_probe"] = {"first": {"teacher_minus_student": [d, 0.05]},
                                      "teacher_accuracy": R[k - 1][k - 1] + 0.3 + 0.05 * rng.standard_normal()}
        stages.append(stage)
    rec = {"kind": "denser.continual", "objective": objective, "objective_args": args, "model": "tiny",
           "train_tasks": TASKS, "heldout_tasks": [], "columns": TASKS, "continual": {"steps_per_task": 8},
           "config": {"seed": seed, "lr": 2e-5}, "status": "complete", "stages": stages, "accuracy_matrix": R,
           "metrics": continual_metrics(R, TASKS), "elapsed_s": 60.0}
    d = tmp_path / f"{label.replace(' ', '_')}-s{seed}"
    d.mkdir()
    (d / "continual.json").write_text(json.dumps(rec))
    return str(d)


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(11)
    paths, labels = [], []
    for label in CONFIGS:
        for seed in range(3):
            paths.append(_record(tmp_path, label, seed, rng))
            labels.append(label)
    return paths, labels


def _mse(values):
    v = np.array(values, dtype=float)
    return v.mean(), v.std(ddof=1) / math.sqrt(len(v))


def _reference(records, measure):
    """The run's value, by the formulas written out (not the library's)."""
    R = np.array(records["accuracy_matrix"])
    if measure == "in_domain_gain":
        return np.mean([R[j, j - 1] - R[j - 1, j - 1] for j in range(1, 4)])
    if measure == "forgetting":  # best since the stage that trained the task, minus the last
        return np.mean([R[j:3, j - 1].max() - R[3, j - 1] for j in range(1, 3)])
    if measure == "final_accuracy":
        return R[3].mean()
    raise KeyError(measure)


def test_teacher_claims_by_hand(runs):
    paths, labels = runs
    groups = group_runs([load_run(p) for p in paths], labels)
    roles = {g.label: teacher_roles(g) for g in groups}
    assert roles["opd aligned"] == {"aligned-stable"} and roles["sdpo aligned frozen"] == {"aligned-stable", "sdpo-frozen"}
    assert roles["sdpo aligned ema"] == {"sdpo-ema"} and roles["grpo"] == {"grpo"} and roles["sdpo frozen"] == {"sdpo-frozen"}
    summaries = {g.label: group_summary(g) for g in groups}
    rows = teacher_claim_rows(groups, summaries, {})
    pairs = [(r.claim.measure, r.a.label, r.b.label) for r in rows]
    assert pairs == [("in_domain_gain", "opd aligned", "grpo"), ("in_domain_gain", "sdpo aligned frozen", "grpo"),
                     ("forgetting", "opd aligned", "grpo"), ("forgetting", "sdpo aligned frozen", "grpo"),
                     ("final_accuracy", "sdpo aligned frozen", "sdpo aligned ema"),
                     ("final_accuracy", "sdpo frozen", "sdpo ema")]  # frozen/EMA only with the same teacher source
    by_label = {g.label: g for g in groups}
    for row in rows:
        ma, sa = _mse([_reference(r, row.claim.measure) for r in by_label[row.a.label].records])
        mb, sb = _mse([_reference(r, row.claim.measure) for r in by_label[row.b.label].records])
        d, se = ma - mb, math.sqrt(sa ** 2 + sb ** 2)
        assert row.diff.diff == pytest.approx(d, abs=1e-12) and row.diff.se == pytest.approx(se, abs=1e-12)
        expected = NOT_RESOLVED if abs(d) <= 2 * se else (REPRODUCED if d > 0 else CONTRADICTED)
        assert row.verdict == expected
    verdicts = {(m, a): r.verdict for (m, a, _), r in zip(pairs, rows)}
    assert verdicts[("in_domain_gain", "opd aligned")] == REPRODUCED
    assert verdicts[("forgetting", "opd aligned")] == REPRODUCED  # it forgets 0.2 of task 1, grpo nothing
    assert verdicts[("forgetting", "sdpo aligned frozen")] == NOT_RESOLVED
    assert verdicts[("final_accuracy", "sdpo frozen")] == REPRODUCED  # -0.20 beats -0.25 per stage


def test_alignment_per_stage_and_the_report(runs, tmp_path):
    paths, labels = runs
    records = [load_run(p) for p in paths]
    r = records[3]  # opd aligned, seed 0
    st = stage_alignment(r)
    R = r["accuracy_matrix"]
    assert [s["gain"] for s in st] == pytest.approx([R[k][k - 1] - R[k - 1][k - 1] for k in (1, 2, 3)])
    assert st[0]["forgetting"] == pytest.approx(max(R[1][0], R[2][0]) - R[3][0])
    assert st[1]["forgetting"] == pytest.approx(R[2][1] - R[3][1]) and st[2]["forgetting"] is None
    assert st[1]["logp"] == r["stages"][2]["teacher_probe"]["first"]["teacher_minus_student"][0]
    assert st[1]["accuracy"] == pytest.approx(r["stages"][2]["teacher_probe"]["teacher_accuracy"] - R[1][1])
    group = next(g for g in group_runs(records, labels) if g.label == "opd aligned")
    stats = alignment_stats(group)
    for k in range(3):
        for key in ("logp", "gain"):
            mean, se = _mse([stage_alignment(x)[k][key] for x in group.records])
            assert stats[k][key].mean == pytest.approx(mean) and stats[k][key].se == pytest.approx(se)
    assert alignment_stats(next(g for g in group_runs(records, labels) if g.label == "grpo"))[0]["logp"].n == 0
    out = write_compare_report(paths, tmp_path / "cmp", labels=labels, bootstrap_samples=50)
    report = out.read_text()
    assert "## When the teacher knows better" in report
    assert "With an aligned, stable teacher, dense distillation specialises faster than GRPO" in report
    assert "Stable teachers beat EMA teachers (SDPO-CL)" in report
    assert "| opd aligned | 2: b | 3 |" in report
    assert (tmp_path / "cmp" / "plots" / "compare_alignment.png").stat().st_size > 10_000


def test_no_teacher_section_without_roles_or_probes(runs, tmp_path):
    paths, labels = runs
    keep = [i for i, label in enumerate(labels) if label in ("grpo",)]
    report = write_compare_report([paths[i] for i in keep], tmp_path / "only", labels=[labels[i] for i in keep],
                                  bootstrap_samples=50).read_text()
    assert "When the teacher knows better" not in report
