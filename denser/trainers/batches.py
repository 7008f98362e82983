"""How a step's samples become updates and each update's samples micro-batches.

    for update, indices in enumerate(batches.update_plan(S, step)):     epochs x mini-batches
        for mb in batches.micro_batches(rollout, sample, indices, step, update):
                                                  packed micro-batches with the update's global
                                                  normalisers (its mini-batch, all processes)

A mini-batch is cut into micro-batches of ``--micro-batch-size`` samples, or of at most
``--max-tokens-per-micro-batch`` padded tokens (:func:`token_budget_groups`); every process makes the
same number of backward passes per update (:func:`split_to_count`). The per-sample signals the
micro-batches carry (:class:`SampleSignals`) are computed once per step by
:class:`~denser.trainers.signals.SignalComputer`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from denser.engines.base import Rollout
from denser.engines.packing import PackedBatch
from denser.objectives import PolicyBatch
from denser.objectives.common import normaliser_counts
from denser.trainers.config import TrainConfig


def padded_tokens(sizes: list[tuple[int, int]]) -> int:
    """The tokens of one packed forward of samples of ``(context, completion)`` lengths ``sizes``: rows x
    (longest context + longest completion), as :func:`~denser.engines.packing.build_packed_batch` pads."""
    return len(sizes) * (max(c for c, _ in sizes) + max(t for _, t in sizes)) if sizes else 0


def token_budget_groups(indices: list[int], sizes: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """``indices`` cut, in order, into consecutive groups whose packed forward holds at most ``budget``
    tokens (:func:`padded_tokens`; ``sizes[k]``: the context and completion lengths of ``indices[k]``);
    a sample longer than ``budget`` gets a group of its own (one long reply never stops a run; that
    micro-batch is then over the budget)."""
    groups: list[list[int]] = []
    current: list[tuple[int, int]] = []
    for i, size in zip(indices, sizes):
        if groups and padded_tokens(current + [size]) <= budget:
            groups[-1].append(i)
            current.append(size)
        else:
            groups.append([i])
            current = [size]
    return groups


def split_to_count(groups: list[list[int]], sizes: dict[int, tuple[int, int]], count: int) -> list[list[int]]:
    """``groups`` with the largest (:func:`padded_tokens`) of those holding two or more samples halved, in
    its place, until there are ``count`` of them (every process of a run must make the same number of
    backward passes per update). ``count`` must be at most the number of samples."""
    groups = [list(g) for g in groups]
    while len(groups) < count:
        k = max((j for j, g in enumerate(groups) if len(g) > 1),
                key=lambda j: padded_tokens([sizes[i] for i in groups[j]]))
        g = groups[k]
        groups[k:k + 1] = [g[:len(g) // 2], g[len(g) // 2:]]
    return groups


@dataclass
class SampleSignals:
    """The per-sample signals of a rollout batch, computed once and shared by all its updates."""

    rewards: Tensor  # [S]
    advantages: Tensor | list[Tensor] | None  # [S], or per sample [L_s] per-token (ADVANTAGES)
    contexts: list[list[int]] | None  # per sample: the teacher's context token ids (a teacher)
    teacher_mask: Tensor | None  # [S] bool: the sample has a teacher context (a teacher)
    ref_logp: list[Tensor] | None = None  # per sample [L_s]: reference log-probs (ROLLOUT_REF_LOGP)


@dataclass
class MicroBatch:
    """Samples ``indices`` of the rollout, packed, with their ``PolicyBatch``."""

    indices: list[int]
    packed: PackedBatch
    batch: PolicyBatch
    teacher_contexts: list[list[int]] | None = None  # per sample: the teacher's context token ids


class UpdateBatches:
    """The update plan and the micro-batches of one run.

    ``reduce`` sums a tensor over processes; ``old_logp``: the micro-batches carry the behaviour
    log-probs (the objective declared ``Signal.OLD_LOGP``); ``rank``: this process's index, which
    numbers its micro-batches apart from the other processes'.
    """

    def __init__(self, cfg: TrainConfig, *, device: torch.device, rank: int, reduce, old_logp: bool):
        self.cfg, self.device, self.rank, self.reduce, self.old_logp = cfg, device, rank, reduce, old_logp

    def update_plan(self, num_samples: int, step: int) -> list[list[int]]:
        """The samples of each optimiser update of ``step``: ``epochs`` passes, each cut into ``mini_batches``
        near-equal mini-batches (sizes differ by at most one). With ``mini_batches > 1`` and
        ``shuffle_mini_batches`` each pass cuts a fresh permutation, drawn from a generator seeded by
        ``(seed, step, epoch)`` (the global RNG streams are untouched); otherwise the rollout's order.
        With one mini-batch the order is always kept: a permutation would only reorder the sums of the
        one update (and a run of one update per step is then what it always was)."""
        cfg, plan = self.cfg, []
        for epoch in range(cfg.epochs):
            order = torch.arange(num_samples)
            if cfg.mini_batches > 1 and cfg.shuffle_mini_batches:
                key = f"{cfg.seed}:{step}:{epoch}:mini_batches".encode()
                g = torch.Generator().manual_seed(int(hashlib.sha256(key).hexdigest()[:15], 16))
                order = torch.randperm(num_samples, generator=g)
            plan += [part.tolist() for part in torch.tensor_split(order, cfg.mini_batches)]
        return plan

    def micro_batches(self, rollout: Rollout, sample: SampleSignals, indices: list[int], step: int,
                      update: int = 0) -> list[MicroBatch]:
        """Samples ``indices`` of the rollout (one update's mini-batch) in micro-batches (:meth:`groups`),
        each with its per-sample signals and the loss normalisers of the whole mini-batch (all its
        micro-batches, summed over processes)."""
        cfg, dev = self.cfg, self.device
        groups = self.groups(rollout, indices)
        out = []
        for i, idx in enumerate(groups):
            packed = rollout.pack(idx, device=dev, layout=cfg.packing)
            it = torch.tensor(idx)
            token_mask = None
            if cfg.mask_truncated_completions:  # TRL's option: a reply cut by the length limit gets no loss
                token_mask = ~rollout.truncated[it].to(dev)[packed.seq_ids]
            batch = PolicyBatch(
                seq_ids=packed.seq_ids, num_seqs=len(idx), global_tokens=1.0, global_seqs=1.0, token_mask=token_mask,
                rewards=sample.rewards[it].to(dev),
                advantages=_per_sample(sample.advantages, idx, dev),
                token_level_advantages=None if sample.advantages is None else isinstance(sample.advantages, list),
                ref_logp=None if sample.ref_logp is None else _per_sample(sample.ref_logp, idx, dev),
                old_logp=packed.old_logp if self.old_logp else None,
                teacher_mask=None if sample.teacher_mask is None else sample.teacher_mask[it].to(dev),
                norm_length=float(cfg.max_new_tokens), step=step, total_steps=cfg.steps,
                micro_batch=self.rank * len(groups) + i, update=update)
            out.append(MicroBatch(idx, packed, batch,
                                  None if sample.contexts is None else [sample.contexts[j] for j in idx]))
        self._set_global_normalisers([mb.batch for mb in out])
        return out

    def groups(self, rollout: Rollout, indices: list[int], *, same_count: bool = True) -> list[list[int]]:
        """The micro-batches of ``indices``, in order: ``cfg.micro_batch_size`` samples each, or, with
        ``--max-tokens-per-micro-batch``, at most that many tokens in the policy's packed forward (rows x
        padded prompt + completion width; :func:`token_budget_groups`). With a budget and ``same_count`` the processes agree on the largest
        count among them (one all-reduce) and the others halve micro-batches to reach it, since every
        backward pass of an update synchronises gradients."""
        cfg = self.cfg
        budget = cfg.max_tokens_per_micro_batch
        if budget <= 0:
            return [indices[a:a + cfg.micro_batch_size] for a in range(0, len(indices), cfg.micro_batch_size)]
        sizes = {i: (len(rollout.sample_prompt_ids(i)), len(rollout.completion_ids[i])) for i in indices}
        groups = token_budget_groups(indices, [sizes[i] for i in indices], budget)
        if same_count:
            # the count of every process, as a histogram of fixed length (a rollout batch's samples per process)
            slots = max(cfg.prompts_per_step * cfg.num_generations, len(indices)) + 1
            hist = torch.zeros(slots, device=self.device)
            hist[len(groups)] = 1.0
            count = int(torch.nonzero(self.reduce(hist)).max())
            groups = split_to_count(groups, sizes, count)
        return groups

    def _set_global_normalisers(self, batches: list[PolicyBatch]) -> None:
        """Every micro-batch's loss normalisers := the totals of its mini-batch (all micro-batches, all processes)."""
        counts: dict[str, float] = {}
        for b in batches:
            for k, v in normaliser_counts(b).items():
                counts[k] = counts.get(k, 0.0) + v
        keys = sorted(counts)
        totals = self.reduce(torch.tensor([counts[k] for k in keys], device=self.device))
        for b in batches:
            for k, v in zip(keys, totals.tolist()):
                setattr(b, k, v)


def _per_sample(values: Tensor | list[Tensor] | None, idx: list[int], device: torch.device) -> Tensor | None:
    """Samples ``idx`` of ``[S]`` values, or of per-sample ``[L_s]`` values concatenated in packed order ``[N]``."""
    if values is None:
        return None
    if isinstance(values, list):
        return torch.cat([values[j] for j in idx]).to(device)
    return values[torch.tensor(idx)].to(device)
