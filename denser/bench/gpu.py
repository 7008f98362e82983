"""Loss-core benchmark on a CUDA GPU (issue 4): forward+backward time and peak memory.

Every case runs in its own subprocess (an OOM or a crash costs one row, not the table) and is
compared with the *floor* measured in the same run: the four bare bf16 matmuls any exact method
must do (student logits, teacher logits, dH, dW; cuBLAS, in 8192-token chunks so that they fit).
Time is the median of ``--repeats`` forward+backward steps timed with CUDA events after warm-up
(Triton compilation, autotuning, torch.compile); memory is the peak allocated bytes of one step,
also given as ``extra`` = peak - inputs - gradients.

    denser bench gpu                          # the issue-4 grid, writes bench/results/<device>-<date>.json
    denser bench gpu --shapes 4096x4096x151936 --alphas 0.5 --cases floor,triton_onchip
    denser bench gpu --dry-run                # the plan, without a GPU
    TRITON_INTERPRET=1 denser bench gpu --device cpu --shapes 40x24x70 --repeats 1 --warmup 0
                                              # smoke-run every case on CPU (Triton interpreter)
    DENSER_TRITON_BLOCKS='{"fwd_block_v": 64}' denser bench gpu ...   # tune the on-chip tiles

(``python -m denser.bench gpu`` is the same.) Results go to ``bench/results/`` under the current
directory (the clone's own ``bench/results`` when run from its root) unless ``--json`` says where.

Shapes are NxHxV. Default grid: N in {4096, 16384, 65536}, H=4096, V=151936 and the peers'
published shape 8192x4096x128256, alpha in {0.5, 1}, bf16.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from denser.bench.loss_core import parse_cases
from denser.kernels import fused_loss, token_stats
from denser.objectives import PolicyBatch, get_objective

DEFAULT_SHAPES = ["4096x4096x151936", "16384x4096x151936", "65536x4096x151936", "8192x4096x128256"]
DEFAULT_ALPHAS = [0.5, 1.0]
FLOOR_CHUNK = 8192

CASES = {
    "floor": "4 bare bf16 matmuls (student + teacher logits, dH, dW), cuBLAS",
    "reference": "token_stats backend=reference (fp32 [N, V] logits, autograd)",
    "chunked": "token_stats backend=chunked (PyTorch sweeps, logits recomputed in backward)",
    "triton_chunked": "token_stats backend=triton_chunked (Triton sweeps, logits recomputed in backward)",
    "triton_onchip": "token_stats backend=triton_onchip (logits tiles on chip, never stored)",
    "triton": "token_stats backend=triton (auto: path picked from free memory, see 'path')",
    "fused-sdpo[chunked]": "fused_loss sdpo full vocabulary, backend=chunked (gradients in forward)",
    "fused-sdpo[triton_chunked]": "fused_loss sdpo full vocabulary, backend=triton_chunked (gradients in forward)",
    "fused-sdpo[triton]": "fused_loss sdpo full vocabulary, backend=triton (auto)",
    "fused-grpo[triton_chunked]": "fused_loss grpo (no teacher: 3 of the floor's 4 matmuls), backend=triton_chunked",
    "liger-fljsd": "Liger LigerFusedLinearJSD (Triton, jsd_beta=alpha: 1 = reverse KL), peer",
    "liger-jsd-chunked": "Liger chunked_loss LigerFusedLinearJSDLoss (torch.compile, soft loss only), peer",
    "liger-kl": "Liger LigerFusedLinearKLDivLoss (teacher probabilities [N, V] given as input), peer",
}


@dataclass
class Shape:
    n: int
    h: int
    v: int
    alpha: float = 0.5
    dtype: str = "bfloat16"
    device: str = "cuda"

    @property
    def label(self) -> str:
        return f"N={self.n} H={self.h} V={self.v} alpha={self.alpha} {self.dtype}"


def parse_shape(text: str, alpha: float, dtype: str, device: str = "cuda") -> Shape:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"shape {text!r} must be NxHxV, e.g. 4096x4096x151936")
    return Shape(int(m[1]), int(m[2]), int(m[3]), alpha, dtype, device)


# --------------------------------------------------------------------------------- worker (GPU)


def _inputs(shape: Shape):
    dtype = getattr(torch, shape.dtype)
    g = torch.Generator(device=shape.device).manual_seed(0)
    dev = dict(device=shape.device, dtype=torch.float32)
    hidden = torch.randn(shape.n, shape.h, generator=g, **dev).to(dtype).requires_grad_()
    weight = (torch.randn(shape.v, shape.h, generator=g, **dev) * shape.h ** -0.5 * 2).to(dtype).requires_grad_()
    teacher = (hidden.detach().float() + 0.7 * torch.randn(shape.n, shape.h, generator=g, **dev)).to(dtype)
    targets = torch.randint(0, shape.v, (shape.n,), generator=g, device=shape.device)
    return hidden, weight, teacher, targets


def _policy_batch(shape: Shape):
    dev = shape.device
    seqs = max(1, shape.n // 512)
    seq_ids = torch.arange(shape.n, device=dev) * seqs // shape.n
    return PolicyBatch(seq_ids=seq_ids, num_seqs=seqs, global_tokens=float(shape.n), global_seqs=float(seqs),
                       advantages=torch.randn(seqs, device=dev), rewards=torch.rand(seqs, device=dev),
                       old_logp=torch.full((shape.n,), -10.0, device=dev),
                       ref_logp=torch.full((shape.n,), -10.0, device=dev),
                       teacher_mask=torch.ones(seqs, dtype=torch.bool, device=dev), norm_length=512.0)


def make_step(case: str, shape: Shape):
    """(step, info, leaves) for ``case``: ``step()`` runs one forward+backward; inputs built here."""
    hidden, weight, teacher, targets = _inputs(shape)
    info: dict = {}
    step = _make_step(case, shape, hidden, weight, teacher, targets, info)
    return step, info, (hidden, weight)


def _make_step(case, shape, hidden, weight, teacher, targets, info):
    def zero():
        hidden.grad = None
        weight.grad = None

    if case == "floor":
        def step():
            zero()
            with torch.no_grad():
                d_hidden = torch.empty_like(hidden)
                d_weight = torch.zeros_like(weight)
                for a in range(0, shape.n, FLOOR_CHUNK):
                    h, t = hidden[a:a + FLOOR_CHUNK], teacher[a:a + FLOOR_CHUNK]
                    z_s = h @ weight.t()
                    z_t = t @ weight.t()
                    torch.mm(z_s, weight, out=d_hidden[a:a + FLOOR_CHUNK])
                    d_weight.addmm_(z_t.t(), h)
                    del z_s, z_t
                hidden.grad, weight.grad = d_hidden, d_weight
        return step

    if case in ("reference", "chunked", "triton_chunked", "triton_onchip", "triton"):
        if case == "triton":
            from denser.kernels import triton_ops  # lazy: triton is optional (a dry run needs none)

            info["path"] = triton_ops.explain_triton_path(shape.n, shape.h, shape.v, shape.device,
                                                          dtype=hidden.dtype).as_dict()

        def step():
            zero()
            s = token_stats(hidden, weight, targets, teacher_hidden=teacher, alpha=shape.alpha, backend=case)
            (s.divergence.sum() / shape.n).backward()
        return step

    if case.startswith("fused-"):
        name, backend = re.fullmatch(r"fused-(\w+)\[(\w+)\]", case).groups()
        objective = get_objective("sdpo", alpha=shape.alpha, distill_mode="full") if name == "sdpo" else get_objective(name)
        batch = _policy_batch(shape)
        kw = {"teacher_hidden": teacher} if objective.core_options().need_divergence else {}
        if backend == "triton":
            from denser.kernels import triton_ops  # lazy: triton is optional (a dry run needs none)

            info["path"] = triton_ops.explain_triton_path(shape.n, shape.h, shape.v, shape.device,
                                                          dtype=hidden.dtype).as_dict()
            info["fused_loss_path"] = triton_ops.fused_loss_path("triton", hidden, weight, teacher)

        def step():
            zero()
            fused_loss(hidden, weight, targets, objective, batch, backend=backend, **kw).loss.backward()
        return step

    if case == "liger-fljsd":
        from liger_kernel.transformers import LigerFusedLinearJSD  # lazy: optional peer (the bench extra)

        loss_fn = LigerFusedLinearJSD(jsd_beta=shape.alpha)
        t_weight = weight.detach()

        def step():
            zero()
            loss_fn(hidden, weight, teacher, t_weight, targets).backward()
        return step

    if case == "liger-jsd-chunked":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # lazy: optional peer

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=shape.alpha,
                                          compiled=shape.device == "cuda")
        t_weight = weight.detach()

        def step():
            zero()
            loss_fn(hidden, weight, teacher, t_weight, targets).backward()
        return step

    if case == "liger-kl":
        from liger_kernel.transformers import LigerFusedLinearKLDivLoss  # lazy: optional peer

        with torch.no_grad():  # an input of this peer, built outside the timing (its memory counts)
            probs = torch.softmax((teacher @ weight.t()).float(), dim=-1).to(hidden.dtype)
        loss_fn = LigerFusedLinearKLDivLoss()

        def step():
            zero()
            loss_fn(hidden, weight, probs, targets).backward()
        return step

    raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")


def worker(case: str, shape: Shape, repeats: int, warmup: int) -> dict:
    cuda = shape.device == "cuda"
    row = {"case": case, **asdict(shape)}
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        step, info, leaves = make_step(case, shape)
        row.update(info)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        inputs_bytes = torch.cuda.memory_allocated() if cuda else None
        for _ in range(warmup):
            step()
        sync()
        times = []
        for _ in range(repeats):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000.0)
            else:
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
        row.update(median_s=statistics.median(times), min_s=min(times), repeats=repeats)
        if cuda:  # one more step from a clean slate: the previous gradients freed first
            for t in leaves:
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            grads = sum(t.grad.nbytes for t in leaves if t.grad is not None)
            row.update(peak_gib=peak / 2**30, inputs_gib=inputs_bytes / 2**30, grads_gib=grads / 2**30,
                       extra_gib=(peak - inputs_bytes - grads) / 2**30)
    except torch.cuda.OutOfMemoryError as e:
        row["error"] = "OOM: " + str(e).splitlines()[0][:140]
    return row


# ----------------------------------------------------------------------------- driver (no GPU)


def run_case(case: str, shape: Shape, repeats: int, warmup: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "denser.bench", "gpu", "--worker", case, "--shapes", f"{shape.n}x{shape.h}x{shape.v}",
           "--alphas", str(shape.alpha), "--dtype", shape.dtype, "--repeats", str(repeats), "--warmup", str(warmup),
           "--device", shape.device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"case": case, **asdict(shape), "error": f"timed out after {timeout:.0f}s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        oom = next((ln for ln in err if "OutOfMemory" in ln or "out of memory" in ln), None)
        return {"case": case, **asdict(shape), "error": (oom or err[-1])[:200]}
    return json.loads(lines[-1])


def _fmt_path(row: dict) -> str:
    path = row.get("fused_loss_path") or (row.get("path") or {}).get("path")
    return path or ""


def format_table(rows: list[dict], shape: Shape) -> str:
    floor = next((r["median_s"] for r in rows if r["case"] == "floor" and "median_s" in r), None)
    lines = [f"### {shape.label}", "",
             "| case | median ms | x floor | peak GiB | extra GiB | path | what |",
             "|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        what = CASES.get(r["case"], "")
        if "error" in r:
            lines.append(f"| {r['case']} | - | - | - | - | | unavailable: {r['error']} |")
            continue
        ratio = f"{r['median_s'] / floor:.2f}" if floor else "-"
        peak, extra = ("-" if r.get(k) is None else f"{r[k]:.2f}" for k in ("peak_gib", "extra_gib"))
        lines.append(f"| {r['case']} | {r['median_s'] * 1e3:.1f} | {ratio} | {peak} | "
                     f"{extra} | {_fmt_path(r)} | {what} |")
    return "\n".join(lines)


def check_targets(rows: list[dict]) -> list[str]:
    """Issue 4's targets for one shape, as PASS/FAIL lines (n/a when a row is missing)."""
    by = {r["case"]: r for r in rows if "median_s" in r}
    out = []

    def ratio(a, b):
        return by[a]["median_s"] / by[b]["median_s"] if a in by and b in by else None

    r = ratio("fused-sdpo[triton_chunked]", "floor")
    out.append("fused_loss triton_chunked <= 1.3x floor: "
               + ("n/a" if r is None else f"{'PASS' if r <= 1.3 else 'FAIL'} ({r:.2f}x)"))
    r = ratio("liger-fljsd", "fused-sdpo[triton_chunked]")
    out.append("fused_loss triton_chunked >= 2x faster than Liger fused linear JSD: "
               + ("n/a" if r is None else f"{'PASS' if r >= 2.0 else 'FAIL'} ({r:.2f}x)"))
    r = ratio("triton_onchip", "floor")
    out.append("triton_onchip <= 2.5x floor: " + ("n/a" if r is None else f"{'PASS' if r <= 2.5 else 'FAIL'} ({r:.2f}x)"))
    if by.get("triton_onchip", {}).get("extra_gib") is not None:
        extra = by["triton_onchip"]["extra_gib"]
        out.append(f"triton_onchip peak <= inputs + gradients + 512 MiB: {'PASS' if extra <= 0.5 else 'FAIL'} "
                   f"(extra {extra * 1024:.0f} MiB)")
    else:
        out.append("triton_onchip peak <= inputs + gradients + 512 MiB: n/a")
    return out


