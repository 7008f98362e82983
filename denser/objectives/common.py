"""Pieces every objective shares: group advantages, loss aggregation, KL estimators, token masks.

Everything here keeps the loss *separable* (docs/design.md, Contract 1b): an aggregate is a sum of
per-token terms divided by normalisers that live in the batch, so the sum of the aggregates of
``batch.token_slice(a, b)`` chunks equals the aggregate of the whole batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Literal

import torch
from einops import rearrange
from torch import Tensor

from denser.objectives.batch import PolicyBatch

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = AggMode.__args__
KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = KLEstimator.__args__
RewardScaling = Literal["group", "batch", "none"]

# log-ratios are clamped to this range before exp() (as verl does) so one wild token cannot overflow
LOG_RATIO_CLAMP = 20.0


# ------------------------------------------------------------------------------------ advantages


def group_advantages(
    rewards: Tensor,
    num_generations: int,
    *,
    scale: RewardScaling | bool = "group",
    leave_one_out: bool = False,
    eps: float = 1e-6,
) -> Tensor:
    """Group-relative advantages ``[S]`` from rewards ``[S]``.

    A group is ``num_generations`` consecutive samples (the completions of one prompt).
    - baseline: the group mean, or with ``leave_one_out`` the mean of the *other* samples
      (RLOO: ``r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean)``);
    - ``scale``: ``"group"`` divides by the group's standard deviation (unbiased, as ``torch.std``
      in TRL and verl) plus ``eps``; ``"batch"`` by the std of all rewards; ``"none"`` (Dr. GRPO)
      does not scale. ``True``/``False`` mean ``"group"``/``"none"``.
    A group whose rewards are all equal gets advantage exactly 0 (never NaN), as does a group of
    one sample (there is no baseline to compare with).
    """
    if scale is True:
        scale = "group"
    elif scale is False:
        scale = "none"
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale={scale!r} must be 'group', 'batch' or 'none'")
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations={num_generations!r} must be a positive int")
    if rewards.dim() != 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"rewards must be 1-D with a multiple of num_generations={num_generations} entries "
            f"(consecutive groups), got shape {tuple(rewards.shape)}"
        )
    r = rearrange(rewards.detach().float(), "(prompts gens) -> prompts gens", gens=num_generations)
    g = num_generations
    mean = r.mean(dim=1, keepdim=True)
    centred = r - mean
    if leave_one_out and g > 1:
        centred = centred * (g / (g - 1))
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if g > 1 else torch.zeros_like(mean)
        centred = centred / (std + eps)
    elif scale == "batch":
        std = rewards.detach().float().std() if rewards.numel() > 1 else torch.zeros(())
        centred = centred / (std + eps)
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)).expand_as(r)
    adv = torch.where(constant, torch.zeros_like(centred), centred)
    return rearrange(adv, "prompts gens -> (prompts gens)").to(rewards.device)


# ----------------------------------------------------------------------------------- aggregation


def aggregate(
    values: Tensor,
    batch: PolicyBatch,
    mode: AggMode,
    *,
    mask: Tensor | None = None,
    global_tokens: float | None = None,
    global_seqs: float | None = None,
) -> Tensor:
    """Aggregate per-token ``values [N]`` into a scalar with normalisers global to the update.

    ``m`` is ``mask`` (default ``batch.token_mask``); ``L_s`` the loss tokens of sequence ``s``
    (``batch.seq_lens``, from the full micro-batch); ``T`` and ``S`` the loss tokens and sequences
    of the update's mini-batch (``batch.global_tokens``/``global_seqs`` unless given; ``S`` counts
    every sequence of the mini-batch, also those whose tokens are all masked).

    - ``token-mean``:              sum_i m_i v_i / T
    - ``seq-mean-token-mean``:     sum_i m_i v_i / L_{s(i)} / S      (GRPO paper, GSPO)
    - ``seq-mean-token-sum``:      sum_i m_i v_i / S
    - ``seq-mean-token-sum-norm``: sum_i m_i v_i / (S * norm_length) (Dr. GRPO; TRL's ``dr_grpo``,
      which divides by batch size times ``max_completion_length``; verl omits the ``S``)

    Masked tokens contribute an exact 0 (selected away, so NaN or inf there cannot leak). Zero
    normalisers are read as 1, so a batch with nothing to average gives an exact 0 loss.
    """
    m = batch.token_mask if mask is None else mask
    tokens = batch.global_tokens if global_tokens is None else global_tokens
    seqs = batch.global_seqs if global_seqs is None else global_seqs
    v = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if mode == "token-mean":
        return v.sum() / _positive(tokens)
    if mode == "seq-mean-token-mean":
        lens = batch.seq_lens[batch.seq_ids].clamp(min=1.0).to(v.dtype)
        return (v / lens).sum() / _positive(seqs)
    if mode == "seq-mean-token-sum":
        return v.sum() / _positive(seqs)
    if mode == "seq-mean-token-sum-norm":
        return v.sum() / (_positive(seqs) * _positive(batch.norm_length))
    raise ValueError(f"loss_agg_mode={mode!r} is unknown; use one of {', '.join(AGG_MODES)}")


def _positive(x) -> float:
    x = float(x)
    return x if x > 0 else 1.0


def normaliser_counts(batch: PolicyBatch) -> dict[str, float]:
    """This micro-batch's share of the update's normalisers (the totals of its mini-batch).

    The loop sums the four counts over the gradient-accumulation micro-batches (and all-reduces
    them over processes) and sets ``global_tokens``, ``global_seqs``, ``global_teacher_tokens`` and
    ``global_teacher_seqs`` on every micro-batch before any loss is computed. Tokens count where
    ``token_mask`` is set; every sequence counts, including one whose tokens are all masked (e.g.
    by ``mask_truncated_completions``) or that has no teacher: a per-sequence mean is over all the
    mini-batch's sequences, as TRL computes it (and SDPO's code, whose micro-batches hold one sequence).
    """
    lens = batch.seq_lens
    counts = {"global_tokens": float(lens.sum()), "global_seqs": float(batch.num_seqs)}
    if batch.teacher_mask is not None:
        teacher = batch.teacher_mask.to(torch.bool)
        counts["global_teacher_tokens"] = float(lens[teacher].sum())
        counts["global_teacher_seqs"] = float(teacher.sum())
    return counts


# ---------------------------------------------------------------------------------- estimators


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the log-probs of tokens sampled from pi.

    With ``log r = ref_logp - logp`` (Schulman, "Approximating KL divergence", 2020; verl
    ``kl_penalty``, TRL):
    - ``k1 = -log r = logp - ref_logp``         (unbiased, high variance, can be negative)
    - ``k2 = (log r)^2 / 2``                    (biased, low variance, >= 0)
    - ``k3 = r - 1 - log r``                    (unbiased, low variance, >= 0; verl ``low_var_kl``)
    ``k3`` clamps ``log r`` to +-20 before ``exp`` (as verl) against overflow.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp).square()
    if estimator == "k3":
        log_r = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return torch.exp(log_r) - 1.0 - log_r
    raise ValueError(f"kl_estimator={estimator!r} is unknown; use one of {', '.join(KL_ESTIMATORS)}")


def behaviour_log_ratio(logp: Tensor, batch: PolicyBatch) -> Tensor:
    """``logp - old_logp`` per token, clamped to +-20 and 0 on masked tokens.

    Without ``batch.old_logp`` (fully on-policy, one update per rollout batch) the behaviour
    policy is the current one: ``old_logp = logp.detach()``, so the ratio is 1 in value and its
    gradient is ``grad logp``.
    """
    old = logp.detach() if batch.old_logp is None else batch.old_logp.to(logp.dtype)
    log_ratio = (logp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(batch.token_mask, log_ratio, torch.zeros((), dtype=logp.dtype, device=logp.device))


def sequence_mean(values: Tensor, batch: PolicyBatch) -> Tensor:
    """Per-token ``[n]``: the mean of ``values`` over the loss tokens of each token's sequence.

    Uses ``batch.seq_lens`` from the full micro-batch, so on a chunk it is exact only for the
    sequences whose tokens all lie in the chunk (``separable = "sequence"``).
    """
    v = torch.where(batch.token_mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    sums = torch.zeros(batch.num_seqs, dtype=v.dtype, device=v.device).index_add(0, batch.seq_ids, v)
    means = sums / batch.seq_lens.clamp(min=1.0).to(v.dtype)
    return means[batch.seq_ids]


# ----------------------------------------------------------------------------------- randomness


def token_keep_mask(batch: PolicyBatch, keep_prob: float, seed: int, stream: str) -> Tensor:
    """``[N]`` bool, each token kept with probability ``keep_prob``; reproducible.

    Drawn on the CPU from a generator seeded by ``(seed, batch.step, batch.update, batch.micro_batch,
    stream)`` (step: the rollout batch; update: the optimiser update within it), so it does not
    depend on the device, differs between steps, updates, micro-batches and streams, and is the
    same every time the same batch is prepared. Update 0 draws what a run of one update per rollout
    batch always drew. Call it from ``Objective.prepare`` (on the full micro-batch, before chunking).
    """
    n = batch.num_tokens
    if keep_prob >= 1.0:
        return torch.ones(n, dtype=torch.bool, device=batch.seq_ids.device)
    if keep_prob <= 0.0:
        return torch.zeros(n, dtype=torch.bool, device=batch.seq_ids.device)
    update = f":update{int(batch.update)}" if batch.update else ""
    key = f"{int(seed)}:{int(batch.step)}:{int(batch.micro_batch)}:{stream}{update}".encode()
    generator = torch.Generator(device="cpu").manual_seed(int(hashlib.sha256(key).hexdigest()[:15], 16))
    draws = torch.rand(n, generator=generator)
    return (draws < keep_prob).to(batch.seq_ids.device)


def linear_or_cosine(start: float, end: float | None, step: int, total_steps: int, shape: str = "linear") -> float:
    """A value going from ``start`` at step 0 to ``end`` at step ``total_steps - 1`` (then held).

    ``end=None`` keeps ``start``. ``shape`` is ``linear`` or ``cosine`` (half-cosine easing).
    """
    if end is None or end == start:
        return float(start)
    progress = min(max(step, 0) / max(total_steps - 1, 1), 1.0)
    if shape == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    elif shape != "linear":
        raise ValueError(f"schedule shape {shape!r} is unknown; use 'linear' or 'cosine'")
    return float(start + (end - start) * progress)


# ----------------------------------------------------------------------------------- validation


def require(condition: bool, objective: str, message: str) -> None:
    """Raise ``ValueError("objective 'name': message")`` unless ``condition``."""
    if not condition:
        raise ValueError(f"objective {objective!r}: {message}")


def with_old_logp(objective, updates_per_rollout: int):
    """``objective`` (a dataclass with a ``use_old_logp`` field) as a run of ``updates_per_rollout``
    optimiser updates per rollout batch needs it: a copy with ``use_old_logp=True`` when there are
    several (the ratios and importance weights then compare with the pre-update policy), else itself."""
    if updates_per_rollout <= 1 or objective.use_old_logp:
        return objective
    return dataclasses.replace(objective, use_old_logp=True)


def same_field(cls, name: str, default):
    """A dataclass field of a preset: ``cls``'s field ``name`` (its help) with a new default."""
    base = cls.__dataclass_fields__[name]
    return dataclasses.field(default=default, metadata=base.metadata)
