"""The signals of one rollout batch: those the objective declared (``objective.signals()``), and only those.

    scores  = signals.score(rollout, rows)                        rewards [S], successes, feedback
    batches = signals.micro_batches(rollout, rows, scores, step)  advantages, teacher contexts and mask,
                                                                  old_logp, packed micro-batches with
                                                                  the step's global normalisers
    teacher = signals.model_signals(rollout, micro_batch)         no-grad forwards: ref_logp, the
                                                                  teacher's hidden states and teacher_logp

The objective says what it needs through its methods (``signals()``, ``advantages()``,
``teacher_spec()``); nothing here knows an objective by name. :func:`check_signals` fails before
any model is loaded when a declared signal cannot be provided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from denser.kernels import token_stats
from denser.objectives import (
    TEACHER_LOGP,
    TEACHER_SIGNALS,
    Objective,
    PolicyBatch,
    Signal,
    TeacherSpec,
    teacher_messages,
)
from denser.objectives.common import normaliser_counts
from denser.tasks import Score, Task
from denser.trainers.config import TrainConfig
from denser.trainers.models import render_prompt
from denser.trainers.packing import PackedBatch, completion_hidden_states, lm_head_params
from denser.trainers.rollout import Rollout
from denser.trainers.sharding import ModelCall, Sharding
from denser.trainers.teacher import TeacherWeights

# What a task must be able to feed (``Task.provides``): rewards, and the successes and feedback
# that teacher contexts are built from. TEACHER_LOGP needs what TEACHER needs.
TASK_SIGNALS = frozenset({Signal.REWARDS, Signal.ADVANTAGES, Signal.TEACHER})


def check_signals(objective: Objective, task: Task) -> None:
    """Fail before any model is loaded when a declared signal cannot be provided."""
    name, declared = objective.name, objective.signals()
    needs = declared & TASK_SIGNALS | ({Signal.TEACHER} if declared & TEACHER_SIGNALS else set())
    for s in sorted(needs, key=str):
        if s not in task.provides:
            raise ValueError(f"objective {name!r} needs signal '{s}' but task {task.name!r} cannot provide it "
                             f"(it provides: {', '.join(sorted(map(str, task.provides)))})")
    for s in sorted(declared & TEACHER_SIGNALS, key=str):
        if objective.teacher_spec() is None:
            raise ValueError(f"objective {name!r} declares signal '{s}' but its teacher_spec() returns None; "
                             "return a denser.objectives.TeacherSpec (how teacher contexts are built and scored)")


def check_teacher_vocabulary(objective: Objective, policy: nn.Module, teacher: nn.Module) -> None:
    """Fail before any generation when the teacher's vocabulary is not the policy's."""
    v_s = policy.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if v_s != v_t:
        raise ValueError(f"objective {objective.name!r} distils from a teacher whose vocabulary ({v_t}) differs from "
                         f"the policy's ({v_s}); token-level distillation needs one shared tokenizer")


@dataclass
class Scores:
    """The task's verdict on every sample of a rollout."""

    scores: list[Score]  # score and feedback text per sample
    rewards: Tensor  # [S] fp32
    success: Tensor  # [S] fp32, 1.0 where task.is_success


@dataclass
class MicroBatch:
    """Samples ``indices`` of the rollout, packed, with their ``PolicyBatch``."""

    indices: list[int]
    packed: PackedBatch
    batch: PolicyBatch
    teacher_contexts: list[list[int]] | None = None  # per sample: the teacher's context token ids


@dataclass
class TeacherInputs:
    """What the loss core receives of the teacher: its hidden states at the completion tokens and
    its output layer (the core uses them when the objective's core options ask for a divergence)."""

    hidden: Tensor  # [N, H_teacher]
    weight: Tensor | None  # [V, H_teacher]; None: the policy's own (a live teacher)
    bias: Tensor | None


