"""Every drift measure between two models, for runs made anywhere (``denser report drift A B``).

A model is named by any of:

- ``default`` / ``tiny`` / a Hugging Face model directory (with ``config.json``);
- a checkpoint directory ``<run>/checkpoints/step-XXXXXX`` (its ``model/``);
- a ``denser train`` run directory (its newest complete checkpoint);
- a ``denser continual`` run directory (its last stage), or ``RUN@K`` for the model after stage K
  (``RUN@0`` = the model the run started from).

``compare_checkpoints(a, b)`` measures B against A as the continual runner measures a stage
against the initial model: parameter drift of B from A, and on fixed prompts both models' accuracy
and artifacts, KL(B || A) along B's greedy responses and the similarity of B's responses to A's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from denser.analysis.records import fmt


def resolve_model(spec: str) -> str:
    """The ``load_model`` name or directory that ``spec`` (see the module docstring) refers to."""
    from denser.trainers import checkpoint as ckpt
    from denser.trainers.models import KNOWN_MODELS

    if spec.strip().lower() in KNOWN_MODELS:
        return spec.strip()
    base, sep, stage = spec.rpartition("@")
    path = Path(base if sep and stage.isdigit() else spec).expanduser()
    if (path / "continual.json").is_file():
        record = json.loads((path / "continual.json").read_text())
        stages = record.get("stages") or []
        k = int(stage) if sep and stage.isdigit() else len(stages) - 1
        if not 0 <= k < len(stages):
            raise ValueError(f"{spec}: the continual run has stages 0..{len(stages) - 1}")
        if k == 0:
            return resolve_model(record["model"])
        return str(Path(stages[k]["checkpoint"]) / "model")
    if sep and stage.isdigit():
        raise ValueError(f"{spec}: '@K' names a stage of a `denser continual` run, and {base} is not one")
    if (path / "config.json").is_file():
        return str(path)
    if (path / "model" / "config.json").is_file():
        return str(path / "model")
    latest = ckpt.latest_checkpoint(path)
    if latest is not None:
        return str(latest / "model")
    raise ValueError(f"{spec}: not a model name ({', '.join(KNOWN_MODELS)}), a model or checkpoint directory, "
                     "or a run directory with a complete checkpoint")


def tasks_of(spec: str) -> list[str]:
    """The eval columns of a continual run named by ``spec`` (empty for anything else)."""
    path = Path(spec.rpartition("@")[0] if "@" in spec else spec).expanduser()
    if (path / "continual.json").is_file():
        return list(json.loads((path / "continual.json").read_text()).get("columns") or [])
    return []


def compare_checkpoints(a: str, b: str, *, tasks: Sequence[str] = (), eval_size: int = 16, max_new_tokens: int = 24,
                        spectral_rank: int = 16, seed: int = 0, backend: str = "auto", device: str | None = None,
                        log=print) -> dict:
    """Drift of model ``b`` from model ``a`` (see the module docstring). Returns a JSON-able dict:
    ``{"a", "b", "tasks", "params", "a_eval", "b_eval"}`` where ``b_eval`` carries the KL and
    similarity to ``a`` and both evals carry accuracy and artifacts."""
    import torch

    from denser.analysis.params import ParameterDrift
    from denser.analysis.suite import EvalSuite
    from denser.tasks import DEFAULT_TASK
    from denser.trainers.models import load_model

    path_a, path_b = resolve_model(a), resolve_model(b)
    tasks = list(tasks) or tasks_of(a) or tasks_of(b) or [DEFAULT_TASK]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log(f"loading A = {path_a} and B = {path_b}")
    model_a, tok = load_model(path_a, seed=seed)
    model_b, tok_b = load_model(path_b, seed=seed)
    if tok.get_vocab() != tok_b.get_vocab():
        raise ValueError(f"{a} and {b} have different tokenizers; drift measures need one vocabulary")
    model_a.to(dev).requires_grad_(False)
    model_b.to(dev).requires_grad_(False)
    log("parameter drift")
    params = ParameterDrift(model_a, rank=max(1, spectral_rank), spectral=spectral_rank > 0).measure(model_b)
    suite = EvalSuite(tasks, eval_size=eval_size, max_new_tokens=max_new_tokens, backend=backend, seed=seed)
    log(f"responses of A on {', '.join(tasks)} ({eval_size} prompts each)")
    rec_a, gens_a = suite.measure(model_a, tok)
    log("responses of B, KL(B || A) and similarity to A")
    rec_b, _ = suite.measure(model_b, tok, initial=model_a, reference=gens_a)
    return {"a": a, "b": b, "a_model": path_a, "b_model": path_b, "tasks": tasks, "eval_size": eval_size,
            "max_new_tokens": max_new_tokens, "params": params, "a_eval": rec_a, "b_eval": rec_b}


def drift_markdown(result: dict) -> str:
    """A short markdown summary of :func:`compare_checkpoints`' result."""
    p, ea, eb = result["params"], result["a_eval"], result["b_eval"]
    spectral = p.get("spectral") or {}
    lines = ["# Drift of B from A", "", f"- A: `{result['a']}` ({result['a_model']})",
             f"- B: `{result['b']}` ({result['b_model']})", "",
             f"Parameters: relative L2 {fmt(p['relative_l2'])}, cosine {fmt(p['cosine'], 6)}"
             + (f", mean/max largest principal angle {fmt(spectral.get('mean_angle_deg'), 2)}°/"
                f"{fmt(spectral.get('max_angle_deg'), 2)}°, mean overlap {fmt(spectral.get('mean_overlap'), 4)} "
                f"(top-{spectral.get('rank')})" if spectral else ""), "",
             "| module kind | relative L2 | cosine | mean angle° | mean overlap |", "|---|---|---|---|---|"]
    for kind, v in p["by_kind"].items():
        sk = (spectral.get("by_kind") or {}).get(kind, {})
        lines.append(f"| {kind} | {fmt(v['relative_l2'])} | {fmt(v['cosine'], 6)} | "
                     f"{fmt(sk.get('mean_angle_deg'), 2)} | {fmt(sk.get('mean_overlap'), 4)} |")
    lines += ["", f"Responses on the first {result['eval_size']} eval prompts of each task (greedy, "
              f"{result['max_new_tokens']} new tokens max):", "",
              "| task | acc A | acc B | KL(B‖A)/tok | similarity | word F1 | repeated answer A→B | length limit A→B | entropy A→B |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in [*result["tasks"], None]:
        ta = ea["overall"] if name is None else ea["tasks"][name]
        tb = eb["overall"] if name is None else eb["tasks"][name]
        aa, ab = ta["artifacts"], tb["artifacts"]
        acc_a = "" if name is None else fmt(ta["accuracy"])
        acc_b = "" if name is None else fmt(tb["accuracy"])
        lines.append(f"| {name or '**all**'} | {acc_a} | {acc_b} | {fmt(tb['kl'], 4)} | {fmt(tb['similarity'])} | "
                     f"{fmt(tb['token_f1'])} | {fmt(aa['repeated_answer_rate'])} → {fmt(ab['repeated_answer_rate'])} | "
                     f"{fmt(aa['length_limit_rate'])} → {fmt(ab['length_limit_rate'])} | "
                     f"{fmt(aa['mean_entropy'])} → {fmt(ab['mean_entropy'])} |")
    return "\n".join(lines) + "\n"
