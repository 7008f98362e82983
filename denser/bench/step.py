"""Step benchmark: peak RSS and seconds of one full training step, denser against TRL.

One step = the policy forward to its final hidden states (or logits), the teacher's no-grad
forward where the objective distils, the loss, backward, gradient clipping, the AdamW step and
the EMA teacher update, on synthetic packed completions of N tokens with the embedded model
(SmolLM2-135M-Instruct, fp32). Each (case, N, checkpointing) runs in its own process, under an
address-space limit so that a case too big for the machine fails alone and is recorded as OOM.

    python -m denser.bench.step                          # the full sweep: 4 N x 8 cases x ckpt on/off
    python -m denser.bench.step --n 512 --cases denser-grpo,trl-grpo --checkpointing on
    python -m denser.bench.step --n 256 --completion-len 32 --prompt-len 92 --teacher-extra 40 --group \
        --checkpointing off --cases denser-grpo,denser-sdpo,trl-grpo,trl-sdpo   # 1 prompt x 8 completions

``--group`` gives every completion one prompt and one teacher context (a GRPO group), so denser's
shared layout (``--packing shared``, the loop's default) computes them once; TRL computes them per
completion, as its trainers do.

Cases (``--cases``, comma-separated, default all):
  denser-grpo       denser fused loss core (backend auto -> chunked on CPU), objective grpo
  denser-sdpo       denser fused core, sdpo full-vocabulary JSD (alpha 0.5) from an EMA teacher copy
  denser-ref-grpo   denser backend='reference' (materialised [N, V] logits), grpo
  denser-ref-sdpo   denser backend='reference', sdpo as above
  trl-grpo          TRL GRPOTrainer's own loss path (its fused LM head: per-token log-prob + entropy,
                    then ``_compute_loss`` with the default loss_type) on the same tensors
  trl-sdpo          TRL SDPOTrainer's own loss path (``_compute_teacher_student_logits`` +
                    ``_compute_self_distillation_loss``, distillation_mode full_logits, alpha 0.5,
                    EMA teacher copy)
  trl-grpo-liger    trl-grpo with TRL's Liger option (``use_liger_kernel``: Liger's layer kernels)
  trl-sdpo-liger    trl-sdpo with the same Liger layer kernels (TRL's SDPOTrainer has no Liger loss)

Memory: ``peak_rss_mb`` is the child's ``getrusage(RUSAGE_SELF).ru_maxrss`` after the step, with
the high-water mark reset (``/proc/self/clear_refs``) just before the step, so it is the step's
peak including the resident models, gradients and AdamW state (initialised before the step), not
the transient peak of loading the model (reported apart as ``load_peak_rss_mb``).
``baseline_rss_mb`` is the RSS just before the step. Where the reset is unavailable the peak is
the process lifetime's (``peak_is_lifetime``).

Optimiser: each side's default, fused AdamW (denser's loop; TRL's ``adamw_torch_fused``); denser's
cases return the freed heap to the system before the step (``malloc_trim``, as its loop does after the
rollout). Modules: this runner, :mod:`~denser.bench.step_case` (the child: one case),
:mod:`~denser.bench.step_trl` (TRL's loss path), :mod:`~denser.bench.step_report` (table and plot).

Results: ``<out-dir>/step-<tag>-<date>.json`` and ``.md`` (rewritten after every case, so an
interrupted sweep keeps what it measured) and ``.png`` (peak RSS against N per case).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from denser.bench.step_case import CASES, OOM_WORDS, RESULT_MARK, Result, Spec, run_child
from denser.bench.step_report import _cell, _cpu_name, _versions, mb_per_1k, write_markdown, write_plot

DEFAULT_N = (512, 2048, 8192, 16384)


def run_case(spec: Spec, timeout: float, env: dict[str, str] | None = None) -> Result:
    """Run one case in a fresh subprocess; a killed or timed-out child is a recorded result."""
    cmd = [sys.executable, "-m", "denser.bench.step", "--child", json.dumps(asdict(spec))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return Result(spec.case, spec.n, spec.checkpointing, status="timeout", message=f"over {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return Result(**json.loads(line[len(RESULT_MARK):]))
    tail = (proc.stderr or proc.stdout)[-600:]
    rc = proc.returncode
    if rc < 0 and -rc == signal.SIGKILL or any(w in tail.lower() for w in OOM_WORDS):
        return Result(spec.case, spec.n, spec.checkpointing, status="oom",
                      message=f"child killed (rc {rc}): {tail.strip().splitlines()[-1] if tail.strip() else ''}")
    return Result(spec.case, spec.n, spec.checkpointing, status="error", message=f"rc {rc}: {tail}")



def _parse_list(text: str, kind, known=None, what="value"):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"empty {what} list")
    out = []
    for t in items:
        if known is not None and t not in known:
            raise ValueError(f"unknown {what} {t!r}; known: {', '.join(known)}")
        try:
            out.append(kind(t))
        except ValueError:
            raise ValueError(f"bad {what} {t!r}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        res = run_child(Spec(**json.loads(argv[1])))
        print(RESULT_MARK + json.dumps(asdict(res)), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m denser.bench.step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default=",".join(map(str, DEFAULT_N)), help="completion tokens per step, comma-separated")
    p.add_argument("--cases", default="all", help=f"comma-separated, or 'all': {', '.join(CASES)}")
    p.add_argument("--checkpointing", default="on,off", help="gradient checkpointing: 'on', 'off' or 'on,off'")
    p.add_argument("--model", default="default", help="denser model name (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--completion-len", type=int, default=1024,
                   help="tokens per completion; N is split into N/completion-len sequences (0: one sequence)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--teacher-extra", type=int, default=128, help="extra teacher-context tokens (a demonstration)")
    p.add_argument("--group", action="store_true",
                   help="every completion answers one prompt and gets one teacher context (a GRPO group: the "
                        "comparison with TRL at one prompt x 8 completions); default: a prompt per completion")
    p.add_argument("--packing", default="shared", choices=("shared", "padded"),
                   help="denser's layout: shared (each distinct context once, no padding) or padded (a row each)")
    p.add_argument("--mem-limit-gb", type=float, default=14.0, help="address-space limit per case (0: none)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per case before it is recorded as timeout")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per case (0: torch's default; 1 is far faster on a machine other jobs load)")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0,
                   help="glibc: serve allocations of at least this many bytes with mmap, so freed tensors go back "
                        "to the system (MALLOC_MMAP_THRESHOLD_ in each case's environment; 0: glibc's dynamic default)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--tag", default=None, help="file name tag (default: cpu-<cores>core)")
    p.add_argument("--fresh", action="store_true",
                   help="start over even if today's results file for these settings exists (default: continue it, "
                        "measuring only the missing cases)")
    p.add_argument("--no-skip-after-oom", action="store_true",
                   help="run larger N of a case that already ran out of memory (default: record OOM, skip)")
    a = p.parse_args(argv)
    try:
        ns = sorted(_parse_list(a.n, int, what="N"))
        cases = list(CASES) if a.cases == "all" else _parse_list(a.cases, str, CASES, "case")
        ckpts = _parse_list(a.checkpointing, str, ("on", "off"), "checkpointing value")
        if any(n < 1 for n in ns):
            raise ValueError("N must be >= 1")
        if a.completion_len < 0 or a.prompt_len < 1 or a.teacher_extra < 0:
            raise ValueError("--completion-len >= 0, --prompt-len >= 1 and --teacher-extra >= 0")
    except ValueError as e:
        p.error(str(e))
    tag = a.tag or f"cpu-{os.cpu_count()}core" + (f"-mmap{a.malloc_mmap_threshold}" if a.malloc_mmap_threshold else "")
    date = _dt.date.today().isoformat()
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"step-{tag}-{date}"
    cmd = "python -m denser.bench.step " + " ".join(shlex.quote(x) for x in argv)
    meta = {
        "date": date,
        "command": cmd.strip(),
        "machine": {"summary": f"{os.cpu_count()}-core {platform.machine()} CPU", "cpu": _cpu_name(),
                    "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None},
        "versions": _versions(),
        "settings": {"model": a.model, "dtype": "float32", "completion_len": a.completion_len,
                     "prompt_len": a.prompt_len, "teacher_extra": a.teacher_extra, "mem_limit_gb": a.mem_limit_gb,
                     "group": a.group, "packing": a.packing,
                     "threads": a.threads or "torch default",
                     "optimizer": "AdamW fused (state initialised before the step); denser: malloc_trim before the step", "max_grad_norm": 1.0},
        "cases": {c: CASES[c] for c in cases},
    }
    if a.malloc_mmap_threshold > 0:
        meta["settings"]["malloc_mmap_threshold"] = a.malloc_mmap_threshold
    rows: list[Result] = []
    json_path = stem.with_suffix(".json")
    if json_path.exists() and not a.fresh:  # continue an interrupted sweep: keep what it measured
        try:
            old = json.loads(json_path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("settings") == meta["settings"]:
            rows = [Result(**r) for r in old.get("rows", []) if r.get("status") not in ("error", "timeout")]
            meta["commands"] = [*old.get("commands", [old.get("command")]), meta["command"]]
            print(f"continuing {json_path}: {len(rows)} measured cases kept (--fresh to start over)")
        else:
            print(f"{json_path} holds a run with other settings: starting over (use --tag to keep both)")
    meta.setdefault("commands", [meta["command"]])
    done = {(r.case, r.n, r.checkpointing): r for r in rows}
    oomed: set[tuple[str, bool]] = {(r.case, r.checkpointing) for r in rows if r.status == "oom"}
    for ck in ckpts:  # checkpointing on first: the comparison the targets are stated for
        for n in ns:
            for case in cases:
                ckpt = ck == "on"
                if (case, n, ckpt) in done:
                    continue
                if (case, ckpt) in oomed and not a.no_skip_after_oom and any(
                        r.case == case and r.checkpointing == ckpt and r.status == "oom" and r.n < n for r in rows):
                    r = Result(case, n, ckpt, status="oom", message="skipped: out of memory at a smaller N")
                else:
                    spec = Spec(case, n, ckpt, model=a.model, completion_len=a.completion_len, prompt_len=a.prompt_len,
                                teacher_extra=a.teacher_extra, mem_limit_gb=a.mem_limit_gb, threads=a.threads,
                                group=a.group, packing=a.packing)
                    r = run_case(spec, a.timeout, {"MALLOC_MMAP_THRESHOLD_": str(a.malloc_mmap_threshold)}
                                 if a.malloc_mmap_threshold > 0 else None)
                if r.status == "oom":
                    oomed.add((case, ckpt))
                rows.append(r)
                rows.sort(key=lambda x: (x.n, not x.checkpointing))
                shown = _cell(r) if r.status in ("ok", "oom") else f"{r.status}: {r.message.strip()[-200:]}"
                print(f"N={n:>6} ckpt={ck:<3} {case:<16} {shown}", flush=True)
                meta["slopes_mb_per_1k"] = {f"{c}|ckpt={'on' if k else 'off'}": mb_per_1k(rows, c, k)[0]
                                            for c, k in sorted({(x.case, x.checkpointing) for x in rows})}
                stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": [asdict(x) for x in rows]}, indent=1))
                write_markdown(stem.with_suffix(".md"), meta, rows)
    if write_plot(stem.with_suffix(".png"), meta, rows):
        print(f"wrote {stem}.json, .md and .png")
    else:
        print(f"wrote {stem}.json and .md (no matplotlib: no plot)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

