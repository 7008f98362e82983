"""`denser compare` over seeds: mean ± standard error, the bootstrap over seeds and prompts, the claims
table's verdicts and the density frontier, on records built from one real tiny continual run with
known accuracies (per-prompt successes) and drift values."""

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from denser.analysis.claims import CONTRADICTED, NOT_RESOLVED, REPRODUCED, claim_rows
from denser.analysis.compare import frontier_wanted, write_compare_report
from denser.analysis.forgetting import continual_metrics
from denser.analysis.records import load_run
from denser.analysis.seeds import bootstrap_group, group_runs, group_summary
from denser.cli import main

pytestmark = pytest.mark.slow

PROMPTS = 20
SDPO_ARGS = {"teacher": "ema", "teacher_update_rate": 0.05, "alpha": 0.5, "seed": 0}
GRPO_ARGS = {"clip_low": 0.2, "clip_high": 0.28}


@pytest.fixture(scope="module")
def base(tiny_sdpo_run):
    """A real tiny continual record (tests/conftest.py): the shape every constructed run copies."""
    return tiny_sdpo_run


def make_run(base: Path, dst: Path, objective: str, args: dict, seed: int, success: dict, final: dict) -> Path:
    """A copy of ``base``'s record as a run of ``objective`` at ``seed`` whose eval prompts succeeded as
    ``success[column]`` (a [stage, prompt] 0/1 array) and whose last stage has the ``final`` values."""
    r = json.loads((base / "continual.json").read_text())
    r["objective"], r["objective_args"] = objective, dict(args)
    r["config"]["seed"] = seed
    K = len(r["stages"])
    (dst / "responses").mkdir(parents=True)
    for k in range(K):
        rows = [{"task": c, "index": i, "text": "x", "truncated": False, "length": 1, "success": bool(success[c][k, i]),
                 "answer": None} for c in r["columns"] for i in range(success[c].shape[1])]
        (dst / "responses" / f"stage-{k:03d}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        r["stages"][k]["accuracy"] = {c: float(success[c][k].mean()) for c in r["columns"]}
    r["accuracy_matrix"] = [[r["stages"][k]["accuracy"][c] for c in r["columns"]] for k in range(K)]
    r["metrics"] = continual_metrics(r["accuracy_matrix"], r["train_tasks"], r["heldout_tasks"])
    last = r["stages"][-1]
    last["params"]["relative_l2"] = final["relative_l2"]
    last["params"]["spectral"]["mean_overlap"] = final["mean_overlap"]
    last["eval"]["overall"]["kl"] = final["kl"]
    last["eval"]["overall"]["artifacts"]["no_answer_rate"] = final["no_answer_rate"]
    (dst / "continual.json").write_text(json.dumps(r))
    return dst


def _success(rng, p: np.ndarray) -> dict:
    """Per column of addition, compare, reverse: prompts succeeding with probability p[stage, column]."""
    return {c: (rng.random((p.shape[0], PROMPTS)) < p[:, j:j + 1]).astype(float)
            for j, c in enumerate(("addition", "compare", "reverse"))}


# stage x column success probabilities: sdpo learns task 1 more and forgets it in stage 2; grpo barely moves
P_SDPO = np.array([[0.3, 0.4, 0.5], [0.9, 0.4, 0.5], [0.2, 0.8, 0.4]])
P_GRPO = np.array([[0.3, 0.4, 0.5], [0.5, 0.4, 0.5], [0.5, 0.5, 0.5]])


@pytest.fixture(scope="module")
def grid(base, tmp_path_factory):
    """3 sdpo and 3 grpo seeds: sdpo's KL is far larger (reproduced), its parameter drift far smaller
    (contradicted), its subspace overlap and no-answer rate differ by much less than the seed noise."""
    root = tmp_path_factory.mktemp("grid")
    rng = np.random.default_rng(7)
    runs = []
    for name, obj, args, P, kl, l2 in (("sdpo", "sdpo", SDPO_ARGS, P_SDPO, 0.5, 1e-4), ("grpo", "grpo", GRPO_ARGS, P_GRPO, 0.1, 5e-4)):
        for seed in range(3):
            final = {"kl": kl + 0.01 * rng.standard_normal(), "relative_l2": l2 * (1 + 0.02 * rng.standard_normal()),
                     "mean_overlap": 0.99 + 0.01 * rng.standard_normal() + (1e-4 if obj == "sdpo" else 0),
                     "no_answer_rate": 0.3 + 0.1 * rng.standard_normal()}
            runs.append(make_run(base, root / f"{name}-s{seed}", obj, args, seed, _success(rng, P), final))
    return runs


def test_mean_and_standard_error_over_seeds_match_numpy_on_the_raw_records(grid, tmp_path):
    out = tmp_path / "cmp"
    # labels that say the opposite of the recorded objectives: roles must come from the records
    labels = ["grpo-ish"] * 3 + ["dense"] * 3
    assert main(["compare", *map(str, grid), "--labels", ",".join(labels), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    raw = [json.loads((r / "continual.json").read_text()) for r in grid]

    def mse(values):
        v = np.array(values, dtype=float)
        return v.mean(), v.std(ddof=1) / math.sqrt(len(v))

    for label, rs in (("grpo-ish", raw[:3]), ("dense", raw[3:])):
        forget = [r["metrics"]["final_average_forgetting"] for r in rs]
        gain = [np.mean(list(r["metrics"]["learning_gain"].values())) for r in rs]
        kl = [r["stages"][-1]["eval"]["overall"]["kl"] for r in rs]
        task = [r["accuracy_matrix"][-1][1] for r in rs]
        g = next(g for g in group_runs([load_run(p) for p in grid], labels) if g.label == label)
        s = group_summary(g)
        for key, values in (("forgetting", forget), ("in_domain_gain", gain), ("kl", kl)):
            mean, se = mse(values)
            assert s[key].mean == pytest.approx(mean, abs=1e-12) and s[key].se == pytest.approx(se, abs=1e-12), key
            assert s[key].n == 3
        mean, se = mse(forget)
        assert f"{mean:.3f} ± {se:.3f}" in report
        mean, se = mse(kl)
        assert f"{mean:.4f} ± {se:.4f}" in report
        mean, se = mse(task)
        assert f"{mean:.2f} ± {se:.2f}" in report  # final accuracy on compare
    assert "| grpo-ish | `sdpo (ema teacher)` | 0, 1, 2 | 3 |" in report
    for name in ("summary", "accuracy", "matrices", "drift", "artifacts", "claims"):
        assert (out / "plots" / f"compare_{name}.png").stat().st_size > 5000
    assert "density frontier" not in report  # no hybrid runs


def test_claims_verdicts_follow_the_rule_and_the_recorded_objective(grid):
    labels = ["grpo-ish"] * 3 + ["dense"] * 3  # misleading on purpose
    groups = group_runs([load_run(p) for p in grid], labels)
    summaries = {g.label: group_summary(g) for g in groups}
    boots = {g.label: bootstrap_group(g, samples=400) for g in groups}
    rows = {r.claim.measure: r for r in claim_rows(groups, summaries, boots)}
    assert {r.sdpo.label for r in rows.values()} == {"grpo-ish"} and {r.grpo.label for r in rows.values()} == {"dense"}
    raw = [json.loads((p / "continual.json").read_text()) for p in grid]
    for key, path in (("kl", ("eval", "overall", "kl")), ("relative_l2", ("params", "relative_l2")),
                      ("mean_overlap", ("params", "spectral", "mean_overlap"))):
        def get(r, path=path):
            v = r["stages"][-1]
            for k in path:
                v = v[k]
            return v

        a, b = np.array([get(r) for r in raw[:3]]), np.array([get(r) for r in raw[3:]])
        se = math.sqrt(a.var(ddof=1) / 3 + b.var(ddof=1) / 3)
        assert rows[key].diff.diff == pytest.approx(a.mean() - b.mean()) and rows[key].diff.se == pytest.approx(se)
    assert rows["kl"].verdict == REPRODUCED  # +0.4 against se ~0.01
    assert rows["relative_l2"].verdict == CONTRADICTED  # sdpo drifted 5x less: the claim says more
    assert rows["mean_overlap"].verdict == NOT_RESOLVED  # 1e-4 against seed noise 1e-2
    assert rows["no_answer_rate"].verdict == NOT_RESOLVED
    # accuracy claims: se is at least the bootstrap's standard deviation of the difference
    f = rows["forgetting"].diff
    assert f.ci is not None and f.se >= np.std(boots["grpo-ish"]["forgetting"] - boots["dense"]["forgetting"], ddof=1) - 1e-12
    # one seed per side: no standard error, not resolved, whatever the difference
    one = group_runs([load_run(grid[0]), load_run(grid[3])], ["a", "b"])
    rows1 = claim_rows(one, {g.label: group_summary(g) for g in one}, {"a": None, "b": None})
    assert all(r.verdict == NOT_RESOLVED and r.diff.se is None for r in rows1)


def test_bootstrap_matches_the_binomial_and_the_seed_resampling(base, tmp_path):
    rng = np.random.default_rng(0)
    # one seed: the final compare accuracy is a mean of PROMPTS Bernoulli prompts, resampled: sd = sqrt(p(1-p)/P)
    succ = _success(rng, P_SDPO)
    one = make_run(base, tmp_path / "one", "sdpo", SDPO_ARGS, 0, succ, {"kl": 0.1, "relative_l2": 1e-4,
                                                                         "mean_overlap": 0.9, "no_answer_rate": 0.0})
    g = group_runs([load_run(one)], ["x"])[0]
    b = bootstrap_group(g, samples=4000, seed=1)
    p = succ["compare"][-1].mean()
    assert np.std(b["final:compare"]) == pytest.approx(math.sqrt(p * (1 - p) / PROMPTS), rel=0.06)
    assert np.mean(b["final:compare"]) == pytest.approx(p, abs=0.01)
    # seeds whose prompts all agree (nothing to resample inside a run): the sd of a mean of n seeds drawn with
    # replacement, std(ddof=0) / sqrt(n)
    runs, finals = [], []
    for seed, level in enumerate((0.0, 1.0, 1.0, 0.0, 1.0)):
        s = {c: np.ones((3, PROMPTS)) for c in ("addition", "compare", "reverse")}
        s["compare"][-1] = level  # every prompt alike: resampling prompts changes nothing
        finals.append(level)
        runs.append(make_run(base, tmp_path / f"s{seed}", "grpo", GRPO_ARGS, seed, s,
                             {"kl": 0.1, "relative_l2": 1e-4, "mean_overlap": 0.9, "no_answer_rate": 0.0}))
    g = group_runs([load_run(r) for r in runs], ["y"] * 5)[0]
    b = bootstrap_group(g, samples=4000, seed=2)
    assert np.std(b["final:compare"]) == pytest.approx(np.std(finals) / math.sqrt(5), rel=0.06)


def test_frontier_plot_and_dominance_statement(base, grid, tmp_path):
    rng = np.random.default_rng(3)
    runs, labels = list(grid), ["sdpo"] * 3 + ["grpo"] * 3
    # lam 0.5 learns as much as lam 0 and forgets less (dominates the dense end in forgetting) but has the
    # largest KL; lam 1 learns most: nothing dominates the sparse end
    p = {0.0: (0.8, 0.1, 0.5), 0.25: (0.6, 0.6, 0.3), 0.5: (0.8, 0.8, 0.9), 0.75: (0.5, 0.5, 0.2), 1.0: (1.0, 0.9, 0.1)}
    for lam, (learned, kept, kl) in p.items():
        P = np.array([[0.0, 0.0, 0.5], [learned, 0.0, 0.5], [kept * learned, learned, 0.5]])
        succ = {c: (np.arange(PROMPTS)[None, :] < np.round(P[:, j:j + 1] * PROMPTS)).astype(float)
                for j, c in enumerate(("addition", "compare", "reverse"))}
        args = {**SDPO_ARGS, **GRPO_ARGS, "lam": lam, "lam_end": None}
        runs.append(make_run(base, tmp_path / f"lam{lam}", "hybrid", args, 0, succ,
                             {"kl": kl, "relative_l2": 1e-4, "mean_overlap": 0.9, "no_answer_rate": rng.random()}))
        labels.append(f"hybrid lam {lam:g}")
    out = tmp_path / "front"
    write_compare_report(runs, out, labels=labels, bootstrap_samples=200)
    report = (out / "report.md").read_text()
    assert "## The density frontier" in report and (out / "plots" / "compare_frontier.png").stat().st_size > 5000
    forget = next(x for x in report.splitlines() if x.startswith("- In-domain gain vs forgetting: "))
    # only lam 0.5 dominates lam 0 (lam 0.25 and 0.75 learn less); the pure sdpo runs are dominated too
    dense = forget.split("a sparse-dense mix dominates an end: ")[1].split(" dominates the dense end (lam 0)")[0]
    assert dense == "lam 0.5 (in-domain gain +0 and forgetting -0.55 against it; not resolved: within 2 se or 1 seed)"
    assert "dominate `sdpo` (sdpo (ema teacher))" in forget
    assert "none dominates the sparse end (lam 1)" in forget
    kl = next(x for x in report.splitlines() if x.startswith("- In-domain gain vs response KL: "))
    assert "; none dominates the dense end (lam 0)," in kl  # lam 0.5 pays with KL, 0.25 and 0.75 learn less
    assert "| hybrid (ema teacher) | 0.5 | hybrid lam 0.5 | 1 seed | +" in report
    # a one-seed point's error is its prompt bootstrap's sd, for gain and forgetting (not for KL)
    groups = group_runs([load_run(r) for r in runs], labels)
    g = next(x for x in groups if x.label == "hybrid lam 0.25")
    b = bootstrap_group(g, samples=200)
    front = next(x for x in report.splitlines() if x.startswith("| hybrid (ema teacher) | 0.25 |"))
    gain_sd, forget_sd = np.std(b["in_domain_gain"]), np.std(b["forgetting"])
    assert gain_sd > 0.01 and forget_sd > 0.01
    # lam 0.25 learns 0.6 of each task (gain 0.6) and keeps round(0.36 * 20) / 20 = 0.35 of the first (forgets 0.25)
    assert f"+0.600 (prompts: sd {gain_sd:.3f}) | 0.250 (prompts: sd {forget_sd:.3f}) | 0.3000 |" in front
    # the configurations with one seed say so instead of showing ± 0
    row = next(x for x in report.splitlines() if x.startswith("| hybrid lam 0.25 | 1 seed, no error bar |"))
    assert "±" not in row
    # two lam values: no frontier unless asked; asking with one lam value is a clear error
    groups = group_runs([load_run(r) for r in runs], labels)
    two, hybrids = groups[:4], groups[2:]
    assert frontier_wanted(hybrids, None) and not frontier_wanted(hybrids, False)
    assert not frontier_wanted(two, None) and frontier_wanted(two, True)
    with pytest.raises(ValueError, match="--frontier needs hybrid runs at 2 or more"):
        frontier_wanted(groups[:3], True)


def test_runs_sharing_a_label_must_be_seeds_of_one_configuration(base, grid, tmp_path, capsys):
    assert main(["compare", str(grid[0]), str(grid[3]), "--labels", "same,same", "--out", str(tmp_path / "x")]) == 2
    assert "runs labelled 'same' differ in objective" in capsys.readouterr().err
    dup = tmp_path / "dup"
    shutil.copytree(grid[1], dup)
    assert main(["compare", str(grid[1]), str(dup), "--labels", "a,a", "--out", str(tmp_path / "x")]) == 2
    assert "repeat seed 1" in capsys.readouterr().err
    r = json.loads((dup / "continual.json").read_text())
    part = copy.deepcopy(r)
    part.update(status="running", metrics=None, stages=r["stages"][:2], accuracy_matrix=r["accuracy_matrix"][:2])
    (dup / "continual.json").write_text(json.dumps(part))
    assert main(["compare", str(dup), "--out", str(tmp_path / "x")]) == 2
    assert "is not complete (1 of 2 stages)" in capsys.readouterr().err
    assert main(["compare", str(grid[0]), "--labels", "a,b", "--out", str(tmp_path / "x")]) == 2
    assert "2 labels for 1 runs" in capsys.readouterr().err
