"""The child side of the step benchmark (``denser bench step``): one case, measured in its own process.

:func:`run_child` loads the model, builds the synthetic completions every case shares, allocates
AdamW's state, resets the RSS high-water mark and runs one full step (denser's or TRL's, see
:mod:`denser.bench.step_trl`); :class:`Result` is what it reports to the runner
(:mod:`denser.bench.step`).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Any

from denser.bench.step_trl import trl_grpo_step, trl_sdpo_step

CASES: dict[str, str] = {
    "denser-grpo": "denser fused core (chunked on CPU), grpo",
    "denser-sdpo": "denser fused core, sdpo full-vocab JSD alpha=0.5, EMA teacher",
    "denser-ref-grpo": "denser backend=reference (materialised logits), grpo",
    "denser-ref-sdpo": "denser backend=reference, sdpo full-vocab JSD alpha=0.5, EMA teacher",
    "denser-grpo-mb": "denser-grpo in micro-batches of <= 2048 completion tokens, gradients accumulated "
                      "(the loop's --max-tokens-per-micro-batch counts prompt tokens too)",
    "denser-sdpo-mb": "denser-sdpo in micro-batches of <= 2048 completion tokens, gradients accumulated "
                      "(the loop's --max-tokens-per-micro-batch counts prompt tokens too)",
    "trl-grpo": "TRL GRPOTrainer loss path (fused LM head log-prob+entropy, _compute_loss); on CPU its head "
                "scores every position, prompts included, in [4096, 32768] torch-op tiles (Triton on CUDA)",
    "trl-sdpo": "TRL SDPOTrainer loss path (full_logits JSD alpha=0.5, EMA teacher)",
    "trl-grpo-liger": "trl-grpo with use_liger_kernel (Liger layer kernels)",
    "trl-sdpo-liger": "trl-sdpo with Liger layer kernels applied to the policy",
}
DEFAULT_N = (512, 2048, 8192, 16384)
MICRO_BATCH_TOKENS = 2048  # the -mb cases' token budget
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
    group: bool = False  # every completion answers one prompt (a group), every teacher context is one
    packing: str = "shared"  # denser's layout (--packing): shared (each distinct context once) or padded


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

    prompts = [rand(spec.prompt_len) for _ in range(1 if spec.group else b)]
    teacher_ctx = [p + rand(spec.teacher_extra) for p in prompts]  # prompt + a "demonstration"
    if spec.group:  # one group: the same prompt and the same teacher context for every completion
        prompts, teacher_ctx = prompts * b, teacher_ctx * b
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


def _denser_step(spec: Spec, policy, teacher, data, pad: int):
    """The loop's update: hidden states -> kernels.fused_loss -> backward, on one micro-batch of all N
    tokens, or (the ``-mb`` cases) on micro-batches of at most ``MICRO_BATCH_TOKENS`` completion tokens
    whose gradients accumulate, with the step's normalisers set on each as the loop sets them."""
    # lazy: the runner process never imports torch or the trainers (start-up time of `denser bench step`)
    import torch

    from denser.engines.packing import build_packed_batch, completion_hidden_states, lm_head_params
    from denser.kernels import fused_loss
    from denser.objectives import PolicyBatch, get_objective
    from denser.objectives.common import normaliser_counts
    from denser.trainers.batches import token_budget_groups

    prompts, teacher_ctx, completions, advantages = data
    sdpo = "sdpo" in spec.case
    backend = "reference" if "-ref-" in spec.case else "auto"
    objective = (get_objective("sdpo", distill_mode="full", alpha=0.5, teacher="ema") if sdpo
                 else get_objective("grpo"))
    b = len(completions)
    if spec.case.endswith("-mb"):  # the loop's greedy cut, counting completion tokens only (context 0)
        groups = token_budget_groups(list(range(b)), [(0, len(c)) for c in completions], MICRO_BATCH_TOKENS)
    else:
        groups = [list(range(b))]
    norm_length = float(max(len(c) for c in completions))
    micro = []
    for g in groups:
        packed = build_packed_batch([prompts[i] for i in g], [completions[i] for i in g], pad_token_id=pad,
                                    layout=spec.packing)
        batch = PolicyBatch(seq_ids=packed.seq_ids, num_seqs=len(g), global_tokens=1.0, global_seqs=1.0,
                            rewards=torch.zeros(len(g)), advantages=advantages[g],
                            teacher_mask=torch.ones(len(g), dtype=torch.bool) if sdpo else None,
                            norm_length=norm_length)
        micro.append((g, packed, batch))
    totals: dict[str, float] = {}
    for _, _, batch in micro:
        for k, v in normaliser_counts(batch).items():
            totals[k] = totals.get(k, 0.0) + v
    loss = 0.0
    for g, packed, batch in micro:
        for k, v in totals.items():
            setattr(batch, k, v)
        t_hidden = t_weight = t_bias = None
        if sdpo:
            tpacked = build_packed_batch([teacher_ctx[i] for i in g], [completions[i] for i in g], pad_token_id=pad,
                                         layout=spec.packing)
            with torch.no_grad():
                t_hidden = completion_hidden_states(teacher.model, tpacked)
            t_weight, t_bias = lm_head_params(teacher.model)
        hidden = completion_hidden_states(policy, packed)
        weight, bias = lm_head_params(policy)
        out = fused_loss(hidden, weight, packed.targets, objective, batch, bias=bias, teacher_hidden=t_hidden,
                         teacher_weight=t_weight, teacher_bias=t_bias, backend=backend)
        out.loss.backward()
        loss += float(out.loss.detach())
        del out, hidden, t_hidden
    return loss


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

        # lazy, as in _denser_step: the runner imports this module and never imports torch
        from denser.trainers.memory import adamw, trim_heap
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
        # each side's default optimiser: denser's loop and TRL (optim='adamw_torch_fused') both fuse AdamW
        optimizer = adamw(params, lr=spec.lr, betas=(0.9, 0.999), weight_decay=0.0)
        _init_adam_state(optimizer, params)
        import gc

        gc.collect()
        if not is_trl:
            trim_heap()  # as denser's loop does after the rollout, before the update
        res.load_peak_rss_mb = _maxrss_mb()
        res.baseline_rss_mb = _rss_mb()
        res.peak_is_lifetime = not _reset_peak()
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            if not is_trl:
                res.loss = _denser_step(spec, policy, teacher, data, pad)
            elif sdpo:
                res.loss = trl_sdpo_step(spec.completion_len, policy, teacher, data, pad, tmp)
            else:
                res.loss = trl_grpo_step(spec.completion_len, policy, data, pad, tmp)
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


