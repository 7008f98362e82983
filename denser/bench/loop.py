"""Loop benchmark: seconds per step and tokens per second of `denser train`, split into
generation, signals (scoring, teacher/reference forwards) and the policy update.

    denser bench loop                                # grpo and sdpo on the tiny model
    denser bench loop --model default --steps 3      # the embedded SmolLM2-135M-Instruct
    denser bench loop --objectives grpo --steps 2 --max-new-tokens 8   # other flags go to `denser train`
    denser bench loop --model default --objectives sdpo --engine hf,vllm   # the engines side by side

With several engines (``--engine hf,vllm``) each objective runs once per engine; ``sync s`` is the
weight sync of an engine with its own copy of the weights (vllm), ``gen tokens/s`` the completion
tokens per second of generation alone.

Each objective runs `python -m denser train` in a subprocess (into a temporary run directory), as
a user runs it; the per-step times come from its metrics.jsonl. The first step is a warm-up and
is left out of the medians.

Beside the seconds, each phase gets the arithmetic it needs (:func:`step_flops`: matmul FLOPs of the
model's linear layers and attention, each group's prompt once and the prefix all prompts share once, no
padding, the output layer only
where a log-prob is needed) and the rate it achieved, and the table ends with this machine's own
matmul rate, fp32 and bf16, measured in the same run (:func:`matmul_rate`), so every row says how far
it is from the limit. The signals phase counts the reference's and the pre-update forwards; a
teacher's contexts are estimated as the prompt plus one demonstration (a completion) plus the
reprompt's own text (``TEACHER_CONTEXT_EXTRA`` tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

# The run's own evaluations (before and after training) are not part of a step: keep them small.
TRAIN_DEFAULTS = ["--no-progress", "--eval-size", "1"]


#: a teacher context's tokens beyond the prompt and its demonstration (SDPO's reprompt template, chat markup)
TEACHER_CONTEXT_EXTRA = 40


def matmul_rate(dtype, m: int = 2048, k: int = 576, n: int = 1536, seconds: float = 1.0) -> float:
    """This machine's matmul rate (FLOP/s) in ``dtype`` on the threads torch uses: ``[m, k] @ [k, n]`` (the
    embedded model's MLP shape at 2048 tokens) repeated for about ``seconds``, the best of three rounds."""
    import torch

    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(3):
        reps, start = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed > seconds / 3:
                break
        best = min(best, elapsed / reps)
    return 2.0 * m * k * n / best


def model_shape(model: str) -> dict:
    """The numbers :func:`step_flops` needs of ``model``: linear-layer parameters per token in the blocks,
    layers, attention width, hidden size, vocabulary; and the mean prompt length of the default task."""
    from denser.engines.packing import common_prefix_len
    from denser.tasks import DEFAULT_TASK, get_task
    from denser.trainers.models import load_model, render_prompt

    m, tok = load_model(model)
    c = m.config
    blocks = sum(p.numel() for name, p in m.get_decoder().named_parameters() if p.dim() == 2 and "embed" not in name)
    task = get_task(DEFAULT_TASK, seed=0)
    prompts = [render_prompt(tok, task.prompt(task.train[i])) for i in range(min(64, len(task.train)))]
    return {"block_params": blocks, "layers": c.num_hidden_layers, "hidden": c.hidden_size, "vocab": c.vocab_size,
            "attn_width": c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
            "prompt_tokens": statistics.mean(map(len, prompts)), "common_prefix_tokens": common_prefix_len(prompts)}


def _forward(shape: dict, context: float, completion: float, samples: int) -> float:
    """Matmul FLOPs of one forward over one context and ``samples`` completions after it, each query
    attending to its context and its own earlier tokens (scores and weighted sum: 4 x width per key)."""
    tokens = context + samples * completion
    keys = context * (context + 1) / 2 + samples * (completion * context + completion * (completion + 1) / 2)
    return 2 * shape["block_params"] * tokens + 4 * shape["layers"] * shape["attn_width"] * keys


def step_flops(shape: dict, cfg: dict, completion: float, teacher: bool, reference: bool, old_logp: bool) -> dict:
    """FLOPs each phase of one step needs: ``generate`` (each prompt prefilled once, every sampled token one
    decoding step and one output-layer row), ``update`` (the policy's forward and backward, 3x its forward,
    and the loss core's output layer over the completion tokens, 3x too), ``signals`` (the reference's, the
    pre-update policy's and the teacher's no-grad forwards with their output-layer rows). ``completion``: mean
    completion tokens. The prefix every prompt begins with (``shape["common_prefix_tokens"]``) is needed
    once per step in each forward, not once per group (every token still attends to it)."""
    P, G = cfg["prompts_per_step"], cfg["num_generations"]
    p, head = shape["prompt_tokens"], 2 * shape["hidden"] * shape["vocab"]
    shared = 2 * shape["block_params"] * shape.get("common_prefix_tokens", 0)  # a prefix's linear layers, once
    per_group = _forward(shape, p, completion, G)
    tokens = P * G * completion
    gen = P * per_group - (P - 1) * shared + head * tokens
    update = 3 * (P * per_group - (P - 1) * shared + head * tokens)
    signals = (int(reference) + int(old_logp)) * (P * per_group - (P - 1) * shared + head * tokens)
    if teacher:  # two distinct teacher contexts per group (the demonstrator's, everyone else's), the prompt once
        t = p + completion + TEACHER_CONTEXT_EXTRA
        own = 2 * shape["block_params"] * (p - shape.get("common_prefix_tokens", 0))  # a prompt's rest, once more
        signals += (P * (_forward(shape, t, completion, G - 1) + _forward(shape, t, completion, 1) - own)
                    - (2 * P - 1) * shared + head * tokens)
    return {"generate": gen, "signals": signals, "update": update}