class SignalComputer:
    """Computes the declared signals of each rollout batch for one run.

    ``reference``: the frozen reference model (when ``Signal.REF_LOGP`` is declared);
    ``teacher``: the teacher's weights (when ``Signal.TEACHER`` or ``TEACHER_LOGP`` is declared),
    scoring contexts built as ``teacher_spec`` says; ``reduce`` sums a tensor over processes;
    ``reference_root``: under FSDP, the root of the sharded reference (its forward gathers the weights).
    """

    def __init__(self, objective: Objective, task: Task, tokenizer: Any, cfg: TrainConfig, *, device: torch.device,
                 rank: int, reduce, reference: nn.Module | None, teacher: TeacherWeights | None,
                 teacher_spec: TeacherSpec | None, reference_root: ModelCall | None = None):
        self.objective, self.task, self.tokenizer, self.cfg = objective, task, tokenizer, cfg
        self.declared = objective.signals()
        self.device, self.rank, self.reduce = device, rank, reduce
        self.reference, self.teacher, self.teacher_spec = reference, teacher, teacher_spec
        self.reference_root = reference_root

    # ----------------------------------------------------------------------- per rollout batch

    def score(self, rollout: Rollout, rows: list[dict]) -> Scores:
        """Rewards (and feedback) of every sample; sample ``s`` answers ``rows[s // G]``."""
        g = rollout.num_generations
        sample_rows = [rows[s // g] for s in range(rollout.num_samples)]
        scores = self.task.score_batch(rollout.texts, sample_rows)
        rewards = torch.tensor([s.score for s in scores], dtype=torch.float32)
        success = torch.tensor([float(self.task.is_success(s)) for s in scores])
        return Scores(scores, rewards, success)

    def micro_batches(self, rollout: Rollout, rows: list[dict], scores: Scores, step: int) -> list[MicroBatch]:
        """The rollout in micro-batches of ``cfg.micro_batch_size`` samples, each with its
        per-sample signals and the loss normalisers of the whole step (summed over processes)."""
        cfg, dev, S = self.cfg, self.device, rollout.num_samples
        advantages = None
        if Signal.ADVANTAGES in self.declared:
            advantages = self.objective.advantages(scores.rewards, rollout.num_generations)
        contexts, teacher_mask = None, None
        if self.teacher is not None:
            contexts, teacher_mask = self.teacher_contexts(rollout, rows, scores)
        groups = [list(range(a, min(S, a + cfg.micro_batch_size))) for a in range(0, S, cfg.micro_batch_size)]
        out = []
        for i, idx in enumerate(groups):
            packed = rollout.pack(idx, device=dev)
            it = torch.tensor(idx)
            batch = PolicyBatch(
                seq_ids=packed.seq_ids, num_seqs=len(idx), global_tokens=1.0, global_seqs=1.0,
                rewards=scores.rewards[it].to(dev),
                advantages=None if advantages is None else advantages[it].to(dev),
                old_logp=packed.old_logp if Signal.OLD_LOGP in self.declared else None,
                teacher_mask=None if teacher_mask is None else teacher_mask[it].to(dev),
                norm_length=float(cfg.max_new_tokens), step=step, total_steps=cfg.steps,
                micro_batch=self.rank * len(groups) + i)
            out.append(MicroBatch(idx, packed, batch, None if contexts is None else [contexts[j] for j in idx]))
        self._set_global_normalisers([mb.batch for mb in out])
        return out

    def teacher_contexts(self, rollout: Rollout, rows: list[dict], scores: Scores) -> tuple[list[list[int]], Tensor]:
        """Per sample: the teacher's context token ids (its own prompt when it gets no teacher),
        and ``teacher_mask [S]`` bool (the sample has a teacher context)."""
        g = rollout.num_generations
        contexts, mask = [], []
        for s in range(rollout.num_samples):
            p = s // g
            group = range(p * g, (p + 1) * g)
            messages = teacher_messages(self.task.prompt(rows[p]), [rollout.texts[j] for j in group],
                                        [scores.scores[j].score for j in group],
                                        [scores.scores[j].feedback for j in group], s - p * g, self.teacher_spec)
            if messages is None:
                contexts.append(rollout.sample_prompt_ids(s))
                mask.append(False)
            else:
                ids = render_prompt(self.tokenizer, messages)
                contexts.append(ids[-self.cfg.teacher_max_context_tokens:])
                mask.append(True)
        return contexts, torch.tensor(mask, dtype=torch.bool)

    def _set_global_normalisers(self, batches: list[PolicyBatch]) -> None:
        """Every micro-batch's loss normalisers := the totals of the step (all micro-batches, all processes)."""
        counts: dict[str, float] = {}
        for b in batches:
            for k, v in normaliser_counts(b).items():
                counts[k] = counts.get(k, 0.0) + v
        keys = sorted(counts)
        totals = self.reduce(torch.tensor([counts[k] for k in keys], device=self.device))
        for b in batches:
            for k, v in zip(keys, totals.tolist()):
                setattr(b, k, v)

    # ----------------------------------------------------------------------- per micro-batch

    @torch.no_grad()
    def model_signals(self, rollout: Rollout, mb: MicroBatch) -> TeacherInputs | None:
        """The signals that need a forward pass of another model, computed just before the
        micro-batch's update (so only one micro-batch's teacher states are held at a time):
        ``ref_logp`` (REF_LOGP), and the teacher's hidden states (TEACHER) and its log-prob of
        each sampled token (TEACHER_LOGP, in ``batch.extras[TEACHER_LOGP]``)."""
        cfg, packed, batch = self.cfg, mb.packed, mb.batch

        def logp(model: nn.Module, hidden: Tensor) -> Tensor:
            weight, bias = lm_head_params(model)
            return token_stats(hidden, weight, packed.targets, bias=bias, temperature=cfg.temperature,
                               backend=cfg.backend).logp

        if self.reference is not None:
            def ref_logp(model: nn.Module) -> Tensor:
                return logp(model, completion_hidden_states(model, packed))

            batch.ref_logp = (ref_logp(self.reference) if self.reference_root is None
                              else Sharding.run(self.reference_root, ref_logp))
        if self.teacher is None:
            return None
        tpacked = rollout.pack(mb.indices, contexts=mb.teacher_contexts, device=self.device)
        teacher = self.teacher

        def teacher_forward(model: nn.Module) -> TeacherInputs:
            was_training = model.training
            model.eval()
            hidden = completion_hidden_states(model, tpacked)
            model.train(was_training)
            if Signal.TEACHER_LOGP in self.declared:
                batch.extras[TEACHER_LOGP] = logp(model, hidden)
            return TeacherInputs(hidden, *teacher.head(*lm_head_params(model)))

        return teacher.run(teacher_forward)
