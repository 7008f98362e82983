"""The generic on-policy loop: one loop for every registered objective.

One step is one rollout batch (docs/design.md, Contract 3)::

    rollout   prompts of the step -> rollout engine -> completions + behaviour log-probs
    score     task.score -> rewards (+ feedback, + overlong shaping); with dynamic sampling, rounds of
              rollout + score until enough groups have varied rewards (trainers/scoring.py)
    signals   what the objective declared, and only those (trainers/signals.py): old_logp (a no-grad
              forward of the pre-update policy when a step makes several updates), advantages,
              teacher contexts
    updates   epochs x mini-batches optimiser updates; each: per micro-batch, reference / teacher
              forwards (no grad), then the policy forward to final hidden states [N, H] ->
              kernels.fused_loss(...) -> backward (normalisers: the update's mini-batch); clip, optimizer.step()
    finish    once per rollout batch: LR schedule, teacher EMA, engine weights
    metrics   one row of metrics.jsonl, summed over processes

The run directory (config.yaml, metrics.jsonl, resume) is :class:`~denser.trainers.run_dir.RunDir`;
checkpoints are :mod:`denser.trainers.checkpoint`; the policy-and-loss module DDP/FSDP wrap
:mod:`~denser.trainers.policy_loss`; the update plan and micro-batches :mod:`~denser.trainers.batches`;
a step's metrics row (and its phase timer) :mod:`~denser.trainers.step_metrics`; the loop's
evaluation :mod:`~denser.trainers.evaluation`.

This file is the :class:`Trainer` class and little else; at about 600 lines it is over the project's
~450-line mark, kept whole on purpose: its methods are the run's phases in the order they happen
(construct and load, evaluate, step, save, train, stop), and splitting the class across files
would hide that order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from denser.engines.base import EngineSpec, Rollout, SamplingParams, request_seed
from denser.objectives import Objective, Signal
from denser.plugins import plugin_imports
from denser.tasks import Task
from denser.trainers import checkpoint as ckpt
from denser.trainers import lora, sharded_checkpoint
from denser.trainers.batches import MicroBatch
from denser.trainers.config import TEACHER_MODEL_KEY, TrainConfig
from denser.trainers.evaluation import eval_line, evaluate_policy, format_eval
from denser.trainers.memory import adamw, trim_heap
from denser.trainers.models import load_model
from denser.trainers.policy_loss import PolicyLoss
from denser.trainers.preemption import Interrupted, StopControl, StopSignals, signal_name
from denser.trainers.prompts import PromptSchedule
from denser.trainers.resolve import ResolvedRun, resolve_run
from denser.trainers.run_dir import RunDir
from denser.trainers.scoring import RolloutBatch, Scores, dynamic_batch, score_rollout
from denser.trainers.sharding import Sharding
from denser.trainers.signals import SignalComputer, check_signals, check_teacher_vocabulary
from denser.trainers.step_metrics import PhaseTimer, UpdateResult, metrics_row
from denser.trainers.teacher import build_teacher, check_resumed_teacher, resolve_teacher_path
from denser.trainers.tracking import Tracker


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many consecutive non-finite updates); a checkpoint was written."""


