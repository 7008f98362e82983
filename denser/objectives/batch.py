"""``PolicyBatch``: one micro-batch of packed completion tokens and the signals computed for it.

The loop builds it (docs/design.md, Contract 3); the loss core slices it into chunks
(:meth:`PolicyBatch.token_slice`); objectives read it in ``prepare`` and ``loss``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

# ``batch.extras`` key of ``Signal.TEACHER_LOGP``: the teacher's log-prob of each sampled token,
# ``[N]`` fp32, detached, at the loss core's temperature.
TEACHER_LOGP = "teacher_logp"


@dataclass
class PolicyBatch:
    """One micro-batch of packed completion tokens, and what the objective needs of it.

    Tokens are packed: ``N`` completion tokens, the tokens of one completion contiguous,
    ``seq_ids[i]`` in ``[0, num_seqs)`` naming the completion token ``i`` belongs to.
    Per-sequence tensors are ``[num_seqs]``; per-token tensors are ``[N]``.

    ``global_tokens`` and ``global_seqs`` are the loss normalisers: the number of loss tokens and
    sequences in the *whole* optimiser update (its mini-batch: all gradient-accumulation
    micro-batches on all processes), so that summing micro-batch losses gives the loss of the
    mini-batch. Every
    sequence counts in ``global_seqs``, also one whose tokens are all masked.
    ``norm_length`` is the constant divisor of ``seq-mean-token-sum-norm`` (Dr. GRPO): usually
    the generation budget ``max_new_tokens``.
    ``global_teacher_tokens`` and ``global_teacher_seqs`` are the same counts restricted to the
    samples that have a teacher context (``teacher_mask``): e.g. the normaliser of ``sdpo``'s
    ``token-mean``, which averages over distilled tokens only. ``None`` falls back to
    ``global_tokens`` / ``global_seqs`` (the distillation loss is then scaled by the fraction of
    samples with a teacher).
    ``normaliser_counts(batch)`` in ``denser.objectives.common`` gives a micro-batch's share of all
    four counts; the loop sums them over micro-batches and processes.
    ``step`` is the index of the rollout batch the micro-batch comes from (of ``total_steps``: what
    schedules move along); ``micro_batch`` numbers the micro-batches of one optimiser update across
    processes (``rank * micro_batches_per_process + i``) and ``update`` the updates of one step,
    so that random draws in ``Objective.prepare`` (token masks) differ between micro-batches and
    updates and are reproducible.
    """

    seq_ids: Tensor
    num_seqs: int
    global_tokens: float
    global_seqs: float
    token_mask: Tensor | None = None  # [N] bool: tokens that count in the loss (default: all)
    rewards: Tensor | None = None  # [S]
    advantages: Tensor | None = None  # [S] group advantages (or [N] per-token)
    old_logp: Tensor | None = None  # [N] behaviour-policy log-probs
    ref_logp: Tensor | None = None  # [N] frozen reference log-probs
    teacher_mask: Tensor | None = None  # [S] bool: the sample has a teacher context
    norm_length: float = 1.0
    step: int = 0  # the rollout batch (0-based), for schedules and random draws
    total_steps: int = 1  # rollout batches in the run
    extras: dict[str, Tensor] = dataclasses.field(default_factory=dict)  # per-token [N] tensors an objective prepares
    global_teacher_tokens: float | None = None  # loss tokens of samples with a teacher, whole update
    global_teacher_seqs: float | None = None  # samples with a teacher, whole update
    micro_batch: int = 0  # index of this micro-batch in its update (across processes), for random draws
    update: int = 0  # index of the optimiser update within the step, for random draws
    # True: ``advantages`` is per-token [N]; False: per-sequence [S]; None: inferred from its size
    # on the full micro-batch (and then kept, so a chunk of tokens is never mistaken for sequences).
    token_level_advantages: bool | None = None

    def __post_init__(self) -> None:
        if self.seq_ids.dim() != 1:
            raise ValueError(f"PolicyBatch.seq_ids must be 1-D [N], got shape {tuple(self.seq_ids.shape)}")
        if self.token_mask is None:
            self.token_mask = torch.ones_like(self.seq_ids, dtype=torch.bool)
        if self.token_level_advantages is None and self.advantages is not None:
            n, s = self.num_tokens, self.num_seqs
            if self.advantages.numel() == s:
                self.token_level_advantages = False
            elif self.advantages.numel() == n:
                self.token_level_advantages = True
            else:
                raise ValueError(
                    f"PolicyBatch.advantages has {self.advantages.numel()} elements; expected one per sequence "
                    f"({s}) or one per token ({n})"
                )

    @property
    def num_tokens(self) -> int:
        return int(self.seq_ids.numel())

    @property
    def seq_lens(self) -> Tensor:
        """Loss tokens per sequence, ``[num_seqs]`` float (from the whole micro-batch)."""
        if "_seq_lens" not in self.extras:
            self.extras["_seq_lens"] = torch.zeros(self.num_seqs, device=self.seq_ids.device).index_add_(
                0, self.seq_ids, self.token_mask.float()
            )
        return self.extras["_seq_lens"]

    @property
    def seq_starts(self) -> Tensor:
        """``[N]`` bool: the first token (in packed order) of each sequence of the full micro-batch.

        Lets a per-sequence metric be written over tokens and still count each sequence once when
        the tokens are split into chunks: ``Metric.of(per_seq[seq_ids], batch.seq_starts)``.
        """
        if "_seq_starts" not in self.extras:
            starts = torch.ones_like(self.seq_ids, dtype=torch.bool)
            if self.seq_ids.numel() > 1:
                starts[1:] = self.seq_ids[1:] != self.seq_ids[:-1]
            self.extras["_seq_starts"] = starts
        return self.extras["_seq_starts"]

    def token_advantages(self) -> Tensor:
        """Advantages broadcast to tokens ``[N]``."""
        if self.advantages is None:
            raise ValueError("this objective needs advantages but the batch has none (declare Signal.ADVANTAGES)")
        if self.token_level_advantages:
            return self.advantages
        return self.advantages[self.seq_ids]

    def token_slice(self, start: int, stop: int) -> "PolicyBatch":
        """The tokens ``[start, stop)`` with per-sequence tensors and normalisers untouched.

        Per-sequence quantities that need every token of a sequence (``seq_lens``) are computed
        on the full batch first, so a chunk sees the same normalisers as the whole.
        """
        _ = self.seq_lens, self.seq_starts  # materialise on the full batch before slicing
        per_token = lambda t: None if t is None or t.numel() != self.num_tokens else t[start:stop]  # noqa: E731
        adv = self.advantages
        if adv is not None and self.token_level_advantages:
            adv = adv[start:stop]
        extras = {k: (v if k in _PER_SEQUENCE_EXTRAS else v[start:stop]) for k, v in self.extras.items()}
        return dataclasses.replace(
            self,
            seq_ids=self.seq_ids[start:stop],
            token_mask=self.token_mask[start:stop],
            old_logp=per_token(self.old_logp),
            ref_logp=per_token(self.ref_logp),
            advantages=adv,
            extras=extras,
        )


_PER_SEQUENCE_EXTRAS = frozenset({"_seq_lens"})  # cached [S] tensors that chunks share unsliced
