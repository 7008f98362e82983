"""The signals of one rollout batch: those the objective declared (``objective.signals()``), and only those.

    scores  = signals.score(rollout, rows)                        rewards [S] (+ overlong shaping),
                                                                  successes, feedback
    rollout = signals.pre_update_logp(rollout)                    old_logp: the policy before the step's
                                                                  first update (no-grad forward), when
                                                                  --old-logp-source says so
    sample  = signals.per_sample(rollout, rows, scores)           advantages (Objective.rollout_advantages), the
                                                                  reference's log-probs when ROLLOUT_REF_LOGP,
                                                                  teacher contexts and mask
    for update, indices in enumerate(signals.update_plan(S, step)):   epochs x mini-batches
        batches = signals.micro_batches(rollout, sample, indices, step, update)
                                                                  packed micro-batches with the update's
                                                                  global normalisers (its mini-batch,
                                                                  all processes)
        teacher = signals.model_signals(rollout, micro_batch)     no-grad forwards: ref_logp, the
                                                                  teacher's hidden states and teacher_logp

The objective says what it needs through its methods (``signals()``, ``advantages()``,
``teacher_spec()``); nothing here knows an objective by name. :func:`check_signals` fails before
any model is loaded when a declared signal cannot be provided.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from denser.engines.base import Rollout
from denser.engines.packing import PackedBatch, completion_hidden_states, lm_head_params
from denser.kernels import token_stats
from denser.objectives import (
    TEACHER_LOGP,
    TEACHER_SIGNALS,
    AdvantageInputs,
    Objective,
    PolicyBatch,
    Signal,
    TeacherSpec,
    teacher_messages,
)
from denser.objectives.common import normaliser_counts
from denser.tasks import Task
from denser.trainers.config import TrainConfig
from denser.trainers.models import render_prompt
from denser.trainers.sampling import Scores, overlong_penalty
from denser.trainers.sharding import ModelCall, Sharding
from denser.trainers.teacher import TeacherInputs, TeacherWeights

# What a task must be able to feed (``Task.provides``): rewards, and the successes and feedback
# that teacher contexts are built from. TEACHER_LOGP needs what TEACHER needs.
TASK_SIGNALS = frozenset({Signal.REWARDS, Signal.ADVANTAGES, Signal.TEACHER})


def check_signals(objective: Objective, task: Task) -> None:
    """Fail before any model is loaded when a declared signal cannot be provided."""
    name, declared = objective.name, objective.signals()
    spec = objective.teacher_spec() if declared & TEACHER_SIGNALS else None
    if Signal.ROLLOUT_REF_LOGP in declared and Signal.REF_LOGP not in declared:
        raise ValueError(f"objective {name!r} declares signal '{Signal.ROLLOUT_REF_LOGP}' without '{Signal.REF_LOGP}'; "
                         "declare both (the reference model is loaded for REF_LOGP)")
    for s in sorted(declared & TEACHER_SIGNALS, key=str):
        if spec is None:
            raise ValueError(f"objective {name!r} declares signal '{s}' but its teacher_spec() returns None; "
                             "return a denser.objectives.TeacherSpec (how teacher contexts are built and scored)")
    # a reprompt teacher context is built from the task's successes and feedback; the plain prompt needs nothing
    reprompt = spec is not None and spec.teacher_context == "reprompt"
    needs = declared & TASK_SIGNALS - {Signal.TEACHER} | ({Signal.TEACHER} if reprompt else set())
    for s in sorted(needs, key=str):
        if s not in task.provides:
            raise ValueError(f"objective {name!r} needs signal '{s}' but task {task.name!r} cannot provide it "
                             f"(it provides: {', '.join(sorted(map(str, task.provides)))})")


def check_teacher_vocabulary(objective: Objective, policy: nn.Module, teacher: nn.Module) -> None:
    """Fail before any generation when the teacher's vocabulary is not the policy's."""
    v_s = policy.get_output_embeddings().weight.shape[0]
    v_t = teacher.get_output_embeddings().weight.shape[0]
    if v_s != v_t:
        raise ValueError(f"objective {objective.name!r} distils from a teacher whose vocabulary ({v_t}) differs from "
                         f"the policy's ({v_s}); token-level distillation needs one shared tokenizer")


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


class SignalComputer:
    """Computes the declared signals of each rollout batch for one run.

    ``reference``: the frozen reference model (when ``Signal.REF_LOGP`` is declared);
    ``teacher``: the teacher's weights (when ``Signal.TEACHER`` or ``TEACHER_LOGP`` is declared),
    scoring contexts built as ``teacher_spec`` says; ``reduce`` sums a tensor over processes.
    Under FSDP, ``policy_root`` and ``reference_root`` are the roots whose forwards gather the
    policy's and the reference's weights (:mod:`denser.trainers.sharding`); their forwards run there.
    """

    def __init__(self, objective: Objective, task: Task, tokenizer: Any, cfg: TrainConfig, *, device: torch.device,
                 rank: int, reduce, reference: nn.Module | None, teacher: TeacherWeights | None,
                 teacher_spec: TeacherSpec | None, policy: nn.Module | None = None,
                 policy_root: ModelCall | None = None, reference_root: ModelCall | None = None):
        self.objective, self.task, self.tokenizer, self.cfg = objective, task, tokenizer, cfg
        self.declared = objective.signals()
        self.device, self.rank, self.reduce = device, rank, reduce
        self.reference, self.teacher, self.teacher_spec = reference, teacher, teacher_spec
        self.policy = policy
        self.policy_root, self.reference_root = policy_root, reference_root
        source = cfg.old_logp_source
        # old_logp from a forward of the pre-update policy ('auto': when a step makes several updates)
        self.forward_old_logp = Signal.OLD_LOGP in self.declared and (
            source == "forward" or (source == "auto" and cfg.updates_per_step > 1))
        if self.forward_old_logp and policy is None:
            raise ValueError("SignalComputer: old_logp from a forward pass (--old-logp-source) needs the policy")

    # ----------------------------------------------------------------------- per rollout batch

    def score(self, rollout: Rollout, rows: list[dict]) -> Scores:
        """Rewards (and feedback) of every sample; sample ``s`` answers ``rows[s // G]``. With
        ``--overlong-buffer`` the rewards carry DAPO's overlong penalty (``scores.overlong``)."""
        g = rollout.num_generations
        sample_rows = [rows[s // g] for s in range(rollout.num_samples)]
        scores = self.task.score_batch(rollout.texts, sample_rows)
        rewards = torch.tensor([s.score for s in scores], dtype=torch.float32)
        success = torch.tensor([float(self.task.is_success(s)) for s in scores])
        overlong = None
        if self.cfg.overlong_buffer > 0:
            overlong = overlong_penalty(rollout.lengths, self.cfg.max_new_tokens, self.cfg.overlong_buffer,
                                        self.cfg.overlong_penalty)
            rewards = rewards + overlong
        return Scores(scores, rewards, success, overlong)

    @torch.no_grad()
    def pre_update_logp(self, rollout: Rollout) -> Rollout:
        """The rollout with its behaviour log-probs replaced by the current policy's (a no-grad forward in
        micro-batches, eval mode, the run's temperature), when old_logp come from a forward pass
        (``--old-logp-source forward``, or ``auto`` with several updates per step); else ``rollout``.
        Called before the step's first update, so every update's ratios compare with the policy that
        the step started from (verl's ``compute_log_prob``, TRL's ``old_per_token_logps``)."""
        if not self.forward_old_logp:
            return rollout
        cfg, model, S = self.cfg, self.policy, rollout.num_samples
        was_training = model.training
        model.eval()
        logps: list[Tensor] = []
        try:
            for idx in self._groups(rollout, list(range(S)), same_count=False):
                packed = rollout.pack(idx, device=self.device)
                logp = _run(self.policy_root, model, functools.partial(_logp, packed=packed, cfg=cfg, chunk_size=cfg.chunk_size or None))
                logps += list(logp.float().cpu().split(packed.lengths.tolist()))
        finally:
            model.train(was_training)
        return dataclasses.replace(rollout, logps=logps)

    def per_sample(self, rollout: Rollout, rows: list[dict], scores: Scores) -> SampleSignals:
        """Advantages (ADVANTAGES) and teacher contexts (a teacher) of every sample, once per rollout batch."""
        advantages, ref_logp = None, None
        if Signal.ROLLOUT_REF_LOGP in self.declared:
            ref_logp = self._rollout_ref_logp(rollout)
        if Signal.ADVANTAGES in self.declared:
            token_mask = None
            if self.cfg.mask_truncated_completions:  # as micro_batches masks them
                token_mask = [torch.full(lp.shape, not bool(t)) for lp, t in zip(rollout.logps, rollout.truncated)]
            inputs = AdvantageInputs(scores.rewards, rollout.num_generations, token_mask=token_mask,
                                     old_logp=list(rollout.logps), ref_logp=ref_logp,
                                     reduce=lambda t: self.reduce(t.to(self.device)).cpu())
            advantages = _checked_advantages(self.objective, self.objective.rollout_advantages(inputs), rollout)
        contexts, teacher_mask = None, None
        if self.teacher is not None:
            contexts, teacher_mask = self.teacher_contexts(rollout, rows, scores)
        return SampleSignals(scores.rewards, advantages, contexts, teacher_mask, ref_logp)

    @torch.no_grad()
    def _rollout_ref_logp(self, rollout: Rollout) -> list[Tensor]:
        """The reference's log-probs of every sample's tokens (ROLLOUT_REF_LOGP), in micro-batches."""
        out: list[Tensor] = []
        for idx in self._groups(rollout, list(range(rollout.num_samples))):
            packed = rollout.pack(idx, device=self.device)
            logp = _run(self.reference_root, self.reference, functools.partial(_logp, packed=packed, cfg=self.cfg))
            out += list(logp.float().cpu().split(packed.lengths.tolist()))
        return out

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
        """Samples ``indices`` of the rollout (one update's mini-batch) in micro-batches (:meth:`_groups`),
        each with its per-sample signals and the loss normalisers of the whole mini-batch (all its
        micro-batches, summed over processes)."""
        cfg, dev = self.cfg, self.device
        groups = self._groups(rollout, indices)
        out = []
        for i, idx in enumerate(groups):
            packed = rollout.pack(idx, device=dev)
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
                old_logp=packed.old_logp if Signal.OLD_LOGP in self.declared else None,
                teacher_mask=None if sample.teacher_mask is None else sample.teacher_mask[it].to(dev),
                norm_length=float(cfg.max_new_tokens), step=step, total_steps=cfg.steps,
                micro_batch=self.rank * len(groups) + i, update=update)
            out.append(MicroBatch(idx, packed, batch,
                                  None if sample.contexts is None else [sample.contexts[j] for j in idx]))
        self._set_global_normalisers([mb.batch for mb in out])
        return out

    def _groups(self, rollout: Rollout, indices: list[int], *, same_count: bool = True) -> list[list[int]]:
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

    def teacher_contexts(self, rollout: Rollout, rows: list[dict], scores: Scores) -> tuple[list[list[int]], Tensor]:
        """Per sample: the teacher's context token ids, and ``teacher_mask [S]`` bool (the sample has a
        teacher context), as ``teacher_spec.teacher_context`` says: ``prompt``, the sample's own prompt
        ids unchanged, every sample with a teacher; ``reprompt`` (SDPO), the reprompt of
        :func:`~denser.objectives.teacher_messages` rendered with the chat template and cut on the right
        at ``--teacher-max-context-tokens`` (a sample without one keeps its own prompt, masked out)."""
        if self.teacher_spec.teacher_context == "prompt":
            contexts = [rollout.sample_prompt_ids(s) for s in range(rollout.num_samples)]
            return contexts, torch.ones(rollout.num_samples, dtype=torch.bool)
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
                contexts.append(ids[:self.cfg.teacher_max_context_tokens])  # cut on the right, as SDPO
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
        if self.reference is not None and batch.ref_logp is None:  # not already from ROLLOUT_REF_LOGP
            batch.ref_logp = _run(self.reference_root, self.reference, lambda m: _logp(m, packed, cfg))
        if self.teacher is None:
            return None
        tpacked = rollout.pack(mb.indices, contexts=mb.teacher_contexts, device=self.device)
        teacher = self.teacher.outputs(tpacked)
        if Signal.TEACHER_LOGP in self.declared:
            batch.extras[TEACHER_LOGP] = token_stats(teacher.hidden, teacher.weight, packed.targets, bias=teacher.bias,
                                                     temperature=cfg.temperature, backend=cfg.backend).logp
        if cfg.log_teacher_entropy:  # a chunked no-grad pass: no [N, V] logits
            teacher.entropy = token_stats(teacher.hidden, teacher.weight, packed.targets, bias=teacher.bias,
                                          temperature=cfg.temperature, need_entropy=True, backend=cfg.backend).entropy
        return teacher


def _checked_advantages(objective: Objective, advantages, rollout: Rollout):
    """``advantages`` if they are ``[S]`` or one ``[L_s]`` tensor per sample, else one line naming the objective."""
    lengths = [len(lp) for lp in rollout.logps]
    if isinstance(advantages, Tensor) and tuple(advantages.shape) == (len(lengths),):
        return advantages
    if isinstance(advantages, list) and [tuple(a.shape) for a in advantages] == [(n,) for n in lengths]:
        return advantages
    got = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages).__name__
    raise ValueError(f"objective {objective.name!r}: rollout_advantages() returned {got}; expected a tensor [S={len(lengths)}] "
                     "or a list of S tensors [L_s], one per completion token")


def _per_sample(values: Tensor | list[Tensor] | None, idx: list[int], device: torch.device) -> Tensor | None:
    """Samples ``idx`` of ``[S]`` values, or of per-sample ``[L_s]`` values concatenated in packed order ``[N]``."""
    if values is None:
        return None
    if isinstance(values, list):
        return torch.cat([values[j] for j in idx]).to(device)
    return values[torch.tensor(idx)].to(device)


def _run(root: ModelCall | None, model: nn.Module, fn):
    """``fn(model)``; under FSDP inside ``root``'s forward, which gathers the model's weights."""
    return fn(model) if root is None else Sharding.run(root, fn)


def _logp(model: nn.Module, packed: PackedBatch, cfg: TrainConfig, chunk_size: int | None = None) -> Tensor:
    """``[N]`` log-probs of ``packed``'s completion tokens under ``model`` (no grad)."""
    hidden = completion_hidden_states(model, packed)
    weight, bias = lm_head_params(model)
    return token_stats(hidden, weight, packed.targets, bias=bias, temperature=cfg.temperature, backend=cfg.backend,
                       chunk_size=chunk_size).logp
