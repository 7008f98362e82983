"""A `denser continual` run's record (``continual.json``) as the reports read it: loading, labels,
and the small accessors and number formats every report module shares."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


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


def dig(d: Any, *keys, default=None):
    """``d[k0][k1]...``, or ``default`` where a key is missing or a value is None."""
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def nan(v) -> float:
    return float("nan") if v is None else float(v)


def series(record: dict, *keys) -> list[float]:
    """A value per stage (NaN where missing), for plotting."""
    return [nan(dig(s, *keys)) for s in record["stages"]]


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 0.01 or abs(v) >= 10 ** 5):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def signed(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}"


def one_minus(v):
    return None if v is None else 1.0 - v


def run_label(record: dict) -> str:
    """The objective as recorded, with its teacher (sdpo, hybrid) and lam (hybrid)."""
    obj = record["objective"]
    args = record.get("objective_args") or {}
    teacher = args.get("teacher")
    extra = []
    if obj.startswith("hybrid") and args.get("lam") is not None:
        extra.append(f"lam {args['lam']:g}")
    if teacher and ("sdpo" in obj or obj.startswith("hybrid")):
        extra.append(f"{teacher} teacher")
    return f"{obj} ({', '.join(extra)})" if extra else obj


def config_line(record: dict) -> str:
    c = record.get("config", {})
    cc = record.get("continual", {})
    keys = ["lr", "num_generations", "prompts_per_step", "max_new_tokens", "temperature", "eval_size", "seed", "dtype"]
    parts = [f"steps per task {cc.get('steps_per_task')}",
             "optimizer carried" if cc.get("carry_optimizer") else "optimizer reset per stage"]
    parts += [f"{k} {c.get(k)}" for k in keys if k in c]
    return ", ".join(parts)
