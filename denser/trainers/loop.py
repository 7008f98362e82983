"""The generic on-policy loop: one loop for every registered objective.

One step is one rollout batch (DESIGN.md, Contract 3)::

    rollout   prompts of the step -> rollout engine -> completions + behaviour log-probs
    score     task.score -> rewards (+ feedback, + overlong shaping); with dynamic sampling, rounds of
              rollout + score until enough groups have varied rewards (trainers/sampling.py)
    signals   what the objective declared, and only those (trainers/signals.py): old_logp (a no-grad
              forward of the pre-update policy when a step makes several updates), advantages,
              teacher contexts
    updates   epochs x mini-batches optimiser updates; each: per micro-batch, reference / teacher
              forwards (no grad), then the policy forward to final hidden states [N, H] ->
              kernels.fused_loss(...) -> backward (normalisers: the update's mini-batch); clip, step
    finish    once per rollout batch: LR schedule, teacher EMA, engine weights
    metrics   one row of metrics.jsonl, summed over processes

The run directory (config.yaml, metrics.jsonl, resume) is :class:`~denser.trainers.run_dir.RunDir`;
checkpoints are :mod:`denser.trainers.checkpoint`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from denser.kernels import Metric, fused_loss, merge_metrics, token_stats
from denser.objectives import TEACHER_SIGNALS, Objective, PolicyBatch, Signal, get_objective
from denser.plugins import plugin_imports
from denser.tasks import DEFAULT_TASK, Task, get_task
from denser.tasks.rewards import per_reward_sums
from denser.trainers import checkpoint as ckpt
from denser.trainers.config import TrainConfig, resolve_run_settings
from denser.trainers.estimators import mean_stderr
from denser.trainers.memory import adamw, trim_heap
from denser.trainers.models import load_model
from denser.trainers.packing import PackedBatch, completion_hidden_states, lm_head_params
from denser.trainers.preemption import Interrupted, StopControl, StopSignals, signal_name
from denser.trainers.prompts import PromptSchedule
from denser.trainers.rollout import Rollout, SamplingParams, get_rollout_engine
from denser.trainers.run_dir import RunDir
from denser.trainers.sampling import RolloutBatch, Scores, dynamic_batch
from denser.trainers.signals import (
    MicroBatch,
    SignalComputer,
    TeacherInputs,
    check_signals,
    check_teacher_vocabulary,
)
from denser.trainers.teacher import TeacherWeights, resolve_teacher_path
from denser.trainers.tracking import Tracker


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many consecutive non-finite updates); a checkpoint was written."""


class PolicyLoss(nn.Module):
    """The policy and its loss in one forward, so that wrappers (DDP, FSDP) see the lm_head weight
    whole where the loss core runs, and gradient sync hooks fire as usual."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, packed: PackedBatch, objective: Objective, batch: PolicyBatch, teacher: TeacherInputs | None,
                temperature: float, backend: str, chunk_size: int | None):
        hidden = completion_hidden_states(self.model, packed)
        weight, bias = lm_head_params(self.model)
        out = fused_loss(hidden, weight, packed.targets, objective, batch, bias=bias,
                         teacher_hidden=teacher.hidden if teacher else None,
                         teacher_weight=teacher.weight if teacher else None,
                         teacher_bias=teacher.bias if teacher else None,
                         temperature=temperature, backend=backend, chunk_size=chunk_size)
        if teacher is not None and teacher.entropy is not None:
            return out.loss, {**out.metrics, **_entropy_metrics(hidden, weight, bias, packed, batch, teacher.entropy,
                                                                temperature, backend, chunk_size)}
        return out.loss, out.metrics


@torch.no_grad()
def _entropy_metrics(hidden, weight, bias, packed: PackedBatch, batch: PolicyBatch, teacher_entropy: torch.Tensor,
                     temperature: float, backend: str, chunk_size: int | None) -> dict[str, Metric]:
    """``teacher_entropy`` and ``student_entropy`` (--log-teacher-entropy): mean entropies over the tokens
    of samples with a teacher context, the student's from the update's own hidden states (a chunked
    no-grad pass of the output layer)."""
    student = token_stats(hidden.detach(), weight.detach(), packed.targets,
                          bias=None if bias is None else bias.detach(), temperature=temperature, need_entropy=True,
                          backend=backend, chunk_size=chunk_size).entropy
    mask = batch.token_mask
    if batch.teacher_mask is not None:
        mask = mask & batch.teacher_mask.to(mask.device, torch.bool)[batch.seq_ids]
    return {"teacher_entropy": Metric.of(teacher_entropy, mask), "student_entropy": Metric.of(student, mask)}


class PhaseTimer:
    """Wall time per named phase of a step, summed over the phase's entries: ``with timer("update"): ...``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class UpdateResult:
    """What one optimiser update reports."""

    loss: float  # summed over micro-batches and processes
    grad_norm: float
    applied: bool  # False: a non-finite loss or gradient norm; the update was skipped
    metrics: list[dict[str, Metric]]  # per micro-batch, from the objective


