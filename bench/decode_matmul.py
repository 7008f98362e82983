"""The hf engine's few-row linear layers as ``W x^T`` (``--hf-cpu-decode-matmul``), measured against
torch's ``x W^T`` in one process, at the thread count given:

1. each of the embedded model's weight shapes, at the row counts generation multiplies (one row per
   sequence while decoding), ``F.linear(x, W)`` against ``(W @ x.T).T``, over enough distinct weights that
   none stays in cache (as in a forward);
2. whole generate calls of the hf engine on the embedded model, the option off and on, alternating:
   the loop's shapes (1 prompt x 8 and 4 prompts x 4, 32 tokens each, held to the full budget with
   ``min_new_tokens`` so both do the same work) and an eval's (50 greedy prompts).

    PYTHONPATH=. python -m bench.decode_matmul                    # torch's default threads (the cores)
    PYTHONPATH=. python -m bench.decode_matmul --threads 1

Results: ``bench/results/decode-matmul-<tag>-<date>.{json,md}``. Seconds compare only on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # q/o, k/v, gate/up, down, lm_head
ROWS = [8, 16, 32, 50, 64, 128]
CALLS = [("1 prompt x 8, sampled", 1, 8, True), ("4 prompts x 4, sampled", 4, 4, True), ("50 prompts, greedy", 50, 1, False)]


def _seconds(fn, reps: int) -> float:
    fn()
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best.append(time.perf_counter() - t)
    return min(best)


def matmul_rows() -> list[dict]:
    import torch
    from torch.nn import functional as F

    out = []
    for n, k in SHAPES:
        count = max(2, (256 << 20) // (n * k * 4))  # >= 256 MiB of weights: each read from memory
        weights = [torch.randn(n, k) for _ in range(count)]
        for rows in ROWS:
            x = torch.randn(rows, k)
            a = _seconds(lambda x=x, ws=weights: [F.linear(x, w) for w in ws], 3) / count
            b = _seconds(lambda x=x, ws=weights: [(w @ x.t()).t().contiguous() for w in ws], 3) / count
            out.append({"out_features": n, "in_features": k, "rows": rows, "x_Wt_ms": a * 1e3, "W_xt_ms": b * 1e3,
                        "speedup": a / b})
        del weights
    return out


def generate_rows() -> list[dict]:
    from denser.engines import SamplingParams
    from denser.engines.hf import HFRolloutEngine
    from denser.tasks import get_task
    from denser.trainers.models import load_model, render_prompt

    model, tok = load_model("default")
    task = get_task("addition", seed=0)
    prompt_ids = [render_prompt(tok, task.prompt(task.train[i])) for i in range(50)]
    engines = {"off": HFRolloutEngine(model, tok, cpu_decode_matmul=False), "on": HFRolloutEngine(model, tok)}
    out = []
    for label, n_prompts, group, sampled in CALLS:
        params = SamplingParams(max_new_tokens=32, num_generations=group, do_sample=sampled,
                                min_new_tokens=32 if sampled else 0)
        prompts = prompt_ids[:n_prompts]
        engines["on"].generate(prompts, params, seed=1)  # warm-up
        times: dict[str, list[float]] = {"off": [], "on": []}
        results = {}
        for _ in range(3):
            for name, engine in engines.items():
                t = time.perf_counter()
                results[name] = engine.generate(prompts, params, seed=3)
                times[name].append(time.perf_counter() - t)
        same = results["on"].completion_ids == results["off"].completion_ids
        out.append({"call": label, "off_s": statistics.median(times["off"]), "on_s": statistics.median(times["on"]),
                    "speedup": statistics.median(times["off"]) / statistics.median(times["on"]),
                    "same_tokens": same, "seconds": times})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.decode_matmul", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tag", default=f"cpu-{os.cpu_count()}core")
    a = p.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    mm, gen = matmul_rows(), generate_rows()
    date = _dt.date.today().isoformat()
    cmd = "PYTHONPATH=. python -m bench.decode_matmul " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"date": date, "command": cmd.strip(), "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load_average": os.getloadavg(),
            "matmul": mm, "generate": gen}
    stem = Path(a.out_dir) / f"decode-matmul-{a.tag}-t{torch.get_num_threads()}-{date}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    md = [f"# Few-row linear layers as W x^T ({date}, {torch.get_num_threads()} threads)", "", f"    {cmd.strip()}", "",
          f"Machine: {meta['machine']}; load average at the end {tuple(round(x, 1) for x in meta['load_average'])}.", "",
          "| weight (out x in) | " + " | ".join(f"{r} rows" for r in ROWS) + " |",
          "|---|" + "---:|" * len(ROWS)]
    for n, k in SHAPES:
        cells = [f"{r['speedup']:.2f}x" for r in mm if (r["out_features"], r["in_features"]) == (n, k)]
        md.append(f"| {n} x {k} | " + " | ".join(cells) + " |")
    md += ["", "Speed-up of `(W @ x.T).T` over `F.linear(x, W)` per shape and row count.", "",
           "| generate call (32 tokens) | off s | on s | speed-up | same tokens |", "|---|---:|---:|---:|---|"]
    md += [f"| {r['call']} | {r['off_s']:.2f} | {r['on_s']:.2f} | {r['speedup']:.2f}x | {r['same_tokens']} |" for r in gen]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
