"""The step benchmark's report: the Markdown table (peak RSS / seconds per case and N, MiB per 1k
tokens) and the plot of peak RSS against N, written from the runner's rows."""

from __future__ import annotations

import platform
from pathlib import Path

from denser.bench.step_case import CASES, Result


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "accelerate", "trl", "liger-kernel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mb_per_1k(rows: list[Result], case: str, ckpt: bool, lo: int = 2048, hi: int = 16384):
    """Growth of the step's peak RSS per 1k completion tokens from ``lo`` (or, where ``lo`` and a larger N
    were not both measured, the smallest N measured) to the largest measured N <= ``hi``; ``(slope, (from, to))``."""
    ok = {r.n: r.peak_rss_mb for r in rows if r.case == case and r.checkpointing == ckpt and r.status == "ok"}
    if not any(lo < n <= hi for n in ok) or lo not in ok:
        lo = min(ok, default=lo)
    ns = sorted(n for n in ok if lo <= n <= hi)
    if lo not in ok or len(ns) < 2:
        return None, None
    top = ns[-1]
    return (ok[top] - ok[lo]) / ((top - lo) / 1000.0), (lo, top)


def _row_keys(rows: list[Result]) -> list[tuple[str, bool]]:
    """(case, checkpointing) pairs in CASES order, checkpointing on first."""
    order = list(CASES)
    return sorted({(r.case, r.checkpointing) for r in rows},
                  key=lambda k: (order.index(k[0]) if k[0] in order else len(order), not k[1]))


def _cell(r: Result | None) -> str:
    if r is None:
        return "-"
    if r.status == "ok":
        return f"{r.peak_rss_mb / 1024:.2f} GiB / {r.seconds:.0f} s"
    return r.status.upper() if r.status == "oom" else r.status


def write_markdown(path: Path, meta: dict, rows: list[Result]) -> None:
    ns = sorted({r.n for r in rows})
    lines = [f"# Step benchmark ({meta['machine']['summary']}, {meta['date']})", "",
             "Commands (each continues the same results file):",
             *[f"    PYTHONPATH=. {c}" for c in meta.get("commands", [meta["command"]])], "",
             f"Machine: {meta['machine']['cpu']}, {meta['machine']['cpus']} CPUs; torch threads per case: "
             f"{meta['settings'].get('threads')}; load average when the last command started: "
             f"{meta['machine'].get('load_average_at_start')} (seconds are only comparable within one run on a quiet "
             "machine); versions: "
             + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
             ("One full training step (policy forward, teacher forward where the objective distils, loss, backward, "
              "clip, AdamW, EMA update) on synthetic completions of N tokens "
              f"({meta['settings']['completion_len']} tokens per completion, prompt {meta['settings']['prompt_len']}, "
             f"teacher context +{meta['settings']['teacher_extra']}), model {meta['settings']['model']}, fp32. "
             "Cells: peak RSS of the step's process (models, gradients and AdamW state included) / seconds. "
             f"OOM = over the {meta['settings']['mem_limit_gb']} GiB address-space limit. "
             "MiB/1k tok = growth of the peak per 1k tokens from N=2048 (or the smallest N measured) to the largest N measured."), "",
             "| case | ckpt | " + " | ".join(f"N={n}" for n in ns) + " | MiB/1k tok | baseline GiB |",
             "|---|---|" + "---:|" * len(ns) + "---:|---:|"]
    for case, ckpt in _row_keys(rows):
        by_n = {r.n: r for r in rows if r.case == case and r.checkpointing == ckpt}
        slope, span = mb_per_1k(rows, case, ckpt)
        slope_s = "-" if slope is None else f"{slope:.0f}" + ("" if span == (2048, 16384) else f" ({span[0]}-{span[1]})")
        base = [r.baseline_rss_mb for r in by_n.values() if r.baseline_rss_mb]
        base_s = f"{min(base) / 1024:.2f}" if base else "-"
        cells = " | ".join(_cell(by_n.get(n)) for n in ns)
        lines.append(f"| {case} | {'on' if ckpt else 'off'} | {cells} | {slope_s} | {base_s} |")
    notes = sorted({f"- {r.case}: {r.status}: {r.message.strip().splitlines()[-1][:200]}" for r in rows
                    if r.status not in ("ok", "oom") and r.message})
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", "Cases:", *[f"- `{k}`: {v}" for k, v in CASES.items()]]
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, meta: dict, rows: list[Result]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    limit = meta["settings"]["mem_limit_gb"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for case, ckpt in _row_keys(rows):
        pts = sorted((r.n, r.peak_rss_mb / 1024) for r in rows
                     if r.case == case and r.checkpointing == ckpt and r.status == "ok")
        ooms = sorted(r.n for r in rows if r.case == case and r.checkpointing == ckpt and r.status == "oom")
        if not pts and not ooms:
            continue
        color = colors[list(CASES).index(case) % len(colors)] if case in CASES else "k"
        style = "-" if ckpt else "--"
        label = f"{case} (ckpt {'on' if ckpt else 'off'})"
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", color=color, label=label)
        if ooms:
            ax.plot(ooms, [limit] * len(ooms), "x", color=color, markersize=10,
                    label=None if pts else label + " OOM")
    ax.axhline(limit, color="grey", lw=0.8, ls=":")
    ax.text(min(r.n for r in rows), limit * 1.01, f"{limit} GiB limit (x = OOM)", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    ns = sorted({r.n for r in rows})
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("completion tokens per step (N)")
    ax.set_ylabel("peak RSS of the step (GiB)")
    model = meta["settings"]["model"]
    model = "SmolLM2-135M-Instruct" if model in ("default", "smollm2") else model
    ax.set_title(f"One training step, {model} fp32, {meta['machine']['summary']}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


