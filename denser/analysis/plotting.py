"""Plots of one continual run: the accuracy matrix, accuracy per task, drift, formatting artifacts
and the training rollouts, as PNGs.

Plots use matplotlib's object-oriented API on an Agg canvas (``Figure`` + ``savefig``), so no
global backend is switched and no display is needed. The helpers (``figure``, ``stage_axis``,
``save``) are shared with the comparison plots (:mod:`denser.analysis.compare_plots`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from denser.analysis.records import dig, nan, run_label, series, stage_labels

ARTIFACT_PANELS = (
    ("repeated_answer_rate", "repeated answer markers (rate)"),
    ("repeated_ngram_rate", "repeated word 3-grams (seq-rep-3)"),
    ("length_limit_rate", "hit the length limit (rate)"),
    ("no_answer_rate", "no answer marker (rate)"),
    ("mean_length", "mean response length (tokens)"),
    ("mean_entropy", "mean per-token entropy (nats)"),
)
KIND_ORDER = ("attention", "mlp", "embeddings", "norms", "other")


def figure(rows: int, cols: int, w: float = 4.2, h: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * cols, h * rows), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def stage_axis(ax, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("after stage")
    ax.grid(alpha=0.3)


def plot_accuracy_matrix(ax, record: dict, *, title: str | None = None, colorbar: bool = True) -> None:
    import numpy as np

    R = np.array([[nan(v) for v in row] for row in record["accuracy_matrix"]], dtype=float)
    cols = [c + (" (held-out)" if c in record.get("heldout_tasks", []) else "") for c in record["columns"]]
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30, ha="right", fontsize=8)
    labels = stage_labels(record)[: R.shape[0]]
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after stage")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            if not math.isnan(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if R[i, j] > 0.6 else "white")
    T = len(record["train_tasks"])
    if T < R.shape[1]:
        ax.axvline(T - 0.5, color="white", lw=2)
    ax.set_title(title or f"accuracy matrix R[stage, task]: {run_label(record)}", fontsize=9)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.8, label="greedy accuracy")


def _shade_stages(ax, record: dict) -> None:
    """Light bands naming the task each stage trained on."""
    for s in record["stages"][1:]:
        k = s["stage"]
        ax.axvspan(k - 0.5, k + 0.5, color=f"C{(k - 1) % 10}", alpha=0.06, lw=0)


def plot_run(record: dict, out_dir: Path) -> dict[str, str]:
    """Write the per-run PNGs into ``out_dir``; returns ``{name: file name}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    labels = stage_labels(record)
    x = list(range(len(labels)))

    fig, axes = figure(1, 1, w=1.1 * max(5, len(record["columns"])) + 2.5, h=0.55 * len(labels) + 2.2)
    plot_accuracy_matrix(axes[0][0], record)
    files["accuracy_matrix"] = save(fig, out_dir / "accuracy_matrix.png")

    fig, axes = figure(1, 1, w=6.5, h=4.0)
    ax = axes[0][0]
    for i, c in enumerate(record["columns"]):
        held = c in record.get("heldout_tasks", [])
        ax.plot(x, series(record, "accuracy", c), marker="o", ls="--" if held else "-",
                label=c + (" (held-out)" if held else ""), color=f"C{i % 10}")
    _shade_stages(ax, record)
    stage_axis(ax, labels)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("greedy accuracy")
    ax.set_title(f"accuracy per task across stages: {run_label(record)}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    files["accuracy_per_task"] = save(fig, out_dir / "accuracy_per_task.png")

    fig, axes = figure(2, 2)
    ax = axes[0][0]
    ax.plot(x, series(record, "params", "relative_l2"), marker="o", color="black", label="all")
    for i, kind in enumerate(KIND_ORDER):
        ys = series(record, "params", "by_kind", kind, "relative_l2")
        if not all(math.isnan(y) for y in ys):
            ax.plot(x, ys, marker=".", label=kind, color=f"C{i}")
    ax.set_ylabel("||θ - θ0|| / ||θ0||")
    ax.set_title("parameter drift (relative L2)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.plot(x, series(record, "params", "spectral", "mean_angle_deg"), marker="o", label="mean over matrices")
    ax.plot(x, series(record, "params", "spectral", "max_angle_deg"), marker="^", label="max over matrices")
    ax.set_ylabel("largest principal angle (deg)")
    rank = dig(record, "continual", "spectral_rank")
    ax.set_title(f"rotation of top-{rank} left singular subspaces", fontsize=9, loc="left")
    ax2 = ax.twinx()
    ax2.plot(x, [1 - v for v in series(record, "params", "spectral", "mean_overlap")], marker="s", color="C3",
             ls=":", label="1 - mean overlap (right)")
    ax2.set_ylabel("1 - ||UᵀU0||²_F / r", color="C3")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useOffset=False)
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    ax = axes[1][0]
    ax.plot(x, series(record, "eval", "overall", "kl"), marker="o", color="black", label="all prompts")
    for i, c in enumerate(record["columns"]):
        ax.plot(x, series(record, "eval", "tasks", c, "kl"), marker=".", lw=0.8, alpha=0.7, label=c, color=f"C{i % 10}")
    ax.set_ylabel("nats / token")
    ax.set_title("response drift: KL(current || initial) on own responses", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.plot(x, series(record, "eval", "overall", "similarity"), marker="o", color="black", label="difflib ratio")
    ax.plot(x, series(record, "eval", "overall", "token_f1"), marker="s", color="gray", ls="--", label="word F1")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("similarity to initial response")
    ax.set_title("response drift: similarity to the initial model's responses", fontsize=9)
    ax.legend(fontsize=7)
    for row in axes:
        for a in row:
            stage_axis(a, labels)
    fig.suptitle(f"drift from the initial model: {run_label(record)}", fontsize=10)
    files["drift"] = save(fig, out_dir / "drift.png")

    fig, axes = figure(2, 3, w=3.8)
    for (key, title), ax in zip(ARTIFACT_PANELS, [a for row in axes for a in row]):
        ax.plot(x, series(record, "eval", "overall", "artifacts", key), marker="o", color="black", label="all prompts")
        for i, c in enumerate(record["columns"]):
            ax.plot(x, series(record, "eval", "tasks", c, "artifacts", key), marker=".", lw=0.8, alpha=0.6,
                    label=c, color=f"C{i % 10}")
        ax.set_title(title, fontsize=9)
        if key.endswith("_rate"):
            ax.set_ylim(-0.03, 1.03)
        stage_axis(ax, labels)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"formatting artifacts on the fixed eval prompts: {run_label(record)}", fontsize=10)
    files["artifacts"] = save(fig, out_dir / "artifacts.png")

    steps = [(s["stage"], r) for s in record["stages"][1:] for r in (dig(s, "train", "steps_log") or [])]
    if steps:
        fig, axes = figure(1, 1, w=6.5, h=3.5)
        ax = axes[0][0]
        xs = list(range(1, len(steps) + 1))
        ax.plot(xs, [nan(r.get("reward_mean")) for _, r in steps], marker="o", color="black", label="mean reward")
        ax.plot(xs, [nan(r.get("truncated_frac")) for _, r in steps], marker=".", color="C3", ls=":",
                label="length-limit rate (samples)")
        start = 1
        for s in record["stages"][1:]:
            n = len(dig(s, "train", "steps_log") or [])
            ax.axvspan(start - 0.5, start + n - 0.5, color=f"C{(s['stage'] - 1) % 10}", alpha=0.08, lw=0)
            ax.text(start - 0.4, 1.0, s["task"], fontsize=7, va="top")
            start += n
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("training step (whole sequence)")
        ax.set_title(f"training rollouts: {run_label(record)}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        files["training"] = save(fig, out_dir / "training.png")
    return files


def save(fig, path: Path) -> str:
    fig.savefig(path)
    return path.name


