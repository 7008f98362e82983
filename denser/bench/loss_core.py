"""Loss-core benchmark on CPU: forward+backward time and peak memory, one case per subprocess.

Every row is measured in the same run as the *floor*: the bare matmuls any exact method must do
(student logits, teacher logits, dH, dW), so the ratios are comparable across machines.

    denser bench                         # N=2048, H=256, V=32000, fp32, alpha=0.5
    denser bench --n 4096 --json bench/results/cpu.json
    denser bench --n 256 --v 4000 --cases chunked,fused-grpo --repeats 1   # a quick look

(``python -m denser.bench`` is the same; ``python -m bench`` too, from a clone.) The other
benchmarks: ``denser bench gpu --help`` (CUDA) and ``denser bench loop --help`` (the loop).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from denser.kernels import fused_loss, token_stats
from denser.kernels.memtrack import PeakMemory
from denser.objectives import PolicyBatch, get_objective

CASES = ["floor", "reference", "chunked", "fused-sdpo", "fused-sdpo-topk", "fused-grpo", "liger-jsd"]
DESCRIPTIONS = {
    "floor": "4 bare matmuls: student + teacher logits, dH, dW",
    "reference": "token_stats backend=reference (materialised fp32 logits, autograd)",
    "chunked": "token_stats backend=chunked (logits recomputed in backward)",
    "fused-sdpo": "fused_loss backend=chunked, sdpo full vocabulary (gradients in forward)",
    "fused-sdpo-topk": "fused_loss backend=chunked, sdpo top-100 + tail (its default)",
    "fused-grpo": "fused_loss backend=chunked, objective grpo (gradients in forward)",
    "liger-jsd": "Liger-Kernel LigerFusedLinearJSDLoss(compiled=False), peer",
}


@dataclass
class Shape:
    n: int = 2048
    h: int = 256
    v: int = 32000
    alpha: float = 0.5
    dtype: str = "float32"


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _make(shape: Shape):
    dtype = getattr(torch, shape.dtype)
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(shape.n, shape.h, generator=g)).to(dtype).requires_grad_()
    weight = (torch.randn(shape.v, shape.h, generator=g) * shape.h ** -0.5).to(dtype).requires_grad_()
    teacher = (hidden.detach().float() + 0.5 * torch.randn(shape.n, shape.h, generator=g)).to(dtype)
    targets = torch.randint(0, shape.v, (shape.n,), generator=g)
    return hidden, weight, teacher, targets


def _step_fn(case: str, shape: Shape):
    """A closure running one forward+backward of ``case``; inputs built outside the timing."""
    hidden, weight, teacher, targets = _make(shape)

    def zero():
        hidden.grad = None
        weight.grad = None

    if case == "floor":
        def step():
            with torch.no_grad():
                z_s = hidden @ weight.t()
                z_t = teacher @ weight.t()
                hidden.grad = z_s @ weight
                weight.grad = z_t.t() @ hidden
            return z_s
        return step, (hidden, weight, teacher, targets)

    if case in ("reference", "chunked"):
        def step():
            zero()
            s = token_stats(hidden, weight, targets, teacher_hidden=teacher, alpha=shape.alpha, backend=case)
            (s.divergence.sum() / shape.n).backward()
        return step, (hidden, weight, teacher, targets)

    if case.startswith("fused-"):
        name = case.split("-")[1]
        if name == "sdpo":
            mode = "topk" if case.endswith("topk") else "full"
            objective = get_objective("sdpo", alpha=shape.alpha, distill_mode=mode)
        else:
            objective = get_objective(name)
        seqs = max(1, shape.n // 256)
        seq_ids = torch.arange(shape.n) * seqs // shape.n
        batch = PolicyBatch(seq_ids=seq_ids, num_seqs=seqs, global_tokens=float(shape.n), global_seqs=float(seqs),
                            advantages=torch.randn(seqs), rewards=torch.rand(seqs),
                            old_logp=torch.full((shape.n,), -10.0), ref_logp=torch.full((shape.n,), -10.0),
                            teacher_mask=torch.ones(seqs, dtype=torch.bool), norm_length=256.0)
        kw = {"teacher_hidden": teacher} if objective.core_options().need_divergence else {}

        def step():
            zero()
            out = fused_loss(hidden, weight, targets, objective, batch, backend="chunked", **kw)
            out.loss.backward()
        return step, (hidden, weight, teacher, targets)

    if case == "liger-jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # lazy: optional peer (the bench extra)

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=shape.alpha, compiled=False)
        t_weight = weight.detach()

        def step():
            zero()
            loss_fn(hidden, weight, teacher, t_weight, targets).backward()
        return step, (hidden, weight, teacher, targets)

    raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")


def worker(case: str, shape: Shape, repeats: int) -> dict:
    torch.manual_seed(0)
    step, _inputs = _step_fn(case, shape)
    base = _rss_mb()
    step()  # warm-up (allocator, lazy imports)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss_growth = _rss_mb() - base
    with PeakMemory() as mem:
        step()
    return {"case": case, "median_s": statistics.median(times), "min_s": min(times),
            "rss_growth_mb": rss_growth, "tensor_peak_mb": mem.peak_bytes / 2**20}


def run_case(case: str, shape: Shape, repeats: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "denser.bench", "--worker", case, "--n", str(shape.n), "--h", str(shape.h),
           "--v", str(shape.v), "--alpha", str(shape.alpha), "--dtype", shape.dtype, "--repeats", str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout:.0f}s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["exit code %d" % proc.returncode])[-1]
        return {"case": case, "error": last[:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], shape: Shape) -> str:
    floor = next((r["median_s"] for r in rows if r["case"] == "floor" and "median_s" in r), None)
    head = (f"loss core fwd+bwd, N={shape.n} H={shape.h} V={shape.v} {shape.dtype} alpha={shape.alpha}, "
            f"{os.cpu_count()} CPU threads, torch {_torch_version()}, {platform.processor() or platform.machine()}\n\n")
    lines = ["| case | median s | x floor | peak RSS growth MB | tensor peak MB | what |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | - | - | - | - | unavailable: {r['error']} |")
            continue
        ratio = f"{r['median_s'] / floor:.2f}" if floor else "-"
        lines.append(f"| {r['case']} | {r['median_s']:.3f} | {ratio} | {r['rss_growth_mb']:.0f} | "
                     f"{r['tensor_peak_mb']:.0f} | {DESCRIPTIONS[r['case']]} |")
    return head + "\n".join(lines)


def _torch_version() -> str:
    return torch.__version__


def parse_cases(parser: argparse.ArgumentParser, text: str, known: list[str]) -> list[str]:
    """``--cases a,b`` checked against ``known``, with the floor always measured first."""
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cases if c not in known]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(known)}")
    return cases if "floor" in cases else ["floor", *cases]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="denser bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2048, help="tokens N")
    p.add_argument("--h", type=int, default=256, help="hidden size H")
    p.add_argument("--v", type=int, default=32000, help="vocabulary size V")
    p.add_argument("--alpha", type=float, default=0.5, help="divergence alpha (0 forward KL, 1 reverse KL)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per case (median)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    p.add_argument("--json", default=None, help="also write the rows and the machine to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    shape = Shape(a.n, a.h, a.v, a.alpha, a.dtype)
    if a.worker:
        print(json.dumps(worker(a.worker, shape, a.repeats)))
        return 0
    cases = parse_cases(p, a.cases, CASES)
    rows = []
    for case in tqdm(cases, desc="loss-core bench", unit="case", file=sys.stderr):
        rows.append(run_case(case, shape, a.repeats, a.timeout))
    table = format_table(rows, shape)
    print(table)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"shape": shape.__dict__, "machine": platform.platform(), "cpus": os.cpu_count(),
                       "torch": _torch_version(), "command": "denser bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                       "rows": rows}, f, indent=2)
    return 0