def _accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator. accelerate keeps one state per process and refuses a second Accelerator
    with another mixed precision; in a single process (a notebook, ``denser.train`` called twice, a
    test session) the earlier run's state is dropped instead. Launched processes keep theirs: there
    every process builds the same Accelerator."""
    if PartialState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(cpu=cfg.cpu or not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)


class Trainer:
    """``Trainer(cfg, objective).train()`` runs ``cfg.steps`` on-policy steps and returns the final metrics.

    ``task`` defaults to ``cfg.task`` (a registered name or ``file:PATH``); ``log`` prints messages
    (the main process only). After construction: ``policy`` (the unwrapped model being trained),
    ``optimizer``, ``scheduler``, ``reference`` and ``teacher`` (``TeacherWeights``, or None when
    the objective declares no such signal), ``world`` (number of processes).

    What a run starts from besides ``cfg.model`` (the continual runner chains runs with these):

    - ``anchor``: the model the frozen reference (``ref_logp``) and a ``frozen`` teacher are: shared,
      not copied, and never trained (default: a fresh load of ``cfg.model``);
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
      tracker for a whole sequence).
    """

    def __init__(self, cfg: TrainConfig, objective: Objective | None = None, *, task: Task | None = None,
                 log: Callable[[str], Any] = print, anchor: nn.Module | None = None,
                 optimizer_state: dict | None = None, teacher_state: dict | None = None,
                 evaluator: Callable[[Trainer], float | dict] | None = None, tracker: Tracker | None = None,
                 teacher_from_policy: bool = False, stop_signals: StopSignals | None = None):
        self.anchor, self.evaluator, self.teacher_from_policy = anchor, evaluator, teacher_from_policy
        self.cfg, self.log = cfg, log
        # configured for this run's updates per rollout batch (several: old_logp on, so ratios can move)
        self.objective = (objective if objective is not None else get_objective(cfg.objective)).for_run(
            cfg.updates_per_step)
        self.accelerator = _accelerator(cfg)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.task = task if task is not None else _task_of(cfg)
        self.cfg = cfg = resolve_run_settings(cfg, self.task)  # max_new_tokens, eval_size: 0 = from the task
        self._check_data()
        self.run_dir = Path(cfg.output_dir or f"runs/{self.objective.name}-{self.task.name}")
        self.run = RunDir(self.run_dir, is_main=self.is_main, log=log, barrier=self.accelerator.wait_for_everyone)
        # refuses another run's directory; writes nothing yet
        resume_from = self.run.check(self._run_config(), resume=cfg.resume, overwrite=cfg.overwrite, steps=cfg.steps)
        set_seed(cfg.seed + self.rank)  # before loading: a resumed run's RNG streams are restored last, below

        check_signals(self.objective, self.task)
        declared = self.objective.signals()
        self.teacher_spec = self.objective.teacher_spec() if declared & TEACHER_SIGNALS else None
        if self.teacher_spec is not None and self.teacher_spec.path:
            resolve_teacher_path(self.teacher_spec.path)  # a bad --teacher-path fails before any model is loaded
        policy = self._load_models(resume_from)
        if self.teacher is not None:
            check_teacher_vocabulary(self.objective, policy, self.teacher.model)
        policy.train()
        if cfg.gradient_checkpointing:  # the reentrant variant would need inputs that require grad
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        decay = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = adamw(decay, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        # transformers' "constant" ignores the warmup; "constant_with_warmup" is constant when it is 0
        schedule = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
        self.scheduler = get_scheduler(schedule, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.steps)
        self.loss_module, self.optimizer = self.accelerator.prepare(PolicyLoss(policy), self.optimizer)
        self.policy = self.accelerator.unwrap_model(self.loss_module).model
        device = self.accelerator.device
        for m in (self.reference, self.teacher.model if self.teacher and self.teacher.mode != "live" else None):
            if m is not None:
                m.to(device)
        self.engine = get_rollout_engine(cfg.engine, self.policy, self.tokenizer)
        self.signals = SignalComputer(self.objective, self.task, self.tokenizer, cfg, device=device, rank=self.rank,
                                      reduce=lambda t: self.accelerator.reduce(t, reduction="sum"),
                                      reference=self.reference, teacher=self.teacher, teacher_spec=self.teacher_spec,
                                      policy=self.policy)
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
                "objective_args": dataclasses.asdict(self.objective)}

    def _check_data(self) -> None:
        name = self.task.name
        if len(self.task.train) == 0:
            raise ValueError(f"task {name!r} has no training rows; nothing to train on")
        if len(self.task.eval) == 0:
            self._note(f"warning: task {name!r} has no eval rows; eval accuracy will read 0")

    def _load_models(self, resume_from: Path | None) -> nn.Module:
        """The policy (from ``resume_from`` when resuming), and the models the declared signals
        need: ``self.reference`` (REF_LOGP) and ``self.teacher`` (TEACHER, TEACHER_LOGP, with the
        weights ``self.teacher_spec`` names). A frozen teacher and the trust-region reference share
        the reference's copy of the initial weights."""
        cfg, declared, spec = self.cfg, self.objective.signals(), self.teacher_spec
        dtype = getattr(torch, cfg.dtype)
        with ckpt.quiet_transformers():
            policy, self.tokenizer = load_model(str(resume_from / "model") if resume_from else cfg.model,
                                                dtype=dtype, seed=cfg.seed)
        initial = None
        # the initial weights: the reference; a frozen teacher or trust-region reference unless it starts
        # elsewhere; and, on resume, the weights this run started from (what --teacher-init-alpha mixes in)
        initial_teacher = spec is not None and spec.mode in ("frozen", "trust-region") and (
            resume_from is not None or not (spec.path or self.teacher_from_policy))
        if Signal.REF_LOGP in declared or initial_teacher:
            with ckpt.quiet_transformers():
                initial, _ = ((self.anchor, None) if self.anchor is not None
                              else load_model(cfg.model, dtype=dtype, seed=cfg.seed))
            initial = initial.eval().requires_grad_(False)
        self.reference = initial if Signal.REF_LOGP in declared else None
        self.teacher = None
        if spec is not None:
            start = policy if resume_from is None else initial
            shared = None if self.teacher_from_policy else initial
            self.teacher = TeacherWeights.from_spec(spec, policy, shared, start=start)
        return policy

    def _load_state(self, path: Path) -> None:
        state, trainer_state, teacher_state = ckpt.load_train_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None:
            if self.teacher.mode == "ema" and teacher_state is None:
                self._note(f"warning: {path} holds no EMA teacher; the teacher restarts from the resumed policy")
            self.teacher.load_state_dict(teacher_state)
        self.start_step = int(trainer_state["step"])
        self.run.metrics_rows = int(trainer_state["metrics_rows"])
        self.skipped_total = int(trainer_state.get("skipped_total", 0))
        self.consecutive_skips = int(trainer_state.get("consecutive_skips", 0))
        self.finished = bool(trainer_state.get("finished", False)) and self.start_step >= self.cfg.steps
        self.run.truncate_metrics(self.run.metrics_rows)
        # Last, after everything that might draw random numbers: the streams continue where the run left them.
        ckpt.set_rng_state(state["rng"], self.rank)
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
        succeed) and ``eval_mean_at_n_se``. Sampling is seeded (``--seed`` and the process index) and
        leaves the training RNG streams alone, so an eval is reproducible and does not change the run.
        With an ``evaluator``, what it returns (a float is the greedy accuracy)."""
        if self.evaluator is not None:
            out = self.evaluator(self)
            return dict(out) if isinstance(out, dict) else {"eval_accuracy": float(out)}
        cfg, data = self.cfg, self.task.eval
        idx = list(range(min(cfg.eval_size, len(data))))[self.rank::self.world]
        rows = [data[i] for i in idx]
        greedy: list[float] = []
        sampled: list[float] = []
        if rows:
            prompt_ids = self.prompts.prompt_ids(rows)
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_generations=1, do_sample=False)
            greedy = self._successes(self.engine.generate(prompt_ids, params, stop=stop), rows)
            if cfg.eval_samples:
                n = cfg.eval_samples
                params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_generations=n,
                                        temperature=cfg.eval_temperature, top_p=cfg.eval_top_p)
                rollout = self.engine.generate(prompt_ids, params, seed=cfg.seed * 1009 + self.rank, stop=stop)
                ok = self._successes(rollout, [r for r in rows for _ in range(n)])
                sampled = [sum(ok[p * n:(p + 1) * n]) / n for p in range(len(rows))]
        return eval_metrics(gather_object(greedy), gather_object(sampled) if cfg.eval_samples else None)

    def _successes(self, rollout: Rollout, rows: list[dict]) -> list[float]:
        """1.0 / 0.0 per completion: did the task count it as a success."""
        return [float(self.task.is_success(s)) for s in self.task.score_batch(rollout.texts, rows)]

    def _eval_line(self, metrics: dict[str, Any]) -> str:
        """``0.656 ± 0.085 (addition, 32 greedy prompts); mean@4 0.610 ± 0.070 (temperature 0.6, top-p 0.95)``."""
        cfg = self.cfg
        prompts = min(cfg.eval_size, len(self.task.eval))
        greedy = format_eval({"eval_accuracy": metrics["eval_accuracy"],
                              "eval_accuracy_se": metrics.get("eval_accuracy_se")})
        line = f"{greedy} ({self.task.name}, {prompts} greedy prompts)"
        if metrics.get("eval_mean_at_n") is not None:
            line += (f"; {format_eval(metrics, cfg.eval_samples).split('; ', 1)[1]} "
                     f"(temperature {cfg.eval_temperature:g}, top-p {cfg.eval_top_p:g})")
        return line

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
        for u, indices in enumerate(self.signals.update_plan(rollout.num_samples, step)):
            with timer("signals"):
                micro_batches = self.signals.micro_batches(rollout, sample, indices, step, u)
            # a stop may abandon the rollout batch only before its first applied optimiser step
            stoppable = not any(up.applied for up in updates)
            updates.append(self._update(rollout, micro_batches, timer, step=step, stoppable=stoppable))
        self._finish_step(updates, timer)
        return self._metrics_row(step, batch, updates, timer)

    def _rollout_batch(self, step: int, timer: PhaseTimer) -> RolloutBatch:
        """Generate and score the step's prompts; with dynamic sampling, further rounds (at most
        ``max_generation_rounds``) until ``prompts_per_step`` groups have varied rewards."""

        def generate_round(j: int) -> tuple[Rollout, list[dict], Scores]:
            with timer("generate"):
                rows = self.prompts.rows_for_step(step, round=j) if j else self.prompts.rows_for_step(step)
                rollout = self._rollout(rows)
            self.stop.check(f"step {step + 1}, after generation")  # a stop during it: the rollout is abandoned
            with timer("signals"):
                return rollout, rows, self.signals.score(rollout, rows)

        if not self.cfg.dynamic_sampling:
            return RolloutBatch(*generate_round(0))
        return dynamic_batch(generate_round, self.cfg.prompts_per_step, self.cfg.max_generation_rounds)

    def _rollout(self, rows: list[dict]) -> Rollout:
        cfg = self.cfg
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_generations=cfg.num_generations,
                                temperature=cfg.temperature, top_p=cfg.top_p)
        self.policy.eval()
        rollout = self.engine.generate(self.prompts.prompt_ids(rows), params, stop=self.stop.during_generation)
        self.policy.train()
        trim_heap()  # generation's freed KV caches, before the update's activations
        return rollout

    def _update(self, rollout: Rollout, batches: list[MicroBatch], timer: PhaseTimer, *, step: int = 0,
                stoppable: bool = False) -> UpdateResult:
        """One optimiser update: accumulate the gradients of the update's micro-batches, then one
        optimiser step (skipped when the loss or the gradient norm is not finite).

        ``stoppable``: no update of this rollout batch was applied yet, so a stop request may abandon
        the batch after a micro-batch (every process passes the same value: ``applied`` is agreed)."""
        cfg, parts, loss_total = self.cfg, [], 0.0
        for i, mb in enumerate(batches):
            with timer("signals"):
                teacher = self.signals.model_signals(rollout, mb)
            with timer("update"):
                loss, metrics = self.loss_module(mb.packed, self.objective, mb.batch, teacher, cfg.temperature,
                                                 cfg.backend, cfg.chunk_size or None)
                self.accelerator.backward(loss * self.world)  # DDP averages gradients; our normalisers are global sums
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
            self.engine.update_weights(self.policy)

    def _clip_gradients(self) -> float:
        """The global gradient norm (before clipping), clipped to --max-grad-norm when it is > 0."""
        if self.cfg.max_grad_norm > 0:
            return float(self.accelerator.clip_grad_norm_(self.policy.parameters(), self.cfg.max_grad_norm))
        sq = sum(float(p.grad.float().pow(2).sum()) for p in self.policy.parameters() if p.grad is not None)
        return math.sqrt(sq)

    def _sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t.to(self.accelerator.device), reduction="sum")

    def _per_reward_means(self, scores: Scores) -> dict[str, float]:
        """``reward/<name>``: the mean of each of a multi-reward task's rewards (same names on every process)."""
        parts = per_reward_sums(scores.scores)
        names = sorted(parts)
        if not names:
            return {}
        totals = self._sum_over_processes(torch.tensor([list(parts[k]) for k in names], dtype=torch.float64))
        return {f"reward/{k}": float(totals[i, 0] / totals[i, 1]) for i, k in enumerate(names)}

    def _sampling_metrics(self, batch: RolloutBatch) -> dict[str, float]:
        """Dynamic sampling's and overlong shaping's metrics, when they are on (over processes):
        ``generation_rounds`` (mean over processes), ``groups_dropped``, ``groups_filled`` (sums),
        ``overlong_penalty`` (mean over samples)."""
        out: dict[str, float] = {}
        if self.cfg.dynamic_sampling:
            t = self._sum_over_processes(torch.tensor([float(batch.rounds), float(batch.dropped), float(batch.filled)]))
            out.update(generation_rounds=float(t[0]) / self.world, groups_dropped=float(t[1]),
                       groups_filled=float(t[2]))
        if batch.scores.overlong is not None:
            t = self._sum_over_processes(torch.tensor([float(batch.scores.overlong.sum()),
                                                       float(batch.scores.overlong.numel())]))
            out["overlong_penalty"] = float(t[0] / t[1].clamp_min(1))
        return out

    def _metrics_row(self, step: int, batch: RolloutBatch, updates: list[UpdateResult],
                     timer: PhaseTimer) -> dict[str, Any]:
        """The step's row of metrics.jsonl: sums and counts over processes (the objective's metrics over
        every micro-batch of every update), then means; ``loss`` and ``grad_norm`` are means over the
        updates, ``updates`` the optimiser updates applied and ``skipped`` those skipped."""
        rollout, scores = batch.rollout, batch.scores
        merged = merge_metrics([part for u in updates for part in u.metrics])
        names = sorted(merged)
        sums = torch.tensor([[float(merged[k].sum), float(merged[k].count)] for k in names] or [[0.0, 0.0]])
        sums = self._sum_over_processes(sums)
        rewards = scores.rewards
        stat = self._sum_over_processes(torch.stack([
            rewards.sum(), (rewards ** 2).sum(), scores.success.sum(), rollout.lengths.float().sum(),
            rollout.truncated.float().sum(), torch.tensor(float(rollout.num_samples))])).tolist()
        n = max(stat[5], 1.0)
        mean_r = stat[0] / n
        per_reward = self._per_reward_means(scores)
        elapsed = timer.elapsed()
        return {
            "step": step + 1,
            "processes": self.world,
            "reward_mean": mean_r,
            "reward_std": math.sqrt(max(stat[1] / n - mean_r ** 2, 0.0)),
            **per_reward,
            **self._sampling_metrics(batch),
            "success_rate": stat[2] / n,
            "loss": sum(u.loss for u in updates) / len(updates),
            **{k: (float(sums[i, 0] / sums[i, 1]) if float(sums[i, 1]) > 0 else None) for i, k in enumerate(names)},
            "response_length": stat[3] / n,
            "truncated_frac": stat[4] / n,
            "grad_norm": sum(u.grad_norm for u in updates) / len(updates),
            "lr": self.scheduler.get_last_lr()[0],
            "updates": sum(u.applied for u in updates),
            "skipped": sum(not u.applied for u in updates),
            "time_generate_s": timer.seconds.get("generate", 0.0),
            "time_signals_s": timer.seconds.get("signals", 0.0),
            "time_update_s": timer.seconds.get("update", 0.0),
            "step_time_s": elapsed,
            "tokens_per_s": stat[3] / elapsed,
        }

    # ------------------------------------------------------------------------------------- run

    def _trainer_state(self, step: int, finished: bool) -> dict[str, Any]:
        return {"step": step, "metrics_rows": self.run.metrics_rows, "skipped_total": self.skipped_total,
                "consecutive_skips": self.consecutive_skips, "finished": finished}

    def save(self, step: int, *, finished: bool = False) -> Path | None:
        """Checkpoint ``step`` (every process takes part: the RNG streams of all of them are stored).

        A failed write (a full disk) leaves the previous checkpoints as they were and raises
        :class:`~denser.trainers.checkpoint.CheckpointError` on every process."""
        at_boundary = self._rng_boundary is not None and self._rng_boundary[0] == step
        rng = gather_object([self._rng_boundary[1] if at_boundary else ckpt.rng_state()])  # one per process, rank order
        path, error = None, None
        if self.is_main:
            try:
                self.run.sync_metrics()  # the rows this checkpoint counts are on disk
                path = ckpt.save_checkpoint(
                    self.run_dir, step, model=self.policy, tokenizer=self.tokenizer, optimizer=self.optimizer,
                    scheduler=self.scheduler, trainer_state=self._trainer_state(step, finished),
                    teacher_state=self.teacher.state_dict() if self.teacher else None, keep_last=self.cfg.keep_last,
                    rng=rng)
            except OSError as e:
                error = e
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
            self._note(f"eval accuracy before training: {self._eval_line(metrics)}")
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
            self._note(f"final checkpoint: {path} (AutoModelForCausalLM.from_pretrained('{path / 'model'}'))")
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
        head = f"stopped by {signal_name(stop.signum)} at {stop.where}" + (f" ({timing[2:]})" if timing else "")
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
        continues the AdamW state and the EMA teacher (``teacher_state`` is None without one)."""
        return {"optimizer_state": self.optimizer.state_dict(),
                "teacher_state": self.teacher.state_dict() if self.teacher is not None else None}

    def _start_from(self, optimizer_state: dict | None, teacher_state: dict | None) -> None:
        if optimizer_state is not None:
            lrs = [(g["lr"], g.get("initial_lr")) for g in self.optimizer.param_groups]
            self.optimizer.load_state_dict(optimizer_state)
            for g, (lr, initial_lr) in zip(self.optimizer.param_groups, lrs):  # this run's schedule
                g["lr"] = lr
                if initial_lr is not None:
                    g["initial_lr"] = initial_lr
        if teacher_state is not None and self.teacher is not None:
            self.teacher.load_state_dict(teacher_state)  # an EMA teacher's weights; other teachers ignore it


def eval_metrics(greedy: list[float], sampled: list[float] | None = None) -> dict[str, float | None]:
    """The eval metrics of per-prompt values: greedy successes (1.0 / 0.0) and, when sampled, each
    prompt's fraction of successful samples; means over prompts and their standard errors
    (:func:`~denser.trainers.estimators.mean_stderr`). No prompts: accuracy 0.0, no error."""
    mean, se = mean_stderr(greedy)
    out: dict[str, float | None] = {"eval_accuracy": mean if mean is not None else 0.0, "eval_accuracy_se": se}
    if sampled is not None:
        out["eval_mean_at_n"], out["eval_mean_at_n_se"] = mean_stderr(sampled)
    return out


def format_eval(metrics: dict[str, Any], samples: int = 0) -> str:
    """``0.656 ± 0.085`` (greedy), then ``; mean@4 0.610 ± 0.070`` when the metrics have a sampled part
    (``samples``: its n)."""

    def pm(mean, se):
        return f"{mean:.3f}" + (f" ± {se:.3f}" if se is not None else "")

    text = pm(metrics["eval_accuracy"], metrics.get("eval_accuracy_se"))
    if samples and metrics.get("eval_mean_at_n") is not None:
        text += f"; mean@{samples} {pm(metrics['eval_mean_at_n'], metrics.get('eval_mean_at_n_se'))}"
    return text


def _task_of(cfg: TrainConfig) -> Task:
    try:
        return get_task(cfg.task or DEFAULT_TASK, seed=cfg.seed)
    except TypeError as e:  # bad inline options (addition?foo=1)
        raise ValueError(str(e)) from None