def _accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator. accelerate keeps one state per process and refuses a second Accelerator
    with another mixed precision; in a single process (a notebook, ``denser.train`` called twice, a
    test session) the earlier run's state is dropped instead. Launched processes keep theirs: there
    every process builds the same Accelerator."""
    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)


accelerator_for = _accelerator  # the continual runner's, before its first stage (the same state as its stages')


class Trainer:
    """``Trainer(run).train()`` runs ``run.config.steps`` on-policy steps and returns the final metrics.

    ``run`` is a :class:`~denser.trainers.resolve.ResolvedRun` (from :func:`~denser.trainers.resolve.resolve_run`);
    ``Trainer(cfg, objective, task=task)`` is short for ``Trainer(resolve_run(cfg, objective, task))``
    (``objective`` default ``cfg.objective``, ``task`` default ``cfg.task``). ``log`` prints messages
    (the main process only). After construction: ``policy`` (the unwrapped model being trained),
    ``optimizer``, ``scheduler``, ``reference`` and ``teacher`` (``TeacherWeights``, or None when
    the objective declares no such signal), ``world`` (number of processes).

    What a run starts from besides ``cfg.model`` (the continual runner chains runs with these):

    - ``anchor``: the model the frozen reference (``ref_logp``) and a ``frozen`` teacher are: shared,
      not copied, and never trained (default: a fresh load of ``cfg.model``); under FSDP it is sharded
      in place by the first run that uses it, and later runs share its shards (``Sharding.root_of``);
    - ``optimizer_state``, ``teacher_state``: an AdamW state and EMA teacher weights to start from,
      as :meth:`carry_state` returns them (the learning rates stay this run's schedule; a
      non-EMA teacher ignores ``teacher_state``). A run resumed from its own checkpoint
      restores that checkpoint instead;
    - ``evaluator``: ``evaluator(trainer) -> accuracy`` (or a dict of :meth:`evaluate_all`'s metrics)
      replaces :meth:`evaluate_all` (before, during and after training);
    - ``teacher_from_policy``: a ``frozen`` teacher and the ``trust-region`` reference start from the
      policy this run starts from, not from ``anchor`` (``denser continual --teacher-reset``);
    - ``tracker``: where metrics rows and sample completions go besides metrics.jsonl (default: the
      trackers of ``cfg.report_to``, opened and closed by this run; the continual runner passes one
      tracker for a whole sequence);
    - ``engine``: the rollout engine and its options (:class:`~denser.engines.base.EngineSpec`; default:
      engine ``cfg.engine`` with its default options), written to config.yaml as ``engine_args``;
    - ``lora_chain``: with ``--lora-r``, the earlier continual stages' adapters this run's policy
      starts from (:class:`~denser.trainers.lora.AdapterChain`; a resumed run's own adapter wins).

    Under FSDP (``cfg.fsdp``, or an accelerate FSDP launch: ``sharding`` is then a
    :class:`~denser.trainers.sharding.Sharding`) the policy, the reference and the teacher are
    sharded alike (``policy``'s parameters are this process's shards, DTensors; checkpoints hold
    the whole model); a run equals one process doing the same global batch, up to float summation order.
    """

    def __init__(self, run: ResolvedRun | TrainConfig, objective: Objective | str | None = None, *,
                 task: Task | str | None = None, log: Callable[[str], Any] = print, anchor: nn.Module | None = None,
                 optimizer_state: dict | None = None, teacher_state: dict | None = None,
                 evaluator: Callable[[Trainer], float | dict] | None = None, tracker: Tracker | None = None,
                 teacher_from_policy: bool = False, stop_signals: StopSignals | None = None,
                 engine: EngineSpec | None = None, lora_chain: lora.AdapterChain | None = None):
        if not isinstance(run, ResolvedRun):  # Trainer(cfg, objective, task=...): resolved here, as resolve_run does
            run = resolve_run(run, objective, task, engine=engine)
        elif objective is not None or task is not None or engine is not None:
            raise ValueError("Trainer(run): a ResolvedRun holds its objective, task and engine; pass them to resolve_run")
        self.resolved = run
        self.anchor, self.evaluator, self.teacher_from_policy = anchor, evaluator, teacher_from_policy
        self.lora_chain = lora_chain
        # the objective is the run's (for_run: several updates per rollout batch turn old_logp on)
        self.cfg, self.objective, self.task, self.log = run.config, run.objective, run.task, log
        cfg = run.config
        self.engine_spec = run.engine
        self.accelerator = _accelerator(cfg)
        lora.check_lora_run(cfg, self.accelerator)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        # None: one process, or DDP
        self.sharding = Sharding.for_run(self.accelerator, cfg.fsdp, mixed_precision=cfg.mixed_precision)
        self._check_data()
        self.run_dir = Path(cfg.output_dir or f"runs/{self.objective.name}-{self.task.name}")
        self.run = RunDir(self.run_dir, is_main=self.is_main, log=log, barrier=self.accelerator.wait_for_everyone,
                          world=self.world, broadcast=lambda obj: broadcast_object_list([obj], from_process=0)[0],
                          gather=lambda obj: gather_object([obj]))
        # refuses another run's directory; writes nothing yet
        resume_from = self.run.check(self._run_config(), resume=cfg.resume, overwrite=cfg.overwrite, steps=cfg.steps)
        if resume_from is not None:  # on another number of processes: the global batch of the checkpoint's run
            self.cfg = cfg = self._keep_global_batch(resume_from, cfg)
        set_seed(cfg.seed + self.rank)  # before loading: a resumed run's RNG streams are restored last, below

        check_signals(self.objective, self.task)
        self.teacher_spec = run.teacher
        if self.teacher_spec is not None and self.teacher_spec.teacher_path:
            resolve_teacher_path(self.teacher_spec.teacher_path)  # a bad --teacher-path fails before any model is loaded
        policy = self._load_models(resume_from)
        if self.teacher is not None:
            check_teacher_vocabulary(self.objective, policy, self.teacher.model)
            if resume_from is not None:  # the teacher model the run started with (its weights' hash)
                check_resumed_teacher(self.run.recorded(TEACHER_MODEL_KEY), self.teacher.source)
        policy.train()
        if cfg.gradient_checkpointing:  # the reentrant variant would need inputs that require grad
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.loss_module, self.reference_root = PolicyLoss(policy), None
        if self.sharding is not None:  # before the optimizer, which holds the sharded parameters
            self.reference_root, line = self.sharding.shard_run(self.loss_module, self.reference, self.teacher)
            self._note(line)
        decay = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = adamw(decay, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                               fused=self.sharding is None)  # FSDP's DTensor parameters: the default kernel
        # transformers' "constant" ignores the warmup; "constant_with_warmup" is constant when it is 0
        schedule = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
        self.scheduler = get_scheduler(schedule, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.steps)
        device = self.accelerator.device
        if self.sharding is None:
            self.loss_module, self.optimizer = self.accelerator.prepare(self.loss_module, self.optimizer)
            if self.reference is not None:
                self.reference.to(device)
            if self.teacher is not None:
                self.teacher.to(device)
        self.policy = self.accelerator.unwrap_model(self.loss_module).model
        self.engine = self.engine_spec.build(self.policy, self.tokenizer)
        self.signals = SignalComputer(self.objective, self.task, self.tokenizer, cfg, device=device, rank=self.rank,
                                      reduce=lambda t: self.accelerator.reduce(t, reduction="sum"),
                                      reference=self.reference, teacher=self.teacher, teacher_spec=self.teacher_spec,
                                      policy=self.policy, reference_root=self.reference_root,
                                      policy_root=self.loss_module if self.sharding is not None else None)
        self.batches = self.signals.batches  # the update plan and micro-batches (trainers/batches.py)
        self.prompts = PromptSchedule(self.task, self.tokenizer, seed=cfg.seed, prompts_per_step=cfg.prompts_per_step,
                                      rank=self.rank, world=self.world, max_new_tokens=cfg.max_new_tokens,
                                      context_limit=getattr(self.policy.config, "max_position_embeddings", None),
                                      rounds=cfg.max_generation_rounds if cfg.dynamic_sampling else 1)
        self.prompts.check_lengths(cfg.steps, cfg.eval_size)
        self.run.init(self._run_config(), fresh=resume_from is None, overwrite=cfg.overwrite)
        self.start_step, self.skipped_total, self.consecutive_skips = 0, 0, 0
        self.finished = False
        if resume_from is not None:
            self._load_state(resume_from)
        else:
            self._start_from(optimizer_state, teacher_state)
        self.tracker = tracker if tracker is not None else Tracker.for_run(cfg, self.run_dir, self._run_config())
        self._owns_tracker = tracker is None
        # preemption (issue 16): who stops and when to save, agreed by all processes
        if stop_signals is not None:
            stop_signals.announce = stop_signals.announce and self.is_main
        self.stop = StopControl(stop_signals, save_every_minutes=cfg.save_every_minutes, world=self.world,
                                device=self.accelerator.device)
        self.steps_done = self.start_step  # the last finished step
        self.saved_step = self.start_step if resume_from is not None else None  # the step of the newest checkpoint
        self._rng_boundary: tuple[int, dict] | None = None  # (step, RNG streams at the start of that step)

    # ------------------------------------------------------------------------------------ setup

    def _note(self, message: str) -> None:
        """A message every process would print alike: printed once, by the main process."""
        if self.is_main:
            self.log(message)

    def _run_config(self) -> dict[str, Any]:
        imports = plugin_imports(self.objective, self.task)  # what --config needs to find them again
        return {**({"import": imports} if imports else {}), **dataclasses.asdict(self.cfg),
                "objective": self.objective.name,
                "task": self.cfg.task or self.task.name,  # with its inline options (file:x.csv?rewards=...)
                "objective_args": dataclasses.asdict(self.objective),
                "engine_args": self.engine_spec.args(),
                # a teacher model from --teacher-path: its path and weights hash (resume checks them)
                **({TEACHER_MODEL_KEY: source} if (source := self._teacher_source()) else {})}

    def _teacher_source(self) -> dict[str, str] | None:
        teacher = getattr(self, "teacher", None)  # None until the models are loaded
        return teacher.source if teacher is not None else None

    def _check_data(self) -> None:
        name = self.task.name
        if len(self.task.train) == 0:
            raise ValueError(f"task {name!r} has no training rows; nothing to train on")
        if len(self.task.eval) == 0:
            self._note(f"warning: task {name!r} has no eval rows; eval accuracy will read 0")

    def _keep_global_batch(self, path: Path, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with the prompts per process that keep the global batch of the run that wrote
        ``path`` (its processes x its ``--prompts-per-step``), so the prompt schedule and the request
        seeds continue as that run's would (trainers/prompts.py); refused, before any compute, when
        this number of processes does not divide it."""
        saved = ckpt.saved_batch(path)
        if saved is None or saved[0] == self.world:
            return cfg
        world, per = saved
        total = world * per
        if total % self.world:
            raise ValueError(f"--resume: {path} was written by {world} process(es) with --prompts-per-step {per} "
                             f"({total} prompts per step); {self.world} processes cannot split them evenly: resume "
                             f"with a number of processes that divides {total}")
        if cfg.prompts_per_step != per:
            self._note(f"--resume: --prompts-per-step {cfg.prompts_per_step} ignored: the run continues with its "
                       f"{total} prompts per step")
        self._note(f"--resume: {path} was written by {world} process(es); {self.world} continue it with "
                   f"--prompts-per-step {total // self.world} each ({total} prompts per step, as before)")
        return dataclasses.replace(cfg, prompts_per_step=total // self.world)

    def _load_models(self, resume_from: Path | None) -> nn.Module:
        """The policy (from ``resume_from`` when resuming), and the models the declared signals
        need: ``self.reference`` (REF_LOGP) and ``self.teacher`` (TEACHER, TEACHER_LOGP: the weights
        ``self.teacher_spec`` names, built by :func:`~denser.trainers.teacher.build_teacher`, which
        loads the initial weights only when the teacher uses them; a frozen teacher and the
        trust-region reference share the reference's copy)."""
        cfg = self.cfg
        dtype = getattr(torch, cfg.dtype)
        # FSDP: models stored as safetensors are built empty and each process reads its own rows when they
        # are sharded (trainers/sharded_load.py); loaded whole when a teacher mixes two models before that
        mixes = self.teacher_spec is not None and self.teacher_spec.teacher_init_alpha < 1.0
        empty = self.sharding is not None and not mixes

        def load_initial() -> nn.Module:  # cfg.model as it was before any training (tiny: the same seed)
            with ckpt.quiet_transformers():
                return load_model(cfg.model, dtype=dtype, seed=cfg.seed, empty=empty)[0]

        # ``initial``: the frozen initial weights (the reference; a frozen teacher's), loaded when first
        # asked; ``start``: the weights this run started from (what --teacher-init-alpha mixes in)
        if cfg.lora_r:  # the base model plus an adapter; reference and teachers are views of it (trainers/lora.py)
            policy, self.tokenizer = lora.load_lora_policy(cfg, resume_from, self.lora_chain)
            initial = start = functools.cache(lambda: lora.AdapterView(policy))  # a fresh adapter adds zero
        else:
            # a sharded checkpoint's weights are read in _load_state: its model is built from the config
            from_shards = resume_from is not None and sharded_checkpoint.has_shards(resume_from)
            with ckpt.quiet_transformers():
                policy, self.tokenizer = load_model(str(resume_from / "model") if resume_from else cfg.model,
                                                    dtype=dtype, seed=cfg.seed, weights=not from_shards,
                                                    empty=empty or (from_shards and self.sharding is not None))
            # the anchor a chained run shares, or cfg.model loaded again
            initial = functools.cache(lambda: (self.anchor if self.anchor is not None else load_initial())
                                      .eval().requires_grad_(False))
            if resume_from is None:
                start = policy
            else:  # cfg.model again: the initial model, unless a chained run's anchor is another one
                start = initial if self.anchor is None else functools.cache(load_initial)
        self.reference = initial() if Signal.REF_LOGP in self.objective.signals() else None
        self.teacher = build_teacher(self.teacher_spec, policy, initial=initial, start=start,
                                     start_from_policy=self.teacher_from_policy, lora=bool(cfg.lora_r),
                                     tokenizer=self.tokenizer, empty=empty)
        return policy

    def _load_state(self, path: Path) -> None:
        state, trainer_state, teacher_state = ckpt.load_train_state(path)
        sharded = sharded_checkpoint.has_shards(path)
        if sharded:  # written by FSDP processes: read as this run lays tensors out
            ema = self.teacher.model if self.teacher is not None and self.teacher.keeps_state else None
            sharded_checkpoint.load_shards(sharded_checkpoint.shards_dir(path), model=self.policy,
                                           optimizer=_unwrapped(self.optimizer), teacher=ema)
            self.engine.update_weights(self.policy)  # the engine started before the weights were read
        elif self.sharding is not None:  # a whole state (any number of processes wrote it): keep our shards
            self.sharding.load_optimizer_state(self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None and not sharded:
            if self.teacher.keeps_state and teacher_state is None:
                self._note(f"warning: {path} holds no EMA teacher; the teacher restarts from the resumed policy")
            self.teacher.load_state_dict(teacher_state)
        self.start_step = int(trainer_state["step"])
        self.run.metrics_rows = int(trainer_state["metrics_rows"])
        self.skipped_total = int(trainer_state.get("skipped_total", 0))
        self.consecutive_skips = int(trainer_state.get("consecutive_skips", 0))
        self.finished = bool(trainer_state.get("finished", False)) and self.start_step >= self.cfg.steps
        self.run.truncate_metrics(self.run.metrics_rows)
        # Last, after everything that might draw random numbers: the streams continue where the run left them
        # (on another number of processes, a process the writer did not have starts a stream of its own)
        rng = state["rng"]
        if isinstance(rng, list) and len(rng) != self.world and self.rank >= len(rng):
            set_seed(self.cfg.seed + self.rank + 1_000_003 * self.start_step)
        else:
            ckpt.set_rng_state(rng, self.rank)
        self._note(f"resumed from {path} (step {self.start_step}, the newest complete checkpoint)")

    # ------------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self, stop=None) -> float:
        """Greedy accuracy on the first ``eval_size`` rows of the eval split (all processes), or what
        the ``evaluator`` given to the constructor returns; :meth:`evaluate_all` adds standard errors
        and the sampled accuracy. ``stop``: passed to the engine (only where an abandoned eval loses
        nothing: before step 1)."""
        return float(self.evaluate_all(stop=stop)["eval_accuracy"])

    @torch.no_grad()
    def evaluate_all(self, stop=None) -> dict[str, float | None]:
        """The eval metrics of the current policy on the first ``eval_size`` rows of the eval split:
        ``eval_accuracy`` (one greedy completion per prompt) and its standard error over prompts
        ``eval_accuracy_se``; with ``--eval-samples n`` also ``eval_mean_at_n`` (the mean over prompts
        of the fraction of ``n`` completions sampled at ``--eval-temperature``/``--eval-top-p`` that
        succeed) and ``eval_mean_at_n_se``. Sampling is seeded (``--seed`` and the eval row's index) and
        leaves the training RNG streams alone, so an eval is reproducible and does not change the run.
        With an ``evaluator``, what it returns (a float is the greedy accuracy)."""
        if self.evaluator is not None:
            out = self.evaluator(self)
            return dict(out) if isinstance(out, dict) else {"eval_accuracy": float(out)}
        return evaluate_policy(self.task, self.prompts, self._generate, self.cfg, self.rank, self.world, stop)

    # ------------------------------------------------------------------------------------- step

    def step(self, step: int) -> dict[str, Any]:
        """One rollout batch (0-based ``step``): generate, score, signals, ``epochs x mini_batches``
        optimiser updates, then the once-per-rollout-batch schedule; its metrics row."""
        # the RNG streams at this step's boundary: a stop inside the step saves these, not the advanced ones
        self._rng_boundary = (step, ckpt.rng_state())
        timer = PhaseTimer()
        batch = self._rollout_batch(step, timer)
        with timer("signals"):
            self.tracker.log_samples(step + 1, self.task, [batch.rows[s // batch.rollout.num_generations]
                                                           for s in range(batch.rollout.num_samples)],
                                     batch.rollout.texts, batch.scores.scores)
            rollout = self.signals.pre_update_logp(batch.rollout)
            sample = self.signals.per_sample(rollout, batch.rows, batch.scores)
        updates = []
        for u, indices in enumerate(self.batches.update_plan(rollout.num_samples, step)):
            with timer("signals"):
                micro_batches = self.batches.micro_batches(rollout, sample, indices, step, u)
            # a stop may abandon the rollout batch only before its first applied optimiser update
            stoppable = not any(up.applied for up in updates)
            updates.append(self._update(rollout, micro_batches, timer, step=step, stoppable=stoppable))
        if updates and self.signals.correction_metrics:  # the rollout correction's, once per step
            updates[0].metrics.append(self.signals.correction_metrics)
        self._finish_step(updates, timer)
        return metrics_row(step, batch, updates, timer, cfg=self.cfg, world=self.world,
                           lr=self.scheduler.get_last_lr()[0], reduce=self._sum_over_processes)

    def _rollout_batch(self, step: int, timer: PhaseTimer) -> RolloutBatch:
        """Generate and score the step's prompts; with dynamic sampling, further rounds (at most
        ``max_generation_rounds``) until ``prompts_per_step`` groups have varied rewards."""

        def generate_round(j: int) -> tuple[Rollout, list[dict], Scores]:
            with timer("generate"):
                rows = self.prompts.rows_for_step(step, round=j) if j else self.prompts.rows_for_step(step)
                # each prompt's request seeded by (seed, step, round, global index): never by the process
                rollout = self._rollout(rows, [request_seed(self.cfg.seed, step, j, i)
                                               for i in self.prompts.request_indices()])
            self.stop.check(f"step {step + 1}, after generation")  # a stop during it: the rollout is abandoned
            with timer("signals"):
                return rollout, rows, score_rollout(self.task, rollout, rows, self.cfg)

        if not self.cfg.dynamic_sampling:
            return RolloutBatch(*generate_round(0))
        return dynamic_batch(generate_round, self.cfg.prompts_per_step, self.cfg.max_generation_rounds)

    def _rollout(self, rows: list[dict], seeds: list[int] | None = None) -> Rollout:
        cfg = self.cfg
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_generations=cfg.num_generations,
                                temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, min_p=cfg.min_p,
                                repetition_penalty=cfg.repetition_penalty, stop=tuple(cfg.stop),
                                min_new_tokens=cfg.min_new_tokens)
        self.policy.eval()
        rollout = self._generate(self.prompts.prompt_ids(rows), params, seeds=seeds, stop=self.stop.during_generation)
        self.policy.train()
        trim_heap()  # generation's freed KV caches, before the update's activations
        return rollout

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams, **kw: Any) -> Rollout:
        """The engine's completions; under FSDP inside the policy root's forward, which gathers
        the weights the engine's model (the policy) runs on."""
        if self.sharding is None or self.engine.copies_weights:  # an engine with its own weights gathers nothing
            return self.engine.generate(prompt_ids, params, **kw)
        with torch.no_grad():
            return Sharding.run(self.loss_module, lambda _policy: self.engine.generate(prompt_ids, params, **kw))

    def _update(self, rollout: Rollout, batches: list[MicroBatch], timer: PhaseTimer, *, step: int = 0,
                stoppable: bool = False) -> UpdateResult:
        """One optimiser update: accumulate the gradients of the update's micro-batches, then one
        ``optimizer.step()`` (skipped when the loss or the gradient norm is not finite).

        ``stoppable``: no update of this rollout batch was applied yet, so a stop request may abandon
        the batch after a micro-batch (every process passes the same value: ``applied`` is agreed)."""
        cfg, parts, loss_total = self.cfg, [], 0.0
        for i, mb in enumerate(batches):
            with timer("signals"):
                teacher = self.signals.model_signals(rollout, mb)
            with timer("update"):
                # under FSDP the module is not accelerate's: its mixed precision applies here
                with self.accelerator.autocast() if self.sharding is not None else contextlib.nullcontext():
                    loss, metrics = self.loss_module(mb.packed, self.objective, mb.batch, teacher, cfg.temperature,
                                                     cfg.backend, cfg.chunk_size or None)
                # DDP and FSDP average gradients over processes; our normalisers are global sums
                self.accelerator.backward(loss * self.world)
                loss_total += float(loss.detach())
                parts.append(metrics)
            if stoppable:
                self.stop.check(f"step {step + 1}, after micro-batch {i + 1}/{len(batches)}")
        with timer("update"):
            grad_norm = self._clip_gradients()
            loss_sum = float(self._sum_over_processes(torch.tensor([loss_total]))[0])
            applied = math.isfinite(loss_sum) and math.isfinite(grad_norm)
            if applied:
                self.optimizer.step()
                if self.teacher is not None:  # what the teacher derived from the policy's weights is stale
                    self.teacher.policy_updated()
            self.optimizer.zero_grad(set_to_none=True)
            trim_heap()  # the update's freed activations and gradients back to the system (glibc keeps them)
        return UpdateResult(loss_sum, grad_norm, applied, parts)

    def _finish_step(self, updates: list[UpdateResult], timer: PhaseTimer) -> None:
        """Once per rollout batch, when an update was applied: the LR schedule (so warmup counts rollout
        batches), the EMA teacher (as SDPO's actor), the rollout engine's weights."""
        if not any(u.applied for u in updates):
            return
        with timer("update"):
            self.scheduler.step()
            if self.teacher is not None:
                self.teacher.update(self.policy)
            if not self.engine.copies_weights:
                self.engine.update_weights(self.policy)
        if self.engine.copies_weights:  # an inference engine's copy of the weights: time_sync_s
            with timer("sync"):
                self.engine.update_weights(self.policy)

    def _clip_gradients(self) -> float:
        """The global gradient norm (before clipping), clipped to --max-grad-norm when it is > 0."""
        if self.sharding is not None:
            return self.sharding.grad_norm(list(self.policy.parameters()), self.cfg.max_grad_norm)
        if self.cfg.max_grad_norm > 0:
            return float(self.accelerator.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm))
        sq = sum(float(p.grad.float().pow(2).sum()) for p in self.policy.parameters() if p.grad is not None)
        return math.sqrt(sq)

    def _sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum")

    # ------------------------------------------------------------------------------------- run

    def _trainer_state(self, step: int, finished: bool) -> dict[str, Any]:
        return {"step": step, "metrics_rows": self.run.metrics_rows, "skipped_total": self.skipped_total,
                "consecutive_skips": self.consecutive_skips, "finished": finished,
                # the global batch, for a resume on another number of processes (_keep_global_batch)
                "processes": self.world, "prompts_per_step": self.cfg.prompts_per_step}

    def save(self, step: int, *, finished: bool = False) -> Path | None:
        """Checkpoint ``step`` (every process takes part: the RNG streams of all of them are stored).

        A failed write (a full disk) leaves the previous checkpoints as they were and raises
        :class:`~denser.trainers.checkpoint.CheckpointError` on every process."""
        at_boundary = self._rng_boundary is not None and self._rng_boundary[0] == step
        rng = gather_object([self._rng_boundary[1] if at_boundary else ckpt.rng_state()])  # one per process, rank order
        path, error, tmp, model_state, optimizer_state, teacher_state = None, None, None, None, None, None
        sharded = self.sharding is not None and self.run.shared()
        if sharded:  # FSDP: each process writes its shards into one temporary directory
            tmp = broadcast_object_list([str(ckpt.new_tmp(self.run_dir, step)) if self.is_main else None],
                                        from_process=0)[0]
            ema = self.teacher.model if self.teacher is not None and self.teacher.keeps_state else None
            try:
                sharded_checkpoint.save_shards(sharded_checkpoint.shards_dir(tmp), model=self.policy,
                                               optimizer=self.optimizer, teacher=ema)
            except Exception as e:  # noqa: BLE001 - DCP reports a failed write of any process as its own error type
                error = e
            if finished and error is None:  # the final checkpoint exports the weights for from_pretrained
                model_state = self.sharding.full_state(self.policy.state_dict(), keep=self.is_main)
        else:
            if self.sharding is not None:  # each machine its own disk: whole tensors, gathered
                model_state, optimizer_state = self.sharding.checkpoint_states(self.policy, self.optimizer,
                                                                               keep=self.is_main)
            teacher_state = self.teacher.state_dict() if self.teacher else None
        if self.is_main:
            try:
                if error is not None:
                    raise error if isinstance(error, OSError) else OSError(str(error).splitlines()[0])
                self.run.sync_metrics()  # the rows this checkpoint counts are on disk
                path = ckpt.save_checkpoint(
                    self.run_dir, step, model=self.policy, tokenizer=self.tokenizer, optimizer=self.optimizer,
                    scheduler=self.scheduler, trainer_state=self._trainer_state(step, finished),
                    teacher_state=teacher_state, keep_last=self.cfg.keep_last, rng=rng, model_state=model_state,
                    optimizer_state=optimizer_state,
                    merged=lora.merged_model(self.policy) if finished and self.cfg.merge_lora else None,
                    tmp=Path(tmp) if tmp is not None else None, sharded=sharded)
            except OSError as e:
                error = e
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        failed = self._sum_over_processes(torch.tensor([float(error is not None)]))
        if float(failed[0]) > 0:
            previous = ckpt.latest_checkpoint(self.run_dir)
            reason = f" ({error.strerror or error})" if isinstance(error, OSError) else ""
            keep = (f"the newest complete checkpoint, {previous}, is intact: fix the cause and rerun with --resume"
                    if previous else "there is no earlier checkpoint")
            raise ckpt.CheckpointError(f"could not write checkpoint {ckpt.checkpoint_dir(self.run_dir, step)}{reason}; "
                                       f"the run stopped at step {step}; {keep}")
        self.accelerator.wait_for_everyone()
        self.saved_step = step
        self.stop.saved()
        return path

    def train(self) -> dict[str, Any]:
        """Run the remaining steps (with evaluations before and after, and checkpoints); a summary.

        A stop request (SIGTERM, Ctrl-C through ``stop_signals``) abandons the step in progress, saves
        the last finished step and raises :class:`~denser.trainers.preemption.Interrupted`."""
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "is_main": self.is_main}
        try:
            return self._train(summary)
        except Interrupted as stop:  # abandon the step in progress; keep every finished one
            if self._owns_tracker:
                self.tracker.finish()
            raise self._stopped(stop) from None

    def _train(self, summary: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        self.stop.check("the start of the run")
        if self.finished:
            path = ckpt.latest_checkpoint(self.run_dir)
            self._note(f"--resume: the run in {self.run_dir} is already complete ({cfg.steps} steps); nothing to do")
            summary.update(already_complete=True, checkpoint=str(path) if path else None)
            return summary
        if self.start_step == 0:
            metrics = self.evaluate_all(stop=self.stop.during_generation)
            self.stop.check("the evaluation before training")  # a stop during it: nothing was done, nothing saved
            summary.update(eval_accuracy_before=metrics["eval_accuracy"], eval_before=metrics)
            self._note(f"eval accuracy before training: {eval_line(self.task, self.cfg, metrics)}")
            self._log_row({"step": 0, **metrics})
        bar = None
        if cfg.progress and self.is_main:
            bar = tqdm(total=cfg.steps, initial=self.start_step, desc=f"{self.objective.name} on {self.task.name}",
                       unit="step", file=sys.stderr, dynamic_ncols=True)
        last = None
        try:
            for step in range(self.start_step, cfg.steps):
                if self.stop.boundary(f"the start of step {step + 1}") and step > 0 and self.saved_step != step:
                    self.save(step)  # --save-every-minutes
                row = self.step(step)
                done = step + 1
                self._count_skips(row, done)
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    row.update(self.evaluate_all())
                self._log_row(row)
                self.steps_done = done
                last = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{row['reward_mean']:.2f}", loss=f"{row['loss']:.3g}",
                                    **({"acc": f"{row['eval_accuracy']:.2f}"} if "eval_accuracy" in row else {}))
                if self.consecutive_skips >= cfg.max_consecutive_skips:
                    self._stop(done)
                if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                    self.save(done)
        finally:
            if bar is not None:
                bar.close()
        self.stop.check("the final evaluation")
        metrics = self.evaluate_all()
        self._log_row({"step": cfg.steps, **metrics})
        path = self.save(cfg.steps, finished=True)
        summary.update(eval_accuracy_after=metrics["eval_accuracy"], eval_after=metrics, last_step=last,
                       checkpoint=str(path) if path else None)
        self._note(f"eval accuracy after {cfg.steps} steps: {format_eval(metrics, cfg.eval_samples)}")
        if path:
            self._note(f"final checkpoint: {path} ({_loading_hint(path, cfg)})")
        if self._owns_tracker:
            self.tracker.finish()
        return summary

    def _stopped(self, stop: Interrupted) -> Interrupted:
        """After a stop request: a checkpoint of the last finished step (unless one exists) and the
        one line that says where it is and how to resume. Every process takes part (the save)."""
        self.optimizer.zero_grad(set_to_none=True)  # the abandoned step's gradients
        done = self.steps_done
        t_stop = time.monotonic()
        received = getattr(self.stop.signals, "received_at", None)  # None on a process the signal did not reach
        timing = f"; {t_stop - received:.1f} s from the signal to here" if received is not None else ""
        if done > 0 and self.saved_step != done:
            self.save(done)
            timing += f", {time.monotonic() - t_stop:.1f} s to save"
        path = ckpt.checkpoint_dir(self.run_dir, done) if self.saved_step == done else None
        stop.step, stop.checkpoint, stop.is_main = done, path, self.is_main
        stop.head = head = f"stopped by {signal_name(stop.signum)} at {stop.where}" + (f" ({timing[2:]})" if timing else "")
        if path is None:
            stop.message = f"{head}: no step had finished, nothing to save; rerun the same command to start over"
        else:
            flags = " --no-overwrite" if self.cfg.overwrite else ""
            stop.message = (f"{head}; step {done} of {self.cfg.steps} is saved in {path}; continue with: denser train "
                            f"--config {self.run_dir / 'config.yaml'} --resume{flags}")
        return stop

    def _log_row(self, row: dict[str, Any]) -> None:
        """One row of metrics.jsonl, also sent to the trackers (main process)."""
        self.run.append_metrics(row)
        if self.is_main:
            self.tracker.log(row)

    def _count_skips(self, row: dict[str, Any], done: int) -> None:
        """``consecutive_skips`` counts consecutive steps with a skipped update; ``skipped_total`` updates."""
        self.consecutive_skips = self.consecutive_skips + 1 if row["skipped"] else 0
        self.skipped_total += row["skipped"]
        row["skipped_total"] = self.skipped_total
        if row["skipped"]:
            n = row["skipped"] + row["updates"]
            what = "update skipped, weights unchanged" if n == 1 else f"{row['skipped']} of {n} updates skipped"
            self._note(f"warning: step {done}: non-finite loss ({row['loss']}) or gradient norm "
                       f"({row['grad_norm']}); {what} "
                       f"({self.consecutive_skips} in a row, {self.skipped_total} in all)")

    def _stop(self, done: int) -> None:
        """Too many consecutive skipped updates: checkpoint the last good weights and stop."""
        path = self.save(done)
        good = done - self.consecutive_skips
        raise TrainingStopped(
            f"stopped at step {done}: {self.consecutive_skips} consecutive updates had a non-finite loss "
            f"or gradient norm (--max-consecutive-skips {self.cfg.max_consecutive_skips}); the weights of the "
            f"last good update (step {good}) are saved in {path or ckpt.checkpoint_dir(self.run_dir, done)}; "
            "try a lower --lr or check the objective and rewards")

    # ------------------------------------------------------------------- carried between runs

    def carry_state(self) -> dict[str, Any]:
        """What a following run can start from: ``Trainer(cfg2, objective, **trainer.carry_state())``
        continues the AdamW state and the EMA teacher (``teacher_state`` is None without one).

        Under FSDP this process's shards (DTensors, nothing gathered): the following run must be
        sharded alike (the same processes, model and wrap policy), as a continual run's next stage is."""
        if self.sharding is not None:
            teacher = ({k: v.detach() for k, v in self.teacher.model.state_dict().items()}
                       if self.teacher is not None and self.teacher.keeps_state else None)
            return {"optimizer_state": self.optimizer.state_dict(), "teacher_state": teacher}
        return {"optimizer_state": self.optimizer.state_dict(),
                "teacher_state": self.teacher.state_dict() if self.teacher is not None else None}

    def _start_from(self, optimizer_state: dict | sharded_checkpoint.ShardedState | None,
                    teacher_state: dict | sharded_checkpoint.ShardedState | None) -> None:
        if isinstance(optimizer_state, sharded_checkpoint.ShardedState) or isinstance(
                teacher_state, sharded_checkpoint.ShardedState):  # a sharded checkpoint's (a resumed continual run)
            shards = (optimizer_state or teacher_state).path
            ema = self.teacher.model if teacher_state is not None and self.teacher is not None and \
                self.teacher.keeps_state else None
            with _keeps_schedule(self.optimizer):
                sharded_checkpoint.load_shards(sharded_checkpoint.shards_dir(shards), model=self.policy,
                                               weights=False, teacher=ema,
                                               optimizer=_unwrapped(self.optimizer) if optimizer_state else None)
            return
        if optimizer_state is not None:
            with _keeps_schedule(self.optimizer):
                if self.sharding is not None:  # whole tensors (a checkpoint's) or shards laid out alike (carry_state)
                    self.sharding.load_optimizer_state(self.optimizer, optimizer_state)
                else:
                    self.optimizer.load_state_dict(optimizer_state)
        if teacher_state is not None and self.teacher is not None:
            self.teacher.load_state_dict(teacher_state)  # an EMA teacher's weights; other teachers ignore it


@contextlib.contextmanager
def _keeps_schedule(optimizer: torch.optim.Optimizer):
    """Load another run's optimizer state inside: its moments are kept, this run's learning rates restored."""
    lrs = [(g["lr"], g.get("initial_lr")) for g in optimizer.param_groups]
    yield
    for g, (lr, initial_lr) in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
        if initial_lr is not None:
            g["initial_lr"] = initial_lr


def _unwrapped(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrapper (DCP keys its state by the model's parameter names)."""
    return getattr(optimizer, "optimizer", optimizer)


def _loading_hint(path: Path, cfg: TrainConfig) -> str:
    if not cfg.lora_r:
        return f"AutoModelForCausalLM.from_pretrained('{path / 'model'}')"
    hint = f"a LoRA adapter: PeftModel.from_pretrained(base, '{path / 'model'}')"
    if cfg.merge_lora:
        return f"{hint}; merged: AutoModelForCausalLM.from_pretrained('{path / lora.MERGED_DIR}')"
    return f"{hint}, or merge it with: denser merge-lora {path}"

