"""Reports: ``report.md`` and PNG plots of one continual run, or of several runs overlaid.

    write_run_report(run_dir)                  # from <run>/continual.json
    write_compare_report([run_a, run_b], out)  # the same plots, one line per run

Plots use matplotlib's object-oriented API on an Agg canvas (``Figure`` + ``savefig``), so no
global backend is switched and no display is needed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

ARTIFACT_PANELS = (
    ("repeated_answer_rate", "repeated answer markers (rate)"),
    ("repeated_ngram_rate", "repeated word 3-grams (seq-rep-3)"),
    ("length_limit_rate", "hit the length limit (rate)"),
    ("no_answer_rate", "no answer marker (rate)"),
    ("mean_length", "mean response length (tokens)"),
    ("mean_entropy", "mean per-token entropy (nats)"),
)
KIND_ORDER = ("attention", "mlp", "embeddings", "norms", "other")


# ------------------------------------------------------------------------------------- loading


def load_run(run: str | Path) -> dict:
    """``continual.json`` of a run directory (or the file itself), with ``run_dir`` added."""
    path = Path(run)
    if path.is_dir():
        path = path / "continual.json"
    if not path.is_file():
        raise ValueError(f"{run}: no continual.json (is it a `denser continual` run directory?)")
    record = json.loads(path.read_text())
    if record.get("kind") != "denser.continual":
        raise ValueError(f"{path} is not a denser continual record")
    record["run_dir"] = str(path.parent)
    return record


def stage_labels(record: dict) -> list[str]:
    return ["initial"] + [f"{s['stage']}: {s['task']}" for s in record["stages"][1:]]


def _get(d: Any, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def _series(record: dict, *keys) -> list[float]:
    """A value per stage (NaN where missing), for plotting."""
    return [_nan(_get(s, *keys)) for s in record["stages"]]


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 0.01 or abs(v) >= 10 ** 5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def _one_minus(v):
    return None if v is None else 1.0 - v


def _signed(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}"


def run_label(record: dict) -> str:
    obj = record["objective"]
    args = record.get("objective_args") or {}
    teacher = args.get("teacher")
    if teacher and "sdpo" in obj:
        return f"{obj} ({teacher} teacher)"
    if teacher and obj.startswith("hybrid"):
        return f"{obj} ({teacher} teacher)"
    return obj


# --------------------------------------------------------------------------------------- plots


def _figure(rows: int, cols: int, w: float = 4.2, h: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * cols, h * rows), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _stage_axis(ax, labels: Sequence[str]) -> None:
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("after stage")
    ax.grid(alpha=0.3)


def plot_accuracy_matrix(ax, record: dict, *, title: str | None = None, colorbar: bool = True) -> None:
    import numpy as np

    R = np.array([[_nan(v) for v in row] for row in record["accuracy_matrix"]], dtype=float)
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

    fig, axes = _figure(1, 1, w=1.1 * max(5, len(record["columns"])) + 2.5, h=0.55 * len(labels) + 2.2)
    plot_accuracy_matrix(axes[0][0], record)
    files["accuracy_matrix"] = _save(fig, out_dir / "accuracy_matrix.png")

    fig, axes = _figure(1, 1, w=6.5, h=4.0)
    ax = axes[0][0]
    for i, c in enumerate(record["columns"]):
        held = c in record.get("heldout_tasks", [])
        ax.plot(x, _series(record, "accuracy", c), marker="o", ls="--" if held else "-",
                label=c + (" (held-out)" if held else ""), color=f"C{i % 10}")
    _shade_stages(ax, record)
    _stage_axis(ax, labels)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("greedy accuracy")
    ax.set_title(f"accuracy per task across stages: {run_label(record)}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    files["accuracy_per_task"] = _save(fig, out_dir / "accuracy_per_task.png")

    fig, axes = _figure(2, 2)
    ax = axes[0][0]
    ax.plot(x, _series(record, "params", "relative_l2"), marker="o", color="black", label="all")
    for i, kind in enumerate(KIND_ORDER):
        ys = _series(record, "params", "by_kind", kind, "relative_l2")
        if not all(math.isnan(y) for y in ys):
            ax.plot(x, ys, marker=".", label=kind, color=f"C{i}")
    ax.set_ylabel("||θ - θ0|| / ||θ0||")
    ax.set_title("parameter drift (relative L2)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    ax.plot(x, _series(record, "params", "spectral", "mean_angle_deg"), marker="o", label="mean over matrices")
    ax.plot(x, _series(record, "params", "spectral", "max_angle_deg"), marker="^", label="max over matrices")
    ax.set_ylabel("largest principal angle (deg)")
    rank = _get(record, "continual", "spectral_rank")
    ax.set_title(f"rotation of top-{rank} left singular subspaces", fontsize=9, loc="left")
    ax2 = ax.twinx()
    ax2.plot(x, [1 - v for v in _series(record, "params", "spectral", "mean_overlap")], marker="s", color="C3",
             ls=":", label="1 - mean overlap (right)")
    ax2.set_ylabel("1 - ||UᵀU0||²_F / r", color="C3")
    ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useOffset=False)
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left")
    ax = axes[1][0]
    ax.plot(x, _series(record, "eval", "overall", "kl"), marker="o", color="black", label="all prompts")
    for i, c in enumerate(record["columns"]):
        ax.plot(x, _series(record, "eval", "tasks", c, "kl"), marker=".", lw=0.8, alpha=0.7, label=c, color=f"C{i % 10}")
    ax.set_ylabel("nats / token")
    ax.set_title("response drift: KL(current || initial) on own responses", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1][1]
    ax.plot(x, _series(record, "eval", "overall", "similarity"), marker="o", color="black", label="difflib ratio")
    ax.plot(x, _series(record, "eval", "overall", "token_f1"), marker="s", color="gray", ls="--", label="word F1")
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("similarity to initial response")
    ax.set_title("response drift: similarity to the initial model's responses", fontsize=9)
    ax.legend(fontsize=7)
    for row in axes:
        for a in row:
            _stage_axis(a, labels)
    fig.suptitle(f"drift from the initial model: {run_label(record)}", fontsize=10)
    files["drift"] = _save(fig, out_dir / "drift.png")

    fig, axes = _figure(2, 3, w=3.8)
    for (key, title), ax in zip(ARTIFACT_PANELS, [a for row in axes for a in row]):
        ax.plot(x, _series(record, "eval", "overall", "artifacts", key), marker="o", color="black", label="all prompts")
        for i, c in enumerate(record["columns"]):
            ax.plot(x, _series(record, "eval", "tasks", c, "artifacts", key), marker=".", lw=0.8, alpha=0.6,
                    label=c, color=f"C{i % 10}")
        ax.set_title(title, fontsize=9)
        if key.endswith("_rate"):
            ax.set_ylim(-0.03, 1.03)
        _stage_axis(ax, labels)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"formatting artifacts on the fixed eval prompts: {run_label(record)}", fontsize=10)
    files["artifacts"] = _save(fig, out_dir / "artifacts.png")

    steps = [(s["stage"], r) for s in record["stages"][1:] for r in (_get(s, "train", "steps_log") or [])]
    if steps:
        fig, axes = _figure(1, 1, w=6.5, h=3.5)
        ax = axes[0][0]
        xs = list(range(1, len(steps) + 1))
        ax.plot(xs, [_nan(r.get("reward_mean")) for _, r in steps], marker="o", color="black", label="mean reward")
        ax.plot(xs, [_nan(r.get("truncated_frac")) for _, r in steps], marker=".", color="C3", ls=":",
                label="length-limit rate (samples)")
        start = 1
        for s in record["stages"][1:]:
            n = len(_get(s, "train", "steps_log") or [])
            ax.axvspan(start - 0.5, start + n - 0.5, color=f"C{(s['stage'] - 1) % 10}", alpha=0.08, lw=0)
            ax.text(start - 0.4, 1.0, s["task"], fontsize=7, va="top")
            start += n
        ax.set_ylim(-0.03, 1.05)
        ax.set_xlabel("training step (whole sequence)")
        ax.set_title(f"training rollouts: {run_label(record)}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        files["training"] = _save(fig, out_dir / "training.png")
    return files


def _save(fig, path: Path) -> str:
    fig.savefig(path)
    return path.name


# -------------------------------------------------------------------------------------- report


def _matrix_table(record: dict) -> list[str]:
    cols = [c + (" †" if c in record.get("heldout_tasks", []) else "") for c in record["columns"]]
    lines = ["| after stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, row in zip(stage_labels(record), record["accuracy_matrix"]):
        lines.append(f"| {label} | " + " | ".join(_fmt(v, 2) for v in row) + " |")
    if record.get("heldout_tasks"):
        lines.append("")
        lines.append("† held out: never trained on.")
    return lines


def _metrics_lines(record: dict) -> list[str]:
    m = record.get("metrics")
    if not m:
        return ["(the sequence is not complete yet: continual-learning measures are computed at the end)"]
    T = len(record["train_tasks"])
    lines = [
        "- average accuracy over the tasks seen so far, per stage: "
        + ", ".join(_fmt(v, 3) for v in m["average_accuracy"][1:]) + f" (final **{_fmt(m['final_average_accuracy'])}**)",
        "- average forgetting (best earlier accuracy minus current), per stage: "
        + ", ".join(_fmt(v, 3) for v in m["average_forgetting"][1:]) + f" (final **{_fmt(m['final_average_forgetting'])}**)",
        f"- backward transfer BWT (final): **{_signed(m['final_backward_transfer'])}**; forward transfer FWT "
        f"(vs the initial model): **{_signed(m['forward_transfer'])}**",
        "- learning gain of each stage on its own task R[j,j] - R[j-1,j]: "
        + ", ".join(f"{t} {_signed(v)}" for t, v in m["learning_gain"].items()),
        "- forgetting per task after the last stage: "
        + ", ".join(f"{t} {_fmt(v[T], 3)}" for t, v in m["forgetting"].items()),
    ]
    if record.get("heldout_tasks"):
        lines.append("- held-out mean accuracy per stage: " + ", ".join(_fmt(v, 3) for v in m["heldout_mean_accuracy"])
                     + f" (change from the initial model at the end: **{_signed(m['heldout_mean_delta'][T])}**)")
    return lines


def _drift_table(record: dict) -> list[str]:
    kinds = [k for k in KIND_ORDER if any(_get(s, "params", "by_kind", k) for s in record["stages"])]
    head = ["after stage", "rel. L2", *[f"rel. L2 {k}" for k in kinds], "1 - cosine", "mean angle°", "max angle°",
            "1 - mean overlap", "KL(cur‖init)/tok", "similarity", "word F1"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, s in zip(stage_labels(record), record["stages"]):
        vals = [_fmt(_get(s, "params", "relative_l2")), *[_fmt(_get(s, "params", "by_kind", k, "relative_l2")) for k in kinds],
                _fmt(_one_minus(_get(s, "params", "cosine"))), _fmt(_get(s, "params", "spectral", "mean_angle_deg"), 2),
                _fmt(_get(s, "params", "spectral", "max_angle_deg"), 2),
                _fmt(_one_minus(_get(s, "params", "spectral", "mean_overlap"))),
                _fmt(_get(s, "eval", "overall", "kl"), 4), _fmt(_get(s, "eval", "overall", "similarity")),
                _fmt(_get(s, "eval", "overall", "token_f1"))]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return lines


def _artifact_table(record: dict) -> list[str]:
    head = ["after stage", "repeated answer", "no answer", "rep-3", "length limit", "mean length", "entropy"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, s in zip(stage_labels(record), record["stages"]):
        a = _get(s, "eval", "overall", "artifacts") or {}
        lines.append(f"| {label} | " + " | ".join(_fmt(a.get(k)) for k in (
            "repeated_answer_rate", "no_answer_rate", "repeated_ngram_rate", "length_limit_rate")) +
            f" | {_fmt(a.get('mean_length'), 1)} | {_fmt(a.get('mean_entropy'))} |")
    return lines


def _examples(record: dict, per_task: int = 1) -> list[str]:
    run = Path(record["run_dir"])
    first, last = run / "responses" / "stage-000.jsonl", run / "responses" / f"stage-{len(record['stages']) - 1:03d}.jsonl"
    if not first.exists() or not last.exists() or first == last:
        return []
    a = [json.loads(x) for x in first.read_text().splitlines()]
    b = [json.loads(x) for x in last.read_text().splitlines()]
    lines = ["| task | initial response | final response |", "|---|---|---|"]
    for name in record["columns"]:
        pairs = [(x, y) for x, y in zip(a, b) if x["task"] == name == y["task"]][:per_task]
        for x, y in pairs:
            lines.append(f"| {name} | {_cell(x)} | {_cell(y)} |")
    return lines


def _cell(row: dict) -> str:
    text = row["text"].replace("|", "\\|").replace("\n", "⏎")
    mark = "✓" if row.get("success") else "✗"
    return f"{mark} `{text[:160]}`" + (" (cut)" if row.get("truncated") else "")


def _config_line(record: dict) -> str:
    c = record.get("config", {})
    cc = record.get("continual", {})
    keys = ["lr", "num_generations", "prompts_per_step", "max_new_tokens", "temperature", "eval_size", "seed", "dtype"]
    parts = [f"steps per task {cc.get('steps_per_task')}",
             "optimizer carried" if cc.get("carry_optimizer") else "optimizer reset per stage"]
    parts += [f"{k} {c.get(k)}" for k in keys if k in c]
    return ", ".join(parts)


def write_run_report(run_dir: str | Path, *, record: dict | None = None) -> Path:
    """``<run>/report.md`` and ``<run>/plots/*.png`` from the run's record (default: its continual.json)."""
    run_dir = Path(run_dir)
    if record is None:
        record = load_run(run_dir)
    record = {**record, "run_dir": str(run_dir)}
    files = plot_run(record, run_dir / "plots")
    args = record.get("objective_args") or {}
    lines = [
        f"# Continual post-training: {run_label(record)}",
        "",
        f"Model `{record['model']}`; tasks in order: {', '.join(f'`{t}`' for t in record['train_tasks'])}"
        + (f"; held out: {', '.join(f'`{t}`' for t in record['heldout_tasks'])}" if record.get("heldout_tasks") else "")
        + f". {_config_line(record)}. Status: {record.get('status')}"
        + (f", {record['elapsed_s'] / 60:.1f} min" if record.get("elapsed_s") else "") + ".",
        "",
    ]
    if record.get("command"):
        lines += ["```", record["command"], "```", ""]
    lines += [f"Objective arguments: `{json.dumps(args, sort_keys=True)}`", "",
              f"Every accuracy is greedy decoding on the same first {_get(record, 'eval', 'eval_size')} prompts of each "
              f"task's eval split (max {_get(record, 'eval', 'max_new_tokens')} new tokens).", "",
              "## Accuracy matrix", "", f"![accuracy matrix](plots/{files['accuracy_matrix']})", "",
              *_matrix_table(record), "", f"![accuracy per task](plots/{files['accuracy_per_task']})", "",
              "## Continual-learning measures", "", *_metrics_lines(record), "",
              "## Drift from the initial model", "", f"![drift](plots/{files['drift']})", "", *_drift_table(record), "",
              "Relative L2 = ||θ-θ0||/||θ0||; angle = largest principal angle between the top-r left singular "
              "subspaces of each weight matrix and its initial value (r = the run's spectral rank); overlap = "
              "||UᵀU0||²_F / r (1 = same subspace); KL = mean per-token "
              "KL(current || initial) along the current model's greedy responses; similarity = difflib ratio "
              "to the initial model's response to the same prompt.", "",
              "## Formatting artifacts", "", f"![artifacts](plots/{files['artifacts']})", "", *_artifact_table(record), ""]
    if "training" in files:
        lines += ["## Training rollouts", "", f"![training](plots/{files['training']})", ""]
    ex = _examples(record)
    if ex:
        lines += ["## Example responses (first eval prompt of each task)", "", *ex, ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out


# ------------------------------------------------------------------------------------- compare


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
                     f"{_fmt((r.get('elapsed_s') or 0) / 60, 1)} |")
    lines += ["", f"Settings of the first run: {_config_line(records[0])}.", "", "## Summary", ""]
    head = ["run", "final avg acc", "avg forgetting", "worst avg forgetting", "BWT", "FWT", "held-out Δ", "rel. L2", "mean angle°",
            "KL/tok", "similarity", "repeated answer", "rep-3", "length limit", "entropy"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, r in zip(names, records):
        m = r.get("metrics") or {}
        T = len(r["train_tasks"])
        last = r["stages"][-1]
        art = _get(last, "eval", "overall", "artifacts") or {}
        held = (m.get("heldout_mean_delta") or [None] * (T + 1))[T] if m else None
        lines.append("| " + " | ".join([
            name, _fmt(m.get("final_average_accuracy")), _fmt(m.get("final_average_forgetting")),
            _fmt(max((v for v in m.get("average_forgetting") or [] if v is not None), default=None)),
            _signed(m.get("final_backward_transfer")), _signed(m.get("forward_transfer")), _signed(held),
            _fmt(_get(last, "params", "relative_l2")), _fmt(_get(last, "params", "spectral", "mean_angle_deg"), 2),
            _fmt(_get(last, "eval", "overall", "kl"), 4), _fmt(_get(last, "eval", "overall", "similarity")),
            _fmt(art.get("repeated_answer_rate")), _fmt(art.get("repeated_ngram_rate")),
            _fmt(art.get("length_limit_rate")), _fmt(art.get("mean_entropy"))]) + " |")
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
        lines += [f"### {name}", "", *_matrix_table(r), ""]
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

    fig, axes = _figure(1, 4, w=3.8)
    for r, name, st, dx in zip(records, names, styles, shift):
        m = r.get("metrics") or {}
        T = len(r["train_tasks"])
        x = [k + dx for k in range(T + 1)]
        axes[0][0].plot(x, [_nan(v) for v in (m.get("average_accuracy") or [None] * (T + 1))], label=name, **st)
        axes[0][1].plot(x, [_nan(v) for v in (m.get("average_forgetting") or [None] * (T + 1))], label=name, **st)
        axes[0][2].plot(x, [_nan(v) for v in (m.get("heldout_mean_accuracy") or [None] * (T + 1))], label=name, **st)
        axes[0][3].plot(x, [_nan(_get(s, "eval", "overall", "artifacts", "repeated_answer_rate")) for s in r["stages"]],
                        label=name, **st)
    for i, (ax, title) in enumerate(zip(axes[0], ("average accuracy on tasks seen so far", "average forgetting",
                                                  "held-out mean accuracy", "repeated answer markers (rate)"))):
        ax.set_title(title, fontsize=9)
        if i == 1:
            ax.axhline(0.0, color="gray", lw=0.8)
        else:
            ax.set_ylim(-0.03, 1.03)
        _stage_axis(ax, labels)
    axes[0][0].legend(fontsize=7)
    files["summary"] = _save(fig, plots / "compare_summary.png")

    columns = []
    for r in records:
        columns += [c for c in r["columns"] if c not in columns]
    cols = min(4, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig, axes = _figure(rows, cols, w=3.6, h=3.0)
    flat = [a for row in axes for a in row]
    for ax, c in zip(flat, columns):
        for r, name, st, dx in zip(records, names, styles, shift):
            if c in r["columns"]:
                ax.plot([k + dx for k in range(len(r["stages"]))], _series(r, "accuracy", c), label=name, **st)
        held = any(c in r.get("heldout_tasks", []) for r in records)
        trained_at = [r["train_tasks"].index(c) + 1 for r in records if c in r["train_tasks"]]
        if trained_at and len(set(trained_at)) == 1:
            ax.axvspan(trained_at[0] - 0.5, trained_at[0] + 0.5, color="gray", alpha=0.12, lw=0)
        ax.set_title(c + (" (held-out)" if held else f" (trained in stage {trained_at[0]})" if trained_at else ""),
                     fontsize=9)
        ax.set_ylim(-0.03, 1.03)
        _stage_axis(ax, labels)
    for ax in flat[len(columns):]:
        ax.axis("off")
    flat[0].legend(fontsize=7)
    fig.suptitle("greedy accuracy per task after every stage (shaded: the stage that trains it; runs shifted "
                 "sideways so that equal values stay visible)", fontsize=10)
    files["accuracy"] = _save(fig, plots / "compare_accuracy.png")

    n = len(records)
    fig, axes = _figure(1, n, w=1.0 * max(5, len(columns)) + 1.5, h=0.5 * width + 2.4)
    for ax, r, name in zip(axes[0], records, names):
        plot_accuracy_matrix(ax, r, title=name, colorbar=False)
    files["matrices"] = _save(fig, plots / "compare_matrices.png")

    fig, axes = _figure(2, 3, w=3.8)
    panels = (("params", "relative_l2", "parameter drift ||θ-θ0||/||θ0||"),
              ("params", "spectral", "mean_angle_deg", "mean largest principal angle (deg)"),
              ("params", "spectral", "mean_overlap", "1 - mean subspace overlap"),
              ("eval", "overall", "kl", "KL(current || initial) per token"),
              ("eval", "overall", "similarity", "similarity to initial responses"),
              ("params", "cosine", "1 - cosine(θ, θ0)"))
    for ax, (*keys, title) in zip([a for row in axes for a in row], panels):
        for r, name, st in zip(records, names, styles):
            ys = _series(r, *keys)
            if title.startswith("1 - "):
                ys = [1 - y for y in ys]
            ax.plot(range(len(r["stages"])), ys, label=name, **st)
        ax.set_title(title, fontsize=9)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3), useOffset=False)
        _stage_axis(ax, labels)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("drift from the initial model after every stage", fontsize=10)
    files["drift"] = _save(fig, plots / "compare_drift.png")

    fig, axes = _figure(2, 3, w=3.8)
    for ax, (key, title) in zip([a for row in axes for a in row], ARTIFACT_PANELS):
        for r, name, st in zip(records, names, styles):
            ax.plot(range(len(r["stages"])), _series(r, "eval", "overall", "artifacts", key), label=name, **st)
        ax.set_title(title, fontsize=9)
        if key.endswith("_rate"):
            ax.set_ylim(-0.03, 1.03)
        _stage_axis(ax, labels)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("formatting artifacts on the fixed eval prompts (all tasks pooled)", fontsize=10)
    files["artifacts"] = _save(fig, plots / "compare_artifacts.png")
    return files
