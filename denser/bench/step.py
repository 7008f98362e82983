"""Step benchmark: peak RSS and seconds of one full training step, denser against TRL.

One step = the policy forward to its final hidden states (or logits), the teacher's no-grad
forward where the objective distils, the loss, backward, gradient clipping, the AdamW step and
the EMA teacher update, on synthetic packed completions of N tokens with the embedded model
(SmolLM2-135M-Instruct, fp32). Each (case, N, checkpointing) runs in its own process, under an
address-space limit so that a case too big for the machine fails alone and is recorded as OOM.

    python -m denser.bench.step                          # the full sweep: 4 N x 8 cases x ckpt on/off
    python -m denser.bench.step --n 512 --cases denser-grpo,trl-grpo --checkpointing on

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

Results: ``<out-dir>/step-<tag>-<date>.json`` and ``.md`` (rewritten after every case, so an
interrupted sweep keeps what it measured) and ``.png`` (peak RSS against N per case).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CASES: dict[str, str] = {
    "denser-grpo": "denser fused core (chunked on CPU), grpo",
    "denser-sdpo": "denser fused core, sdpo full-vocab JSD alpha=0.5, EMA teacher",
    "denser-ref-grpo": "denser backend=reference (materialised logits), grpo",
    "denser-ref-sdpo": "denser backend=reference, sdpo full-vocab JSD alpha=0.5, EMA teacher",
    "trl-grpo": "TRL GRPOTrainer loss path (fused LM head log-prob+entropy, _compute_loss); on CPU its head "
                "scores every position, prompts included, in [4096, 32768] torch-op tiles (Triton on CUDA)",
    "trl-sdpo": "TRL SDPOTrainer loss path (full_logits JSD alpha=0.5, EMA teacher)",
    "trl-grpo-liger": "trl-grpo with use_liger_kernel (Liger layer kernels)",
    "trl-sdpo-liger": "trl-sdpo with Liger layer kernels applied to the policy",
}
DEFAULT_N = (512, 2048, 8192, 16384)
RESULT_MARK = "STEP_BENCH_RESULT "
OOM_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory", "bad_alloc", "defaultcpuallocator",
             "not enough memory")


@dataclass
class Spec:
    """One measured case; sent to the child process as JSON."""

    case: str
    n: int
    checkpointing: bool
    model: str = "default"
    completion_len: int = 1024
    prompt_len: int = 64
    teacher_extra: int = 128
    mem_limit_gb: float = 14.0
    seed: int = 0
    lr: float = 1e-6
    threads: int = 0  # torch intra-op threads (0: torch's default)


@dataclass
class Result:
    case: str
    n: int
    checkpointing: bool
    status: str  # ok | oom | error | timeout | not importable | not runnable
    num_seqs: int = 0
    seconds: float | None = None
    peak_rss_mb: float | None = None
    baseline_rss_mb: float | None = None
    rss_after_load_mb: float | None = None
    load_peak_rss_mb: float | None = None
    peak_is_lifetime: bool = False
    loss: float | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- child side


def _status_kb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb / 1024.0
    import psutil  # fallback off Linux

    return psutil.Process().memory_info().rss / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _reset_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _limit_memory(gb: float) -> None:
    if gb > 0:
        cap = int(gb * 2**30)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def _synthetic(spec: Spec, vocab: int):
    """Token lists shared by every case: B prompts, teacher contexts and completions summing to N tokens."""
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    per = spec.completion_len if spec.completion_len > 0 else spec.n
    lengths = [per] * (spec.n // per) + ([spec.n % per] if spec.n % per else [])
    b = len(lengths)
    def rand(k):  # ids from 3 up: not the special tokens
        return torch.randint(3, vocab, (k,), generator=g).tolist()

    prompts = [rand(spec.prompt_len) for _ in range(b)]
    teacher_ctx = [p + rand(spec.teacher_extra) for p in prompts]  # prompt + a "demonstration"
    completions = [rand(n) for n in lengths]
    advantages = torch.randn(b, generator=g)
    return prompts, teacher_ctx, completions, advantages


def _enable_checkpointing(model) -> None:
    """transformers' API, as its Trainer calls it (use_reentrant=False by default)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:  # transformers < 5.x
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _init_adam_state(optimizer, params) -> None:
    """Allocate AdamW's state before the measured step, as in every step after the first."""
    import torch

    for p in params:
        p.grad = torch.zeros_like(p)
    lr = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    optimizer.step()
    for g, v in zip(optimizer.param_groups, lr):
        g["lr"] = v
    optimizer.zero_grad(set_to_none=True)