def device_info() -> dict:
    info = {"machine": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    sms=p.multi_processor_count)
    for mod in ("triton", "liger_kernel"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    info["blocks_override"] = os.environ.get("DENSER_TRITON_BLOCKS")
    return info


def results_path(info: dict, when: _dt.date | None = None) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", (info.get("device") or "unknown-device").lower()).strip("-")
    date = (when or _dt.date.today()).isoformat()
    return os.path.join("bench", "results", f"{slug}-{date}.json")


def plan(shapes: list[str], alphas: list[float], dtype: str, cases: list[str],
         device: str = "cuda") -> list[tuple[Shape, list[str]]]:
    return [(parse_shape(s, a, dtype, device), list(cases)) for s in shapes for a in alphas]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="denser bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated NxHxV")
    p.add_argument("--alphas", default=",".join(str(a) for a in DEFAULT_ALPHAS))
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per case (subprocess)")
    p.add_argument("--json", default=None, help="output file (default bench/results/<device>-<date>.json)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: smoke-run the cases at tiny shapes (Triton cases need TRITON_INTERPRET=1)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    shapes = [s for s in a.shapes.split(",") if s.strip()]
    alphas = [float(x) for x in a.alphas.split(",") if x.strip()]
    cases = parse_cases(p, a.cases, CASES)
    grid = plan(shapes, alphas, a.dtype, cases, a.device)

    if a.worker:
        print(json.dumps(worker(a.worker, grid[0][0], a.repeats, a.warmup)))
        return 0
    if a.dry_run:
        for shape, cs in grid:
            print(f"{shape.label}: {', '.join(cs)}")
        print(f"{sum(len(cs) for _, cs in grid)} subprocesses; results -> {a.json or results_path(device_info())}")
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("denser bench gpu needs a CUDA GPU (torch.cuda.is_available() is False). "
              "Use --dry-run to see the plan, or `denser bench` for the CPU benchmark.", file=sys.stderr)
        return 2
    info = device_info()
    out_path = a.json or results_path(info)
    command = "denser bench gpu " + " ".join(argv if argv is not None else sys.argv[1:])
    report = {"device": info, "command": command, "started": _dt.datetime.now().isoformat(timespec="seconds"),
              "floor_chunk": FLOOR_CHUNK, "shapes": []}
    total = sum(len(cs) for _, cs in grid)
    bar = tqdm(total=total, desc="gpu bench", unit="case", file=sys.stderr)
    tables = []
    for shape, cs in grid:
        rows = []
        for case in cs:
            bar.set_postfix_str(f"{case} N={shape.n} a={shape.alpha}")
            rows.append(run_case(case, shape, a.repeats, a.warmup, a.timeout))
            bar.update(1)
        targets = check_targets(rows)
        report["shapes"].append({"shape": asdict(shape), "rows": rows, "targets": targets})
        tables.append(format_table(rows, shape) + "\n\n" + "\n".join(f"- {t}" for t in targets))
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:  # rewritten after every shape: a crash keeps what was measured
            json.dump(report, f, indent=2)
    bar.close()
    head = (f"Loss core fwd+bwd on {info.get('device')} (torch {info.get('torch')}, CUDA {info.get('cuda')}, "
            f"triton {info.get('triton')}, liger-kernel {info.get('liger_kernel')}); median of {a.repeats} "
            f"steps, CUDA events. `{command}`\n")
    print(head + "\n" + "\n\n".join(tables))
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