def run(objective: str, model: str, steps: int, extra: list[str], engine: str | None = None) -> dict:
    """Train ``objective`` for ``steps`` steps and return the medians of its per-step timings."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "denser", "train", "--objective", objective, "--model", model,
               "--steps", str(steps), "--output-dir", out, *TRAIN_DEFAULTS, *extra,
               *(["--engine", engine] if engine else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise RuntimeError(f"denser train --objective {objective}{f' --engine {engine}' if engine else ''} "
                               f"failed: {last}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        cfg = yaml.safe_load((Path(out) / "config.yaml").read_text())
    steps_rows = [r for r in rows if "step_time_s" in r]  # eval rows hold only eval_accuracy
    timed = steps_rows[1:] or steps_rows
    med = lambda k: statistics.median(r.get(k, 0.0) for r in timed)  # noqa: E731
    tokens = med("response_length") * cfg["prompts_per_step"] * cfg["num_generations"]
    return {"objective": objective, "model": model, "engine": cfg["engine"], "s_per_step": med("step_time_s"),
            "tokens_per_s": med("tokens_per_s"), "generate_s": med("time_generate_s"),
            "signals_s": med("time_signals_s"), "update_s": med("time_update_s"), "sync_s": med("time_sync_s"),
            "generate_tokens_per_s": tokens / max(med("time_generate_s"), 1e-9), "completion_tokens": tokens,
            "response_length": med("response_length"), "config": cfg}


def with_flops(row: dict, shape: dict) -> dict:
    """``row`` with the FLOPs of each phase (:func:`step_flops`) and the rate achieved (FLOP/s)."""
    from denser.objectives import Signal, get_objective

    cfg = row["config"]
    signals = get_objective(cfg["objective"], **(cfg.get("objective_args") or {})).signals()
    updates = cfg.get("mini_batches", 1) * cfg.get("epochs", 1)
    old_logp = Signal.OLD_LOGP in signals and (cfg.get("old_logp_source") == "forward" or (
        cfg.get("old_logp_source", "auto") == "auto" and updates > 1))
    flops = step_flops(shape, cfg, row["response_length"], teacher=bool(signals & {Signal.TEACHER}),
                       reference=Signal.REF_LOGP in signals, old_logp=old_logp)
    flops["update"] *= cfg.get("epochs", 1)
    out = dict(row)
    for phase, f in flops.items():
        out[f"{phase}_gflop"] = f / 1e9
        seconds = row[f"{phase}_s"]
        out[f"{phase}_gflops"] = f / 1e9 / seconds if seconds > 0 and f > 0 else None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="denser bench loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="tiny (random-init), default (the embedded SmolLM2-135M-Instruct) or a local model dir")
    p.add_argument("--objectives", default="grpo,sdpo", help="comma-separated objectives, one run each")
    p.add_argument("--steps", type=int, default=4, help="training steps per run (the first is a warm-up)")
    p.add_argument("--engine", default=None, help="comma-separated rollout engines, one run each (hf,vllm); "
                   "default: the run's (hf)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a, extra = p.parse_known_args(argv)
    engines = [e.strip() for e in a.engine.split(",") if e.strip()] if a.engine else [None]
    try:
        rows = [run(o, a.model, a.steps, extra, e) for o in a.objectives.split(",") for e in engines]
    except RuntimeError as e:
        print(f"denser bench loop: error: {e}", file=sys.stderr)
        return 2
    import torch

    shape = model_shape(a.model)
    rows = [with_flops(r, shape) for r in rows]
    limits = {"fp32": matmul_rate(torch.float32) / 1e9, "bf16": matmul_rate(torch.bfloat16) / 1e9}
    print(f"loop, model={a.model}, {os.cpu_count()} CPU threads, {platform.machine()}, extra flags: {' '.join(extra) or '-'}\n")
    print("| objective | engine | s/step | tokens/s | generate s | gen tokens/s | sync s | signals s | update s "
          "| completion tokens/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['objective']} | {r['engine']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['generate_s']:.2f} | {r['generate_tokens_per_s']:.1f} | {r['sync_s']:.2f} | {r['signals_s']:.2f} | "
              f"{r['update_s']:.2f} | {r['completion_tokens']:.0f} |")
    rate = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    print("\nThe arithmetic each phase needs (GFLOP: each prompt once, no padding) and the rate it ran at (GFLOP/s):\n")
    print("| objective | engine | generate GFLOP | GFLOP/s | signals GFLOP | GFLOP/s | update GFLOP | GFLOP/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['objective']} | {r['engine']} | {r['generate_gflop']:.3g} | {rate(r['generate_gflops'])} | "
              f"{r['signals_gflop']:.3g} | {rate(r['signals_gflops'])} | {r['update_gflop']:.3g} | "
              f"{rate(r['update_gflops'])} |")
    print(f"\nthis machine's matmul rate in the same run ([2048, 576] x [576, 1536], {torch.get_num_threads()} "
          f"threads): fp32 {limits['fp32']:.1f} GFLOP/s, bf16 {limits['bf16']:.1f} GFLOP/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": [{k: v for k, v in r.items() if k != "config"} for r in rows],
                       "matmul_gflops": limits, "shape": shape}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
