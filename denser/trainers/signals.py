"""The signals of one rollout batch: those the objective declared (``objective.signals()``), and only those.

    rollout = signals.pre_update_logp(rollout)                    old_logp: the policy before the step's
                                                                  first update (no-grad forward), when
                                                                  --old-logp-source says so
    sample  = signals.per_sample(rollout, rows, scores)           advantages, teacher contexts and mask
    for each micro-batch mb of each update                        (signals.batches: trainers/batches.py)
        teacher = signals.model_signals(rollout, mb)              no-grad forwards: ref_logp, the
                                                                  teacher's hidden states and teacher_logp

The objective says what it needs through its methods (``signals()``, ``advantages()``,
``teacher_spec()``); nothing here knows an objective by name. :func:`check_signals` fails before
any model is loaded when a declared signal cannot be provided.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
from torch import Tensor, nn

from denser.engines.base import Rollout
from denser.engines.packing import PackedBatch, completion_hidden_states, lm_head_params
from denser.kernels import token_stats
from denser.kernels.stats import Metric
from denser.objectives import (
    TEACHER_LOGP,
    TEACHER_SIGNALS,
    AdvantageInputs,
    Objective,
    Signal,
    TeacherSpec,
    teacher_messages,
)
from denser.tasks import Task
from denser.trainers.batches import MicroBatch, SampleSignals, UpdateBatches
from denser.trainers.config import TrainConfig
from denser.trainers.models import render_prompt
from denser.trainers.rollout_correction import correction_weights, weight_advantages
from denser.trainers.scoring import Scores
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
        self.batches = UpdateBatches(cfg, device=device, rank=rank, reduce=reduce,
                                     old_logp=Signal.OLD_LOGP in self.declared)
        source = cfg.old_logp_source
        # old_logp from a forward of the pre-update policy ('auto': when a step makes several updates)
        self.forward_old_logp = Signal.OLD_LOGP in self.declared and (
            source == "forward" or (source == "auto" and cfg.updates_per_step > 1))
        # the rollout correction (trainers/rollout_correction.py): the trainer's log-probs from the same forward
        self.correction = cfg.rollout_correction if cfg.rollout_correction not in ("off", "auto") else None
        if (self.forward_old_logp or self.correction) and policy is None:
            raise ValueError("SignalComputer: old_logp from a forward pass (--old-logp-source) needs the policy")
        self.correction_weights: list[Tensor] | None = None
        self.correction_metrics: dict[str, Metric] = {}

    # ----------------------------------------------------------------------- per rollout batch

    @torch.no_grad()
    def pre_update_logp(self, rollout: Rollout) -> Rollout:
        """The rollout with its behaviour log-probs replaced by the current policy's (a no-grad forward in
        micro-batches, eval mode, the run's temperature), when old_logp come from a forward pass
        (``--old-logp-source forward``, or ``auto`` with several updates per step); else ``rollout``.
        Called before the step's first update, so every update's ratios compare with the policy that
        the step started from (verl's ``compute_log_prob``, TRL's ``old_per_token_logps``).

        With the rollout correction on, the same forward gives ``pi_train`` and the weights
        ``pi_train / pi_rollout`` (``correction_weights``, ``correction_metrics``) that
        :meth:`per_sample` applies to the advantages; the rollout keeps the engine's log-probs unless
        old_logp come from the forward."""
        self.correction_weights, self.correction_metrics = None, {}
        if not (self.forward_old_logp or self.correction):
            return rollout
        cfg, model, S = self.cfg, self.policy, rollout.num_samples
        was_training = model.training
        model.eval()
        logps: list[Tensor] = []
        try:
            for idx in self.batches.groups(rollout, list(range(S)), same_count=False):
                packed = rollout.pack(idx, device=self.device, layout=self.cfg.packing)
                logp = _run(self.policy_root, model, functools.partial(_logp, packed=packed, cfg=cfg, chunk_size=cfg.chunk_size or None))
                logps += list(logp.float().cpu().split(packed.lengths.tolist()))
        finally:
            model.train(was_training)
        if self.correction:
            self.correction_weights, self.correction_metrics = correction_weights(
                logps, rollout.logps, self.correction, self.cfg.rollout_correction_cap)
        return dataclasses.replace(rollout, logps=logps) if self.forward_old_logp else rollout

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
            if self.correction_weights is not None:  # the rollout correction: every objective's PG term
                advantages = weight_advantages(advantages, self.correction_weights)
        contexts, teacher_mask = None, None
        if self.teacher is not None:
            contexts, teacher_mask = self.teacher_contexts(rollout, rows, scores)
        return SampleSignals(scores.rewards, advantages, contexts, teacher_mask, ref_logp)

    @torch.no_grad()
    def _rollout_ref_logp(self, rollout: Rollout) -> list[Tensor]:
        """The reference's log-probs of every sample's tokens (ROLLOUT_REF_LOGP), in micro-batches."""
        out: list[Tensor] = []
        for idx in self.batches.groups(rollout, list(range(rollout.num_samples))):
            packed = rollout.pack(idx, device=self.device, layout=self.cfg.packing)
            logp = _run(self.reference_root, self.reference, functools.partial(_logp, packed=packed, cfg=self.cfg))
            out += list(logp.float().cpu().split(packed.lengths.tolist()))
        return out

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
        tpacked = rollout.pack(mb.indices, contexts=mb.teacher_contexts, device=self.device, layout=cfg.packing)
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


def _run(root: ModelCall | None, model: nn.Module, fn):
    """``fn(model)``; under FSDP inside ``root``'s forward, which gathers the model's weights."""
    return fn(model) if root is None else Sharding.run(root, fn)


def _logp(model: nn.Module, packed: PackedBatch, cfg: TrainConfig, chunk_size: int | None = None) -> Tensor:
    """``[N]`` log-probs of ``packed``'s completion tokens under ``model`` (no grad)."""
    hidden = completion_hidden_states(model, packed)
    weight, bias = lm_head_params(model)
    return token_stats(hidden, weight, packed.targets, bias=bias, temperature=cfg.temperature, backend=cfg.backend,
                       chunk_size=chunk_size).logp
