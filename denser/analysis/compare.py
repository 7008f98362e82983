"""Several continual runs in one report, seeds pooled per configuration.

    write_compare_report(runs, out_dir, labels=[...])   # <out>/report.md and <out>/plots/compare_*.png

Runs sharing a label are seeds of one configuration (:func:`denser.analysis.seeds.group_runs`; the
default label is the recorded objective with its teacher and lam, so seeds group by themselves).
Every measure is the mean over seeds ± its standard error (n given); a configuration with one seed
is reported without an error bar, never ± 0. The accuracy measures also get a bootstrap over seeds
and eval prompts where the runs hold per-prompt successes (``responses/``). The report holds the
claims table of "Denser ≠ Better" (:mod:`denser.analysis.claims`) when GRPO and SDPO runs are both
present, and the density frontier when hybrid runs cover several lam values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from denser.analysis.claims import (
    SE_MULTIPLE,
    TEACHER_CLAIMS,
    claim_rows,
    describe,
    dominance,
    frontier_families,
    lam_values,
    objective_role,
    stage_alignment,
    teacher_claim_rows,
)
from denser.analysis.compare_plots import alignment_plot, compare_plots, frontier_plot
from denser.analysis.forgetting import FORGETTING_DEFINITION
from denser.analysis.records import config_line, fmt, load_run, run_label
from denser.analysis.seeds import (
    BOOTSTRAP_SAMPLES,
    MEASURE,
    RunGroup,
    Stat,
    bootstrap_group,
    group_runs,
    group_summary,
    mean_se,
)

FRONTIER_AUTO = 3  # distinct lam values of one hybrid family that draw the frontier without --frontier
ACCURACY_KEYS = ("final_accuracy", "in_domain_gain", "forgetting", "forgetting_all_earlier", "worst_forgetting", "bwt", "fwt", "heldout_delta",
                 "sampled_final", "sampled_delta")
DRIFT_KEYS = ("relative_l2", "one_minus_cosine", "mean_angle", "mean_overlap", "kl", "similarity", "token_f1")
ARTIFACT_KEYS = ("repeated_answer_rate", "no_answer_rate", "repeated_ngram_rate", "length_limit_rate", "mean_length",
                 "mean_entropy")


def pm(stat: Stat, digits: int = 3, *, n: int | None = None, signed: bool = False) -> str:
    """``mean ± se``; the bare mean for one seed (the table names it "1 seed, no error bar"); ``(n=k)``
    where fewer seeds than the configuration's have the value."""
    if stat.mean is None:
        return "–"
    if abs(stat.mean) < 1e-12:  # a difference of equal means: rounding noise, not a value
        stat = Stat(0.0, stat.se, stat.n, stat.values)

    sci = "e" in fmt(stat.mean, digits)  # a tiny (or huge) mean: its se in the same notation

    def f(v: float, sign: bool) -> str:
        if sci:
            return f"{v:+.2e}" if sign else f"{v:.2e}"
        return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"

    text = f(stat.mean, signed) if stat.se is None else f"{f(stat.mean, signed)} ± {f(stat.se, False)}"
    return text + (f" (n={stat.n})" if n is not None and stat.n != n else "")


def seeds_cell(g: RunGroup) -> str:
    return f"{g.n}" if g.n > 1 else "1 seed, no error bar"


def frontier_wanted(groups: list[RunGroup], frontier: bool | None) -> bool:
    """None: when one hybrid family has runs at >= 3 constant lam values; True: required (>= 2 values)."""
    lams = lam_values(groups)
    if frontier and lams < 2:
        raise ValueError(f"--frontier needs hybrid runs at 2 or more constant lam values; these runs have {lams}")
    return lams >= FRONTIER_AUTO if frontier is None else frontier


