"""The comparison's plots: one line per configuration (the mean over its seeds) with a band of ± one
standard error over seeds, the final measures as points with error bars (each seed a small dot), the
mean accuracy matrices and the density frontier. A configuration with one seed is drawn without a
band and marked "(1 seed)" in the legend."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

from denser.analysis.claims import CLAIMS, describe
from denser.analysis.forgetting import average_forgetting
from denser.analysis.plotting import ARTIFACT_PANELS, figure, save, stage_axis
from denser.analysis.records import dig, stage_labels
from denser.analysis.seeds import MEASURE, RunGroup, Stat, stage_stats


def legend_name(g: RunGroup) -> str:
    return f"{g.label} (n={g.n})" if g.n > 1 else f"{g.label} (1 seed)"


def _style(i: int) -> dict:
    return dict(color=f"C{i % 10}", marker="osD^v<>ph*"[i % 10])


def band(ax, stats: Sequence[Stat], *, dx: float = 0.0, label: str, **style) -> None:
    """The mean per stage and a ± se band where there is one."""
    x = [k + dx for k in range(len(stats))]
    mean = [math.nan if s.mean is None else s.mean for s in stats]
    ax.plot(x, mean, label=label, ms=4, **style)
    lo = [m - s.se if s.se is not None else math.nan for m, s in zip(mean, stats)]
    hi = [m + s.se if s.se is not None else math.nan for m, s in zip(mean, stats)]
    if any(not math.isnan(v) for v in lo):
        ax.fill_between(x, lo, hi, color=style.get("color"), alpha=0.18, lw=0)


def _per_stage(*keys, transform: Callable[[float], float] | None = None) -> Callable[[dict], list]:
    def values(r: dict) -> list:
        out = [dig(s, *keys) for s in r["stages"]]
        return [None if v is None else (transform(v) if transform else v) for v in out]

    return values


def _metric(key: str) -> Callable[[dict], list]:
    return lambda r: (r.get("metrics") or {}).get(key) or []


def _average_forgetting(r: dict) -> list:
    """Per stage, the average forgetting by the default definition, from the accuracy matrix (a record
    written before that definition became the default holds the earlier one in its metrics)."""
    return average_forgetting(r["accuracy_matrix"], len(r["train_tasks"]))


def _x_labels(groups: list[RunGroup]) -> list[str]:
    records = [r for g in groups for r in g.records]
    longest = max(records, key=lambda r: len(r["stages"]))
    if all(r["train_tasks"] == records[0]["train_tasks"] for r in records):
        return stage_labels(longest)
    return ["initial"] + [str(k) for k in range(1, len(longest["stages"]))]


def _panels(groups: list[RunGroup], panels, path: Path, *, cols: int, title: str, shift: bool = False,
            unit_ylim: Callable[[str], bool] = lambda t: False) -> str:
    rows = math.ceil(len(panels) / cols)
    fig, axes = figure(rows, cols, w=3.8, h=3.1)
    flat = [a for row in axes for a in row]
    labels = _x_labels(groups)
    # accuracies take few distinct values: shift each configuration a little sideways so none hides another
    dxs = [((i - (len(groups) - 1) / 2) * 0.06 if shift else 0.0) for i in range(len(groups))]
    for ax, (panel_title, per_stage) in zip(flat, panels):
        for i, (g, dx) in enumerate(zip(groups, dxs)):
            band(ax, stage_stats(g, per_stage), dx=dx, label=legend_name(g), **_style(i))
        ax.set_title(panel_title, fontsize=9)
        if unit_ylim(panel_title):
            ax.set_ylim(-0.03, 1.03)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useOffset=False)
        stage_axis(ax, labels)
    for ax in flat[len(panels):]:
        ax.axis("off")
    flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def compare_plots(groups: list[RunGroup], plots: Path) -> dict[str, str]:
    plots.mkdir(parents=True, exist_ok=True)
    band_note = "mean over seeds, band ± 1 standard error"
    files = {"summary": _panels(groups, [
        ("average accuracy on tasks seen so far", _metric("average_accuracy")),
        ("average forgetting", _average_forgetting),
        ("held-out mean accuracy", _metric("heldout_mean_accuracy")),
        ("repeated answer markers (rate)", _per_stage("eval", "overall", "artifacts", "repeated_answer_rate")),
    ], plots / "compare_summary.png", cols=4, title=f"accuracy and forgetting ({band_note})", shift=True,
        unit_ylim=lambda t: "forgetting" not in t)}

    columns: list[str] = []
    for g in groups:
        columns += [c for c in g.records[0]["columns"] if c not in columns]
    panels = []
    for c in columns:
        held = any(c in g.records[0].get("heldout_tasks", []) for g in groups)
        panels.append((c + (" (held-out)" if held else ""), _per_stage("accuracy", c)))
    files["accuracy"] = _panels(groups, panels, plots / "compare_accuracy.png", cols=min(4, len(columns)),
                                title=f"greedy accuracy per task after every stage ({band_note}; configurations "
                                      "shifted sideways so that equal values stay visible)", shift=True,
                                unit_ylim=lambda t: True)
    files["drift"] = _panels(groups, [
        ("parameter drift ‖θ-θ0‖/‖θ0‖", _per_stage("params", "relative_l2")),
        ("mean largest principal angle (deg)", _per_stage("params", "spectral", "mean_angle_deg")),
        ("1 - principal-subspace overlap", _per_stage("params", "spectral", "mean_overlap", transform=lambda v: 1 - v)),
        ("KL(current || initial) per token", _per_stage("eval", "overall", "kl")),
        ("similarity to initial responses", _per_stage("eval", "overall", "similarity")),
        ("1 - cosine(θ, θ0)", _per_stage("params", "cosine", transform=lambda v: 1 - v)),
    ], plots / "compare_drift.png", cols=3, title=f"drift from the initial model after every stage ({band_note})")
    files["artifacts"] = _panels(groups, [(t, _per_stage("eval", "overall", "artifacts", k)) for k, t in ARTIFACT_PANELS],
                                 plots / "compare_artifacts.png", cols=3,
                                 title=f"formatting artifacts on the fixed eval prompts, all tasks pooled ({band_note})",
                                 unit_ylim=lambda t: "rate" in t)
    files["matrices"] = _matrices(groups, columns, plots / "compare_matrices.png")
    files["claims"] = _finals(groups, plots / "compare_claims.png")
    return files


def _matrices(groups: list[RunGroup], columns: list[str], path: Path) -> str:
    import numpy as np

    width = max(len(g.records[0]["stages"]) for g in groups)
    fig, axes = figure(1, len(groups), w=1.05 * max(5, len(columns)) + 1.5, h=0.5 * width + 2.4)
    for ax, g in zip(axes[0], groups):
        rec = g.records[0]
        cols = rec["columns"]
        per_col = [stage_stats(g, _per_stage("accuracy", c)) for c in cols]
        stats = [[s[k] for s in per_col] for k in range(len(rec["stages"]))]
        M = np.array([[math.nan if s.mean is None else s.mean for s in row] for row in stats])
        ax.imshow(M, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([c + (" †" if c in rec.get("heldout_tasks", []) else "") for c in cols], rotation=30,
                           ha="right", fontsize=8)
        ax.set_yticks(range(len(stats)))
        ax.set_yticklabels(stage_labels(rec), fontsize=8)
        for i, row in enumerate(stats):
            for j, s in enumerate(row):
                if s.mean is not None:
                    text = f"{s.mean:.2f}" + (f"\n±{s.se:.2f}" if s.se is not None else "")
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="black" if s.mean > 0.6 else "white")
        ax.set_title(legend_name(g), fontsize=9)
    fig.suptitle("mean accuracy matrix R[stage, task] over seeds (± standard error; † held out)", fontsize=10)
    return save(fig, path)


def _finals(groups: list[RunGroup], path: Path) -> str:
    """The claims' measures at the final stage: each configuration's mean ± se, its seeds as dots."""
    keys = list(dict.fromkeys(c.measure for c in CLAIMS))
    cols = 5
    fig, axes = figure(math.ceil(len(keys) / cols), cols, w=3.0, h=3.0)
    flat = [a for row in axes for a in row]
    for ax, key in zip(flat, keys):
        m = MEASURE[key]
        for i, g in enumerate(groups):
            vals = [m.value(r) for r in g.records]
            vals = [v for v in vals if v is not None]
            if not vals:
                continue
            st = _style(i)
            ax.scatter([i + 0.18] * len(vals), vals, s=9, color=st["color"], alpha=0.5)
            mean = sum(vals) / len(vals)
            se = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 / len(vals) ** 0.5 if len(vals) > 1 else None
            ax.errorbar([i], [mean], yerr=None if se is None else [se], fmt=st["marker"], color=st["color"], capsize=3)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([legend_name(g) for g in groups], rotation=35, ha="right", fontsize=7)
        ax.set_title(m.title, fontsize=8)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useOffset=False)
        ax.grid(alpha=0.3)
    for ax in flat[len(keys):]:
        ax.axis("off")
    fig.suptitle("the claims' measures after the last stage: mean ± standard error over seeds (dots: the seeds)",
                 fontsize=10)
    return save(fig, path)


def frontier_plot(families: dict[str, list[RunGroup]], refs: list[RunGroup], summaries: dict[str, dict[str, Stat]],
                  path: Path, prompt_sd: Callable[[RunGroup, str], float | None] | None = None) -> str:
    """In-domain gain against forgetting and against response KL: one point per lam (± se on both
    axes where there are several seeds; with one seed, dotted bars of ± the prompt bootstrap's sd from
    ``prompt_sd(group, measure)`` where it has one), lam order joined by a thin line; GRPO/SDPO
    configurations as reference points."""

    def err(g: RunGroup, key: str, stat: Stat) -> list[float] | None:
        if stat.se is not None:
            return [stat.se]
        sd = prompt_sd(g, key) if prompt_sd else None
        return None if sd is None else [sd]

    fig, axes = figure(1, 2, w=5.0, h=4.0)
    for ax, (cost, name) in zip(axes[0], (("forgetting", "average forgetting (final)"),
                                          ("kl", "KL(current || initial) per token"))):
        for i, (fam, gs) in enumerate(families.items()):
            xs, ys = [], []
            for g in gs:
                x, y = summaries[g.label][cost], summaries[g.label]["in_domain_gain"]
                if x.mean is None or y.mean is None:
                    continue
                xs.append(x.mean)
                ys.append(y.mean)
                bars = ax.errorbar([x.mean], [y.mean], xerr=err(g, cost, x), yerr=err(g, "in_domain_gain", y),
                                   fmt="o", color=f"C{i}", capsize=3, mfc="white" if g.n == 1 else f"C{i}")
                if g.n == 1:
                    for line in bars.lines[2]:
                        line.set_linestyle(":")
                ax.annotate(f"λ={g.args['lam']:g}" + ("" if g.n > 1 else " (1 seed)"), (x.mean, y.mean),
                            textcoords="offset points", xytext=(5, 4), fontsize=7)
            ax.plot(xs, ys, color=f"C{i}", lw=0.8, alpha=0.6, label=fam)
        for j, g in enumerate(refs):
            x, y = summaries[g.label][cost], summaries[g.label]["in_domain_gain"]
            if x.mean is None or y.mean is None:
                continue
            ax.errorbar([x.mean], [y.mean], xerr=None if x.se is None else [x.se], yerr=None if y.se is None else [y.se],
                        fmt="s^Dv"[j % 4], color="black" if j == 0 else f"C{(j + len(families)) % 10}", capsize=3,
                        label=f"{g.label}: {describe(g)} ({'n=' + str(g.n) if g.n > 1 else '1 seed'})")
        ax.set_xlabel(name)
        ax.set_ylabel("in-domain gain (mean of R[j,j] - R[j-1,j])")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 3), useOffset=False)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("the density frontier: up = learns more, left = costs less (open circles: 1 seed, "
                 "dotted bars: ± the sd of its prompt bootstrap)",
                 fontsize=10)
    return save(fig, path)


def alignment_plot(groups: list[RunGroup], stats: dict[str, list[dict]], path: Path) -> str:
    """In-domain gain (top) and forgetting of the stage's task by the end (bottom) against teacher
    alignment (left: teacher − student log-prob of the correct reply's first token; right: teacher −
    student greedy accuracy): one point per configuration and stage, error bars ± se over seeds on both
    axes, the stage number beside it. A configuration without a teacher (no alignment) is a dashed
    horizontal line at its mean over stages."""
    fig, axes = figure(2, 2, w=5.0, h=3.8)
    for col, (xkey, xname) in enumerate((("logp", "teacher − student log-prob, first token of the correct reply"),
                                         ("accuracy", "teacher − student greedy accuracy"))):
        for row, (ykey, yname) in enumerate((("gain", "in-domain gain R[k,k] − R[k-1,k]"),
                                             ("forgetting", "forgetting of task k by the end"))):
            ax = axes[row][col]
            for i, g in enumerate(groups):
                st = _style(i)
                pts = [s for s in stats[g.label] if s[xkey].mean is not None and s[ykey].mean is not None]
                if not pts:
                    ys = [s[ykey].mean for s in stats[g.label] if s[ykey].mean is not None]
                    if ys and not any(s[xkey].mean is not None for s in stats[g.label]):
                        ax.axhline(sum(ys) / len(ys), color=st["color"], ls="--", lw=1, label=f"{legend_name(g)}: no teacher")
                    continue
                for s in pts:
                    x, y = s[xkey], s[ykey]
                    ax.errorbar([x.mean], [y.mean], xerr=None if x.se is None else [x.se],
                                yerr=None if y.se is None else [y.se], fmt=st["marker"], color=st["color"], capsize=3,
                                mfc="white" if g.n == 1 else st["color"],
                                label=legend_name(g) if s is pts[0] else None)
                    ax.annotate(str(s["stage"]), (x.mean, y.mean), textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.axvline(0.0, color="grey", lw=0.6)
            ax.axhline(0.0, color="grey", lw=0.6)
            ax.set_xlabel(xname, fontsize=8)
            ax.set_ylabel(yname, fontsize=8)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.suptitle("outcome against teacher alignment: one point per configuration and stage (the number), "
                 "± 1 standard error over seeds", fontsize=10)
    return save(fig, path)
