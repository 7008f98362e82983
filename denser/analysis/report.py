"""``report.md`` of one continual run, rendered from its ``continual.json``.

    write_run_report(run_dir)                  # <run>/report.md and <run>/plots/*.png

Several runs (seeds of several configurations) are compared by :mod:`denser.analysis.compare`.
"""

from __future__ import annotations

import json
from pathlib import Path

from denser.analysis.plotting import KIND_ORDER, plot_run
from denser.analysis.records import config_line, dig, fmt, load_run, one_minus, run_label, signed, stage_labels


def matrix_table(record: dict) -> list[str]:
    cols = [c + (" †" if c in record.get("heldout_tasks", []) else "") for c in record["columns"]]
    lines = ["| after stage | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, row in zip(stage_labels(record), record["accuracy_matrix"]):
        lines.append(f"| {label} | " + " | ".join(fmt(v, 2) for v in row) + " |")
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
        + ", ".join(fmt(v, 3) for v in m["average_accuracy"][1:]) + f" (final **{fmt(m['final_average_accuracy'])}**)",
        "- average forgetting (best accuracy since the stage that trained the task, minus current), per stage: "
        + ", ".join(fmt(v, 3) for v in m["average_forgetting"][1:]) + f" (final **{fmt(m['final_average_forgetting'])}**)",
        f"- backward transfer BWT (final): **{signed(m['final_backward_transfer'])}**; forward transfer FWT "
        f"(vs the initial model): **{signed(m['forward_transfer'])}**",
        "- learning gain of each stage on its own task R[j,j] - R[j-1,j]: "
        + ", ".join(f"{t} {signed(v)}" for t, v in m["learning_gain"].items()),
        "- forgetting per task after the last stage: "
        + ", ".join(f"{t} {fmt(v[T], 3)}" for t, v in m["forgetting"].items()),
    ]
    if record.get("heldout_tasks"):
        lines.append("- held-out mean accuracy per stage: " + ", ".join(fmt(v, 3) for v in m["heldout_mean_accuracy"])
                     + f" (change from the initial model at the end: **{signed(m['heldout_mean_delta'][T])}**)")
    return lines


def _drift_table(record: dict) -> list[str]:
    kinds = [k for k in KIND_ORDER if any(dig(s, "params", "by_kind", k) for s in record["stages"])]
    head = ["after stage", "rel. L2", *[f"rel. L2 {k}" for k in kinds], "1 - cosine", "mean angle°", "max angle°",
            "1 - mean overlap", "KL(cur‖init)/tok", "similarity", "word F1"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, s in zip(stage_labels(record), record["stages"]):
        vals = [fmt(dig(s, "params", "relative_l2")), *[fmt(dig(s, "params", "by_kind", k, "relative_l2")) for k in kinds],
                fmt(one_minus(dig(s, "params", "cosine"))), fmt(dig(s, "params", "spectral", "mean_angle_deg"), 2),
                fmt(dig(s, "params", "spectral", "max_angle_deg"), 2),
                fmt(one_minus(dig(s, "params", "spectral", "mean_overlap"))),
                fmt(dig(s, "eval", "overall", "kl"), 4), fmt(dig(s, "eval", "overall", "similarity")),
                fmt(dig(s, "eval", "overall", "token_f1"))]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return lines


def _artifact_table(record: dict) -> list[str]:
    head = ["after stage", "repeated answer", "no answer", "rep-3", "length limit", "mean length", "entropy"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label, s in zip(stage_labels(record), record["stages"]):
        a = dig(s, "eval", "overall", "artifacts") or {}
        lines.append(f"| {label} | " + " | ".join(fmt(a.get(k)) for k in (
            "repeated_answer_rate", "no_answer_rate", "repeated_ngram_rate", "length_limit_rate")) +
            f" | {fmt(a.get('mean_length'), 1)} | {fmt(a.get('mean_entropy'))} |")
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
        + f". {config_line(record)}. Status: {record.get('status')}"
        + (f", {record['elapsed_s'] / 60:.1f} min" if record.get("elapsed_s") else "") + ".",
        "",
    ]
    if record.get("command"):
        lines += ["```", record["command"], "```", ""]
    lines += [f"Objective arguments: `{json.dumps(args, sort_keys=True)}`", "",
              f"Every accuracy is greedy decoding on the same first {dig(record, 'eval', 'eval_size')} prompts of each "
              f"task's eval split (max {dig(record, 'eval', 'max_new_tokens')} new tokens).", "",
              "## Accuracy matrix", "", f"![accuracy matrix](plots/{files['accuracy_matrix']})", "",
              *matrix_table(record), "", f"![accuracy per task](plots/{files['accuracy_per_task']})", "",
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