def write_compare_report(runs: Sequence[str | Path], out_dir: str | Path, *, labels: Sequence[str] | None = None,
                         command: str | None = None, frontier: bool | None = None,
                         bootstrap_samples: int = BOOTSTRAP_SAMPLES) -> Path:
    """``<out>/report.md`` and ``<out>/plots/compare_*.png``. ``frontier``: None draws the density
    frontier when one hybrid family has at least 3 lam values, True requires it (2 or more), False
    leaves it out."""
    records = [load_run(r) for r in runs]
    if not records:
        raise ValueError("denser compare needs at least one run")
    groups = group_runs(records, list(labels) if labels else [run_label(r) for r in records])
    draw_frontier = frontier_wanted(groups, frontier)
    out_dir = Path(out_dir)
    summaries = {g.label: group_summary(g) for g in groups}
    boots = {g.label: bootstrap_group(g, samples=bootstrap_samples) for g in groups}
    files = compare_plots(groups, out_dir / "plots")

    lines = ["# Continual post-training: comparison", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| label | recorded configuration | seeds | n | status | minutes per run (mean) |", "|---|---|---|---|---|---|"]
    for g in groups:
        minutes = mean_se([(r.get("elapsed_s") or 0) / 60 for r in g.records]).mean
        lines.append(f"| {g.label} | `{describe(g)}` | {', '.join(str(s) for s in g.seeds)} | {seeds_cell(g)} | "
                     f"{', '.join(sorted({r.get('status') for r in g.records}))} | {fmt(minutes, 1)} |")
    lines += ["", f"Settings of the first run: {config_line(records[0])}; tasks {', '.join(records[0]['train_tasks'])}"
              + (f", held out {', '.join(records[0]['heldout_tasks'])}" if records[0].get("heldout_tasks") else "") + ".",
              "", "Every number is the mean over a configuration's seeds ± its standard error over seeds "
              "(stdev / √n, n in the table above); a configuration with one seed has no error bar and shows its "
              "value alone. Plots show the mean with a band (or error bar) of ± 1 standard error.", ""]
    lines += _claims_section(groups, summaries, boots, files)
    lines += _teacher_section(groups, summaries, boots, out_dir / "plots")
    if draw_frontier:
        lines += _frontier_section(groups, summaries, boots, out_dir / "plots")
    lines += ["## Accuracy and forgetting", "", f"![summary](plots/{files['summary']})", "",
              *_table(groups, summaries, ACCURACY_KEYS), "",
              "Final-stage values over the trained tasks. In-domain gain = mean over stages of R[j,j] - R[j-1,j] "
              "(what training on a task did for it); forgetting = " + FORGETTING_DEFINITION + "; \"max over all earlier "
              "stages\" = the same with the best accuracy taken over every earlier stage, those before the task was "
              "trained included (denser's measure before); worst = the largest average forgetting after any stage; BWT/FWT as in Lopez-Paz & Ranzato "
              "2017 (FWT against the initial model); held-out Δ = change of the mean held-out accuracy from the "
              "initial model; sampled mean@n over all tasks where the runs measured it.", ""]
    lines += _bootstrap_table(groups, boots, bootstrap_samples)
    lines += ["## Final accuracy per task", "", f"![accuracy](plots/{files['accuracy']})", "", *_per_task(groups, boots), ""]
    lines += ["## Drift from the initial model", "", f"![drift](plots/{files['drift']})", "",
              *_table(groups, summaries, DRIFT_KEYS), "",
              "Relative L2 = ‖θ-θ0‖/‖θ0‖; angle = mean over weight matrices of the largest principal angle "
              "between the top-r left singular subspaces of the matrix and its initial value; overlap = ‖UᵀU0‖²_F / r "
              "(1 = the same subspace); KL = mean per-token KL(current || initial) along the current model's greedy "
              "responses; similarity = difflib ratio to the initial model's response to the same prompt.", ""]
    lines += ["## Formatting artifacts", "", f"![artifacts](plots/{files['artifacts']})", "",
              *_table(groups, summaries, ARTIFACT_KEYS), ""]
    lines += ["## Mean accuracy matrices", "", f"![matrices](plots/{files['matrices']})", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def _table(groups: list[RunGroup], summaries: dict, keys: Sequence[str]) -> list[str]:
    keys = [k for k in keys if any(summaries[g.label][k].mean is not None for g in groups)]
    head = ["label", "n", *[MEASURE[k].title for k in keys]]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for g in groups:
        lines.append("| " + " | ".join([g.label, seeds_cell(g), *[pm(summaries[g.label][k], MEASURE[k].digits, n=g.n)
                                                                  for k in keys]]) + " |")
    return lines


def _ci(v: np.ndarray) -> str:
    lo, hi = np.percentile(v, [2.5, 97.5])
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f} [{lo:.3f}, {hi:.3f}]"


def _bootstrap_table(groups: list[RunGroup], boots: dict, samples: int) -> list[str]:
    have = [g for g in groups if boots[g.label] is not None]
    lines = [f"Bootstrap over seeds and eval prompts ({samples} resamples: seeds with replacement, then each "
             "drawn seed's eval prompts with replacement, the same prompts at every stage; mean ± standard "
             "deviation [95% percentile interval]):", ""]
    if not have:
        return lines[:0] + ["(No bootstrap over prompts: the runs hold no per-prompt successes in responses/.)", ""]
    keys = [k for k in ACCURACY_KEYS if MEASURE[k].accuracy and k in boots[have[0].label]
            and not np.isnan(boots[have[0].label][k]).all()]
    head = ["label", "n", *[MEASURE[k].title for k in keys]]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for g in have:
        n = f"{g.n}" if g.n > 1 else "1 seed: prompts only"
        lines.append("| " + " | ".join([g.label, n, *[_ci(boots[g.label][k]) for k in keys]]) + " |")
    missing = [g.label for g in groups if boots[g.label] is None]
    if missing:
        lines += ["", f"No per-prompt successes for {', '.join(missing)}: no bootstrap."]
    return lines + [""]


def _per_task(groups: list[RunGroup], boots: dict) -> list[str]:
    columns: list[str] = []
    for g in groups:
        columns += [c for c in g.records[0]["columns"] if c not in columns]
    head = ["label", "n", *[c + (" †" if any(c in g.records[0].get("heldout_tasks", []) for g in groups) else "")
                            for c in columns]]
    lines = ["Greedy accuracy after the last stage, mean ± se over seeds (bootstrap 95% interval over seeds and "
             "prompts in brackets); † held out.", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    sampled = False
    for g in groups:
        cells = []
        for c in columns:
            st = mean_se([r["stages"][-1]["accuracy"].get(c) for r in g.records])
            b = (boots[g.label] or {}).get(f"final:{c}")
            ci = f" [{np.percentile(b, 2.5):.2f}, {np.percentile(b, 97.5):.2f}]" if b is not None else ""
            cells.append(pm(st, 2, n=g.n) + ci)
            sampled |= any((r["stages"][-1].get("sampled_accuracy") or {}).get(c) is not None for r in g.records)
        lines.append("| " + " | ".join([g.label, seeds_cell(g), *cells]) + " |")
    if sampled:
        lines += ["", "Sampled mean@n after the last stage (initial → final), mean ± se over seeds:", "",
                  "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for g in groups:
            cells = []
            for c in columns:
                a = mean_se([(r["stages"][0].get("sampled_accuracy") or {}).get(c) for r in g.records])
                b = mean_se([(r["stages"][-1].get("sampled_accuracy") or {}).get(c) for r in g.records])
                cells.append("–" if b.mean is None else f"{pm(a, 2)} → {pm(b, 2)}")
            lines.append("| " + " | ".join([g.label, seeds_cell(g), *cells]) + " |")
    return lines


def _difference_cells(d, digits: int) -> tuple[str, str]:
    """A claim row's difference ± se (or why there is none) and its bootstrap interval, as table cells."""
    diff = "–" if d.diff is None else (pm(Stat(d.diff, d.se, 2), digits, signed=True)
                                      + ("" if d.se is not None else " (1 seed: no se)"))
    return diff, (f"[{d.ci[0]:+.3f}, {d.ci[1]:+.3f}]" if d.ci else "–")


def _claims_section(groups: list[RunGroup], summaries: dict, boots: dict, files: dict) -> list[str]:
    lines = ["## The claims of \"Denser ≠ Better\"", ""]
    rows = claim_rows(groups, summaries, boots)
    roles = {objective_role(g) for g in groups}
    if not rows:
        missing = " and ".join(r for r in ("grpo", "sdpo") if r not in roles) or "a shared task sequence"
        return lines + [f"(No claims table: these runs have no {missing} configuration, by their recorded objective.)",
                        ""]
    lines += ["| claim | measure (final stage) | sdpo | grpo | sdpo − grpo ± se | bootstrap 95% interval | verdict |",
              "|---|---|---|---|---|---|---|"]
    for row in rows:
        m = MEASURE[row.claim.measure]
        diff, ci = _difference_cells(row.diff, m.digits)
        lines.append(f"| {row.claim.text} | {m.title} ({'higher' if row.claim.sign > 0 else 'lower'} for sdpo) | "
                     f"{row.sdpo.label}: {pm(row.sdpo_stat, m.digits)} (n={row.sdpo.n}) | "
                     f"{row.grpo.label}: {pm(row.grpo_stat, m.digits)} (n={row.grpo.n}) | {diff} | {ci} | "
                     f"**{row.verdict}** |")
    lines += ["", f"GRPO and SDPO configurations are identified by each run's recorded objective (and teacher), not "
              f"by their labels. Rule: with d = mean(sdpo) − mean(grpo) over seeds and se = √(se_sdpo² + se_grpo²) "
              f"(for accuracy measures the larger of that and the bootstrap standard deviation of d over seeds and "
              f"prompts), |d| > {SE_MULTIPLE:g} se in the claimed direction is *reproduced*, in the other direction "
              f"*contradicted*, anything else (including a side with one seed) *not resolved at this scale*.", "",
              f"![claims](plots/{files['claims']})", ""]
    return lines


def prompt_sd(group: RunGroup, boots: dict, key: str) -> float | None:
    """The prompt bootstrap's standard deviation of ``key`` for a configuration with one seed (the only
    error a single run has); None with several seeds (their se is the error) or without a bootstrap."""
    b = boots.get(group.label)
    if group.n != 1 or b is None or key not in b or np.isnan(b[key]).all():
        return None
    return float(np.std(b[key]))


def _frontier_section(groups: list[RunGroup], summaries: dict, boots: dict, plots: Path) -> list[str]:
    families = frontier_families(groups)
    train = groups[0].records[0]["train_tasks"]
    refs = [g for g in groups if objective_role(g) and g.records[0]["train_tasks"] == train]
    path = frontier_plot(families, refs, summaries, plots / "compare_frontier.png",
                         prompt_sd=lambda g, key: prompt_sd(g, boots, key))

    def cell(g: RunGroup, key: str, signed: bool = False) -> str:
        sd = prompt_sd(g, boots, key)
        return pm(summaries[g.label][key], signed=signed) + ("" if sd is None else f" (prompts: sd {sd:.3f})")

    lines = ["## The density frontier", "", f"![frontier](plots/{path})", "",
             "| family | lam | label | n | in-domain gain | forgetting | KL(cur‖init)/token |", "|---|---|---|---|---|---|---|"]
    for fam, gs in families.items():
        for g in gs:
            n = "1 seed" if g.n == 1 else seeds_cell(g)
            lines.append(f"| {fam} | {g.args['lam']:g} | {g.label} | {n} | {cell(g, 'in_domain_gain', True)} | "
                         f"{cell(g, 'forgetting')} | {pm(summaries[g.label]['kl'], 4)} |")
    lines += ["", "With several seeds: mean ± se over seeds. With one seed: its value, and in brackets the standard "
              "deviation of the bootstrap over its eval prompts, the error one run has (no such error for KL)."]
    lines.append("")
    for fam, gs in families.items():
        if len(gs) < 2:
            continue
        lines += [f"**{fam}:**", ""]
        lines += [f"- {dominance(gs, refs, summaries, cost, name)}" for cost, name in (("forgetting", "forgetting"),
                                                                                     ("kl", "response KL"))]
        lines.append("")
    lines += ["lam is the weight of the sparse GRPO part (lam 1 = GRPO's loss, lam 0 = SDPO's). A mix dominates an end "
              "when its point estimate has at least the end's in-domain gain and at most its cost, one strictly; it "
              f"is resolved when one of the two differences exceeds {SE_MULTIPLE:g} se of the difference.", ""]
    return lines



def alignment_stats(group: RunGroup) -> list[dict]:
    """Per trained stage, each :func:`~denser.analysis.claims.stage_alignment` value as mean ± se over
    the configuration's seeds (a :class:`Stat`; n 0 where no seed has it)."""
    per_run = [stage_alignment(r) for r in group.records]
    out = []
    for k, first in enumerate(per_run[0]):
        row = {"stage": first["stage"], "task": first["task"]}
        for key in ("logp", "accuracy", "gain", "forgetting"):
            row[key] = mean_se([run[k][key] for run in per_run if k < len(run)])
        out.append(row)
    return out


def _teacher_section(groups: list[RunGroup], summaries: dict, boots: dict, plots: Path) -> list[str]:
    """When the teacher knows better: the teacher claims and teacher alignment against outcome (only when
    a pair of roles exists or a run recorded its teacher's alignment)."""
    rows = teacher_claim_rows(groups, summaries, boots)
    stats = {g.label: alignment_stats(g) for g in groups}
    probed = [g for g in groups if any(st["logp"].n for st in stats[g.label])]
    if not rows and not probed:
        return []
    lines = ["## When the teacher knows better", ""]
    if rows:
        lines += ["| claim | measure (final stage) | A | B | A − B ± se | bootstrap 95% interval | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows:
            m = MEASURE[row.claim.measure]
            diff, ci = _difference_cells(row.diff, m.digits)
            lines.append(f"| {row.claim.text} | {m.title} ({'higher' if row.claim.sign > 0 else 'lower'} for A) | "
                         f"{row.a.label}: {pm(row.a_stat, m.digits)} (n={row.a.n}) | "
                         f"{row.b.label}: {pm(row.b_stat, m.digits)} (n={row.b.n}) | {diff} | {ci} | **{row.verdict}** |")
        lines += ["", "Roles come from each run's recorded objective and teacher: *aligned, stable* = sdpo or opd with a "
                  "frozen teacher loaded from another model (`teacher_path`); *stable* and *EMA* = sdpo's frozen and "
                  "EMA teachers, compared only when both or neither start from another model. The verdict is the "
                  f"claims table's rule: |A − B| > {SE_MULTIPLE:g} se in the claimed direction is *reproduced*, in "
                  "the other *contradicted*, else *not resolved at this scale*.", ""]
    else:
        wanted = ", ".join(sorted({c.a for c in TEACHER_CLAIMS} | {c.b for c in TEACHER_CLAIMS}))
        lines += [f"(No teacher claims: these runs lack a pair of the roles the claims compare: {wanted}.)", ""]
    if probed:
        path = alignment_plot(groups, stats, plots / "compare_alignment.png")
        lines += [f"![alignment](plots/{path})", "",
                  "| label | stage: task | n | teacher − student log-prob (first token) | teacher − student accuracy | "
                  "in-domain gain R[k,k] − R[k-1,k] | forgetting of the task by the end |", "|---|---|---|---|---|---|---|"]
        for g in probed:
            for st in stats[g.label]:
                lines.append(f"| {g.label} | {st['stage']}: {st['task']} | {seeds_cell(g)} | {pm(st['logp'], n=g.n, signed=True)} | "
                             f"{pm(st['accuracy'], n=g.n, signed=True)} | {pm(st['gain'], n=g.n, signed=True)} | "
                             f"{pm(st['forgetting'], n=g.n, signed=True)} |")
        lines += ["", "Teacher alignment is measured at the start of every stage on that stage's task (`denser continual "
                  "--teacher-probe`): the log-prob the run's teacher, on its own context, gives the first token of the "
                  "correct reply `Answer: <answer>` minus the student's on the plain prompt (mean over the task's eval "
                  "prompts), and the teacher's greedy accuracy minus the student's where the teacher can run as a "
                  "policy. Configurations without a teacher (GRPO) are the dashed lines of the figure. Mean ± se over "
                  "seeds.", ""]
    return lines
