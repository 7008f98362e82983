"""Loop benchmark: seconds per step and tokens per second of `denser train`, split into
generation, signals (scoring, teacher/reference forwards) and the policy update.

    python -m bench.loop                          # grpo and sdpo on the tiny model
    python -m bench.loop --model default --steps 3  # the embedded SmolLM2-135M-Instruct

The first step is a warm-up and is left out of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile


def run(objective: str, model: str, steps: int, extra: list[str]) -> dict:
    from denser.cli import parse_train_args
    from denser.trainers.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        cfg, obj = parse_train_args(["--objective", objective, "--model", model, "--steps", str(steps),
                                     "--output-dir", out, "--no-progress", *extra])
        trainer = Trainer(cfg, obj, log=lambda *a: None)
        rows = [trainer.step(s) for s in range(steps)]
    timed = rows[1:] or rows
    med = lambda k: statistics.median(r[k] for r in timed)  # noqa: E731
    return {"objective": objective, "model": model, "s_per_step": med("step_time_s"),
            "tokens_per_s": med("tokens_per_s"), "generate_s": med("time_generate_s"),
            "signals_s": med("time_signals_s"), "update_s": med("time_update_s"),
            "completion_tokens": med("response_length") * cfg.prompts_per_step * cfg.num_generations}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--objectives", default="grpo,sdpo")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--json", default=None)
    a, extra = p.parse_known_args(argv)
    rows = [run(o, a.model, a.steps, extra) for o in a.objectives.split(",")]
    print(f"loop, model={a.model}, {os.cpu_count()} CPU threads, {platform.machine()}, extra flags: {' '.join(extra) or '-'}\n")
    print("| objective | s/step | tokens/s | generate s | signals s | update s | completion tokens/step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['objective']} | {r['s_per_step']:.2f} | {r['tokens_per_s']:.1f} | {r['generate_s']:.2f} | "
              f"{r['signals_s']:.2f} | {r['update_s']:.2f} | {r['completion_tokens']:.0f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
