"""Several continual runs in one report: ``write_compare_report(runs, out)``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from denser.analysis.plotting import ARTIFACT_PANELS, figure, plot_accuracy_matrix, save, stage_axis
from denser.analysis.records import config_line, dig, fmt, load_run, nan, run_label, series, signed, stage_labels
from denser.analysis.report import matrix_table


def write_compare_report(runs: Sequence[str | Path], out_dir: str | Path, *, labels: Sequence[str] | None = None,
                         command: str | None = None) -> Path:
    """One report with every run's curves overlaid: ``<out>/report.md`` and ``<out>/plots/compare_*.png``."""
    records = [load_run(r) for r in runs]
    if not records:
        raise ValueError("denser compare needs at least one run")
    names = list(labels) if labels else _unique_labels(records)
    if len(names) != len(records):
        raise ValueError(f"{len(names)} labels for {len(records)} runs")
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    files = _compare_plots(records, names, plots)
    lines = ["# Continual post-training: comparison", ""]
    if command:
        lines += ["```", command, "```", ""]
    lines += ["| run | objective | tasks | held out | status | minutes |", "|---|---|---|---|---|---|"]
    for name, r in zip(names, records):
        lines.append(f"| {name} | `{r['objective']}` | {', '.join(r['train_tasks'])} | "
                     f"{', '.join(r.get('heldout_tasks') or []) or '–'} | {r.get('status')} | "
                     f"{fmt((r.get('elapsed_s') or 0) / 60, 1)} |")
    lines += ["", f"Settings of the first run: {config_line(records[0])}.", "", "## Summary", ""]
    head = ["run", "final avg acc", "avg forgetting", "worst avg forgetting", "BWT", "FWT", "held-out Δ", "rel. L2", "mean angle°",
            "KL/tok", "similarity", "repeated answer", "rep-3", "length limit", "entropy"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in zip(names, records):
        m = r.get("metrics") or {}
        T = len(r["train_tasks"])
        last = r["stages"][-1]
        art = dig(last, "eval", "overall", "artifacts") or {}
        held = (m.get("heldout_mean_delta") or [None] * (T + 1))[T] if m else None
        lines.append("| " + " | ".join([
            name, fmt(m.get("final_average_accuracy")), fmt(m.get("final_average_forgetting")),
            fmt(max((v for v in m.get("average_forgetting") or [] if v is not None), default=None)),
            signed(m.get("final_backward_transfer")), signed(m.get("forward_transfer")), signed(held),
            fmt(dig(last, "params", "relative_l2")), fmt(dig(last, "params", "spectral", "mean_angle_deg"), 2),
            fmt(dig(last, "eval", "overall", "kl"), 4), fmt(dig(last, "eval", "overall", "similarity")),
            fmt(art.get("repeated_answer_rate")), fmt(art.get("repeated_ngram_rate")),
            fmt(art.get("length_limit_rate")), fmt(art.get("mean_entropy"))]) + " |")
    lines += ["", "Final-stage values (worst avg forgetting: the largest average forgetting after any stage; minutes: "
              "wall time on a machine shared with other jobs, stage 0 measured once and reused). Forgetting = best "
              "earlier accuracy minus current (Chaudhry et al. 2018), BWT/FWT "
              "as in Lopez-Paz & Ranzato 2017 (FWT against the initial model); held-out Δ = change of the mean "
              "held-out accuracy from the initial model.", ""]
    for key, title in (("summary", "Accuracy and forgetting"), ("accuracy", "Accuracy per task"),
                       ("matrices", "Accuracy matrices"), ("drift", "Drift"), ("artifacts", "Formatting artifacts")):
        lines += [f"## {title}", "", f"![{key}](plots/{files[key]})", ""]
    lines += ["## Accuracy matrices as tables", ""]
    for name, r in zip(names, records):
        lines += [f"### {name}", "", *matrix_table(r), ""]
    out = out_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


def _unique_labels(records: list[dict]) -> list[str]:
    base = [run_label(r) for r in records]
    out = []
    for b, r in zip(base, records):
        out.append(b if base.count(b) == 1 else f"{b} [{Path(r['run_dir']).name}]")
    return out


def _compare_plots(records: list[dict], names: list[str], plots: Path) -> dict[str, str]:
    files = {}
    width = max(len(r["stages"]) for r in records)
    same_sequence = all(r["train_tasks"] == records[0]["train_tasks"] for r in records)
    labels = (stage_labels(max(records, key=lambda r: len(r["stages"]))) if same_sequence
              else [f"{k}" if k else "initial" for k in range(width)])
    styles = [dict(color=f"C{i % 10}", marker="osD^v<>ph*"[i % 10]) for i in range(len(records))]
    # accuracies take few distinct values, so runs would hide each other: shift each run a little sideways
    shift = [(i - (len(records) - 1) / 2) * 0.06 for i in range(len(records))]

    fig, axes = figure(1, 4, w=3.8)
    for r, name, st, dx in zip(records, names, styles, shift):
        m = r.get("metrics") or {}
        T = len(r["train_tasks"])
        x = [k + dx for k in range(T + 1)]
        axes[0][0].plot(x, [nan(v) for v in (m.get("average_accuracy") or [None] * (T + 1))], label=name, **st)
        axes[0][1].plot(x, [nan(v) for v in (m.get("average_forgetting") or [None] * (T + 1))], label=name, **st)
        axes[0][2].plot(x, [nan(v) for v in (m.get("heldout_mean_accuracy") or [None] * (T + 1))], label=name, **st)
        axes[0][3].plot(x, [nan(dig(s, "eval", "overall", "artifacts", "repeated_answer_rate")) for s in r["stages"]],
                        label=name, **st)
    for i, (ax, title) in enumerate(zip(axes[0], ("average accuracy on tasks seen so far", "average forgetting",
                                                  "held-out mean accuracy", "repeated answer markers (rate)"))):
        ax.set_title(title, fontsize=9)
        if i == 1:
            ax.axhline(0.0, color="gray", lw=0.8)
        else:
            ax.set_ylim(-0.03, 1.03)
        stage_axis(ax, labels)
    axes[0][0].legend(fontsize=7)
    files["summary"] = save(fig, plots / "compare_summary.png")

    columns = []
    for r in records:
        columns += [c for c in r["columns"] if c not in columns]
    cols = min(4, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = figure(rows, cols, w=3.6, h=3.0)
    flat = [a for row in axes for a in row]
    for ax, c in zip(flat, columns):
        for r, name, st, dx in zip(records, names, styles, shift):
            if c in r["columns"]:
                ax.plot([k + dx for k in range(len(r["stages"]))], series(r, "accuracy", c), label=name, **st)
        held = any(c in r.get("heldout_tasks", []) for r in records)
        trained_at = [r["train_tasks"].index(c) + 1 for r in records if c in r["train_tasks"]]
        if trained_at and len(set(trained_at)) == 1:
            ax.axvspan(trained_at[0] - 0.5, trained_at[0] + 0.5, color="gray", alpha=0.12, lw=0)
        ax.set_title(c + (" (held-out)" if held else f" (trained in stage {trained_at[0]})" if trained_at else ""),
                     fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        stage_axis(ax, labels)
    for ax in flat[len(columns):]:
        ax.axis("off")
    flat[0].legend(fontsize=7)
    fig.suptitle("greedy accuracy per task after every stage (shaded: the stage that trains it; runs shifted "
                 "sideways so that equal values stay visible)", fontsize=10)
    files["accuracy"] = save(fig, plots / "compare_accuracy.png")

    n = len(records)
    fig, axes = figure(1, n, w=1.0 * max(5, len(columns)) + 1.5, h=0.5 * width + 2.4)
    for ax, r, name in zip(axes[0], records, names):
        plot_accuracy_matrix(ax, r, title=name, colorbar=False)
    files["matrices"] = save(fig, plots / "compare_matrices.png")

    fig, axes = figure(2, 3, w=3.8)
    panels = (("params", "relative_l2", "parameter drift ||θ-θ0||/||θ0||"),
              ("params", "spectral", "mean_angle_deg", "mean largest principal angle (deg)"),
              ("params", "spectral", "mean_overlap", "1 - mean subspace overlap"),
              ("eval", "overall", "kl", "KL(current || initial) per token"),
              ("eval", "overall", "similarity", "similarity to initial responses"),
              ("params", "cosine", "1 - cosine(θ, θ0)"))
    for ax, (*keys, title) in zip([a for row in axes for a in row], panels):
        for r, name, st in zip(records, names, styles):
            ys = series(r, *keys)
            if title.startswith("1 - "):
                ys = [1 - y for y in ys]
            ax.plot(range(len(r["stages"])), ys, label=name, **st)
        ax.set_title(title, fontsize=9)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useOffset=False)
        stage_axis(ax, labels)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("drift from the initial model after every stage", fontsize=10)
    files["drift"] = save(fig, plots / "compare_drift.png")

    fig, axes = figure(2, 3, w=3.8)
    for ax, (key, title) in zip([a for row in axes for a in row], ARTIFACT_PANELS):
        for r, name, st in zip(records, names, styles):
            ax.plot(range(len(r["stages"])), series(r, "eval", "overall", "artifacts", key), label=name, **st)
        ax.set_title(title, fontsize=9)
        if key.endswith("_rate"):
            ax.set_ylim(-0.03, 1.03)
        stage_axis(ax, labels)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("formatting artifacts on the fixed eval prompts (all tasks pooled)", fontsize=10)
    files["artifacts"] = save(fig, plots / "compare_artifacts.png")
    return files