def _right_pad(seqs, pad: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _left_pad(seqs, pad: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def _denser_step(spec: Spec, policy, teacher, data, pad: int):
    """The loop's update on one micro-batch of N tokens: hidden states -> kernels.fused_loss -> backward."""
    # lazy: the runner process never imports torch or the trainers (start-up time of `denser bench step`)
    import torch

    from denser.kernels import fused_loss
    from denser.objectives import PolicyBatch, get_objective
    from denser.objectives.common import normaliser_counts
    from denser.trainers.rollout import (
        build_packed_batch,
        completion_hidden_states,
        lm_head_params,
    )

    prompts, teacher_ctx, completions, advantages = data
    sdpo = spec.case.endswith("sdpo")
    backend = "reference" if "-ref-" in spec.case else "auto"
    objective = (get_objective("sdpo", distill_mode="full", alpha=0.5, teacher="ema") if sdpo
                 else get_objective("grpo"))
    packed = build_packed_batch(prompts, completions, pad_token_id=pad)
    b = len(completions)
    batch = PolicyBatch(seq_ids=packed.seq_ids, num_seqs=b, global_tokens=1.0, global_seqs=1.0,
                        rewards=torch.zeros(b), advantages=advantages,
                        teacher_mask=torch.ones(b, dtype=torch.bool) if sdpo else None,
                        norm_length=float(max(len(c) for c in completions)))
    for k, v in normaliser_counts(batch).items():
        setattr(batch, k, v)
    t_hidden = t_weight = t_bias = None
    if sdpo:
        tpacked = build_packed_batch(teacher_ctx, completions, pad_token_id=pad)
        with torch.no_grad():
            t_hidden = completion_hidden_states(teacher.model, tpacked)
        t_weight, t_bias = lm_head_params(teacher.model)
    hidden = completion_hidden_states(policy, packed)
    weight, bias = lm_head_params(policy)
    out = fused_loss(hidden, weight, packed.targets, objective, batch, bias=bias, teacher_hidden=t_hidden,
                     teacher_weight=t_weight, teacher_bias=t_bias, backend=backend)
    out.loss.backward()
    return float(out.loss.detach())


def _trl_standin(cls, args, policy, **attrs):
    """An instance of a TRL trainer class with the attributes its loss methods read, set as its
    ``__init__`` sets them from ``args``; the rest of ``__init__`` (datasets, generation) is skipped."""
    from collections import defaultdict

    from accelerate import Accelerator

    tr = object.__new__(cls)
    tr.args = args
    tr.accelerator = Accelerator(cpu=True)
    tr.state = type("State", (), {"global_step": 0})()
    tr.model = policy
    tr.current_gradient_accumulation_steps = 1
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr.temperature = args.temperature
    for k, v in attrs.items():
        setattr(tr, k, v)
    return tr


def _trl_grpo_step(spec: Spec, policy, data, pad: int, tmp: str):
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    prompts, _, completions, advantages = data
    args = GRPOConfig(output_dir=tmp, report_to=[], use_cpu=True, max_completion_length=spec.completion_len)
    # GRPOTrainer.__init__: the fused LM head that returns per-token log-probs and entropies
    add_fused_lm_head(policy, temperature=args.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32,
                      outputs=("log_probs", "entropy"))
    tr = _trl_standin(
        GRPOTrainer, args, policy, loss_type=args.loss_type, beta=args.beta, epsilon_low=args.epsilon,
        epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        importance_sampling_level=args.importance_sampling_level,
        off_policy_mask_threshold=args.off_policy_mask_threshold, top_entropy_quantile=args.top_entropy_quantile,
        use_vllm=False, vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, max_completion_length=spec.completion_len,
        num_generations=args.num_generations)
    prompt_ids, prompt_mask = _left_pad(prompts, pad)
    completion_ids, completion_mask = _right_pad(completions, pad)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": completion_mask.sum().float()}
    loss = tr.compute_loss(policy, inputs)
    loss.backward()
    return float(loss.detach())


def _trl_sdpo_step(spec: Spec, policy, teacher, data, pad: int, tmp: str):
    import inspect

    import torch
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    prompts, teacher_ctx, completions, advantages = data
    args = SDPOConfig(output_dir=tmp, report_to=[], use_cpu=True, distillation_mode="full_logits",
                      distillation_alpha=0.5, teacher_model_kind="ema", max_completion_length=spec.completion_len)
    tr = _trl_standin(SDPOTrainer, args, policy, teacher_model=teacher, use_teacher_server=False,
                      model_kwarg_keys=inspect.signature(policy.forward).parameters.keys())
    prompt_ids, prompt_mask = _left_pad(prompts, pad)
    completion_ids, completion_mask = _right_pad(completions, pad)
    t_ids, t_mask = _left_pad(teacher_ctx, pad)
    b = len(completions)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "teacher_input_ids": torch.cat([t_ids, completion_ids], 1),
              "teacher_attention_mask": torch.cat([t_mask, completion_mask], 1),
              "self_distillation_mask": torch.ones(b)}
    loss = tr.compute_loss(policy, inputs)
    loss.backward()
    return float(loss.detach())


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(w in str(exc).lower() for w in OOM_WORDS)


def run_child(spec: Spec) -> Result:
    """Measure one case in this process (called in a fresh subprocess by :func:`run_case`)."""
    _limit_memory(spec.mem_limit_gb)
    res = Result(spec.case, spec.n, spec.checkpointing, status="error")
    is_trl, liger = spec.case.startswith("trl-"), spec.case.endswith("-liger")
    try:
        if is_trl:
            try:
                import trl  # noqa: F401
                if liger:
                    import liger_kernel  # noqa: F401
            except Exception as e:  # noqa: BLE001 - any import failure is the recorded result
                res.status, res.message = "not importable", f"{type(e).__name__}: {e}"[:300]
                return res
        import copy
        import tempfile
        import warnings

        import torch

        from denser.trainers.models import load_model
        from denser.trainers.teacher import TeacherWeights

        warnings.filterwarnings("ignore")
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        policy, tokenizer = load_model(spec.model, dtype=torch.float32)
        pad = int(tokenizer.pad_token_id)
        data = _synthetic(spec, policy.get_output_embeddings().weight.shape[0])
        res.num_seqs = len(data[2])
        sdpo = "sdpo" in spec.case
        teacher = None
        if sdpo:  # the EMA teacher: a frozen copy of the policy, updated after the step
            teacher = (TeacherWeights(policy, "ema", 0.05) if not is_trl
                       else copy.deepcopy(policy).eval().requires_grad_(False))
        res.rss_after_load_mb = _rss_mb()
        if liger:
            from transformers.integrations.liger import apply_liger_kernel

            # what transformers' Trainer does for use_liger_kernel=True, with TRL's override
            apply_liger_kernel(policy, {"fused_linear_cross_entropy": False})
        policy.train()
        if spec.checkpointing:
            _enable_checkpointing(policy)
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.999), weight_decay=0.0)
        _init_adam_state(optimizer, params)
        import gc

        gc.collect()
        res.load_peak_rss_mb = _maxrss_mb()
        res.baseline_rss_mb = _rss_mb()
        res.peak_is_lifetime = not _reset_peak()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            if not is_trl:
                res.loss = _denser_step(spec, policy, teacher, data, pad)
            elif sdpo:
                res.loss = _trl_sdpo_step(spec, policy, teacher, data, pad, tmp)
            else:
                res.loss = _trl_grpo_step(spec, policy, data, pad, tmp)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if sdpo and not is_trl:
                teacher.update(policy)
            elif sdpo:
                from trl.trainer.callbacks import SyncRefModelCallback

                SyncRefModelCallback.sync_target_model(policy, teacher, 0.05)
            res.seconds = time.perf_counter() - t0
        res.peak_rss_mb = _maxrss_mb()
        res.status = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is a recorded result
        if _is_oom(e):
            res.status, res.message = "oom", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        elif liger:
            res.status = "not runnable"
            res.message = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        else:
            import traceback

            res.status, res.message = "error", traceback.format_exc()[-1500:]
        res.peak_rss_mb = _maxrss_mb()
    return res


# ------------------------------------------------------------------------------------ runner side


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
    """Growth of the step's peak RSS per 1k completion tokens from ``lo`` to the largest measured N <= ``hi``."""
    ok = {r.n: r.peak_rss_mb for r in rows if r.case == case and r.checkpointing == ckpt and r.status == "ok"}
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
             "MiB/1k tok = growth of the peak per 1k tokens from N=2048 to the largest N measured."), "",
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
                     "threads": a.threads or "torch default",
                     "optimizer": "AdamW (state initialised before the step)", "max_grad_norm": 1.0},
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
                                teacher_extra=a.teacher_extra, mem_limit_gb=a.mem_limit_gb, threads=a.threads)
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
