"""The generic on-policy loop: one loop for every registered objective.

One step is one rollout batch (DESIGN.md, Contract 3)::

    rollout   prompts of the step -> rollout engine -> completions + behaviour log-probs
    score     task.score -> rewards (+ feedback)
    signals   what the objective declared, and only those (trainers/signals.py): advantages,
              teacher contexts, packed micro-batches with global normalisers
    update    per micro-batch: reference / teacher forwards (no grad), then the policy forward to
              final hidden states [N, H] -> kernels.fused_loss(...) -> backward;
              then clip, optimiser step, LR schedule, teacher EMA, engine weights
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
from accelerate.utils import gather_object, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler

from denser.kernels import Metric, fused_loss, merge_metrics
from denser.objectives import TEACHER_SIGNALS, Objective, PolicyBatch, Signal, get_objective
from denser.tasks import DEFAULT_TASK, Task, get_task
from denser.tasks.rewards import per_reward_sums
from denser.trainers import checkpoint as ckpt
from denser.trainers.config import TrainConfig
from denser.trainers.models import load_model
from denser.trainers.packing import PackedBatch, completion_hidden_states, lm_head_params
from denser.trainers.prompts import PromptSchedule
from denser.trainers.rollout import Rollout, SamplingParams, get_rollout_engine
from denser.trainers.run_dir import RunDir
from denser.trainers.sharding import ModelCall, Sharding, fsdp_requested
from denser.trainers.signals import (
    MicroBatch,
    Scores,
    SignalComputer,
    TeacherInputs,
    check_signals,
    check_teacher_vocabulary,
)
from denser.trainers.teacher import TeacherWeights


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many consecutive non-finite updates); a checkpoint was written."""


class PolicyLoss(ModelCall):
    """The policy, whose forward runs a function of it: ``loss_module(policy_loss, ...)`` is the
    policy and its loss in one forward, so that wrappers (DDP, FSDP) see the lm_head weight whole
    where the loss core runs, and gradient sync hooks fire as usual. Under FSDP, generation and a
    live teacher's forward run through it too (:mod:`denser.trainers.sharding`)."""


def policy_loss(model: nn.Module, packed: PackedBatch, objective: Objective, batch: PolicyBatch,
                teacher: TeacherInputs | None, temperature: float, backend: str, chunk_size: int | None):
    """``(loss, metrics)`` of one micro-batch: hidden states [N, H] -> ``fused_loss``."""
    hidden = completion_hidden_states(model, packed)
    weight, bias = lm_head_params(model)
    out = fused_loss(hidden, weight, packed.targets, objective, batch, bias=bias,
                     teacher_hidden=teacher.hidden if teacher else None,
                     teacher_weight=teacher.weight if teacher else None,
                     teacher_bias=teacher.bias if teacher else None,
                     temperature=temperature, backend=backend, chunk_size=chunk_size)
    return out.loss, out.metrics


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
    - ``evaluator``: ``evaluator(trainer) -> accuracy`` replaces :meth:`evaluate`'s greedy eval
      (before, during and after training).

    Under FSDP (``cfg.fsdp``, or an accelerate FSDP launch: ``sharding`` is then a
    :class:`~denser.trainers.sharding.Sharding`) the policy, the reference and the teacher are
    sharded alike (``policy``'s parameters are this process's shards, DTensors; checkpoints hold
    the whole model); a run equals one process doing the same global batch, up to float summation order.
    """

    def __init__(self, cfg: TrainConfig, objective: Objective | None = None, *, task: Task | None = None,
                 log: Callable[[str], Any] = print, anchor: nn.Module | None = None,
                 optimizer_state: dict | None = None, teacher_state: dict | None = None,
                 evaluator: Callable[[Trainer], float] | None = None):
        self.anchor, self.evaluator = anchor, evaluator
        self.cfg, self.log = cfg, log
        self.objective = objective if objective is not None else get_objective(cfg.objective)
        self.accelerator = Accelerator(cpu=cfg.cpu or not torch.cuda.is_available())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if fsdp_requested(cfg.fsdp, self.accelerator) and any(x is not None for x in (anchor, optimizer_state, teacher_state)):
            raise ValueError("runs chained by the continual runner (anchor, optimizer_state, teacher_state) do not run "
                             "under FSDP; run them without --fsdp or an FSDP accelerate config")
        self.sharding = Sharding.for_run(self.accelerator, cfg.fsdp)  # None: one process, or DDP
        self.task = task if task is not None else _task_of(cfg)
        self._check_data()
        self.run_dir = Path(cfg.output_dir or f"runs/{self.objective.name}-{self.task.name}")
        self.run = RunDir(self.run_dir, is_main=self.is_main, log=log, barrier=self.accelerator.wait_for_everyone)
        # refuses another run's directory; writes nothing yet
        resume_from = self.run.check(self._run_config(), resume=cfg.resume, overwrite=cfg.overwrite, steps=cfg.steps)
        set_seed(cfg.seed + self.rank)  # before loading: a resumed run's RNG streams are restored last, below

        check_signals(self.objective, self.task)
        declared = self.objective.signals()
        self.teacher_spec = self.objective.teacher_spec() if declared & TEACHER_SIGNALS else None
        policy = self._load_models(resume_from)
        if self.teacher is not None:
            check_teacher_vocabulary(self.objective, policy, self.teacher.model)
        policy.train()
        self.loss_module, self.reference_root = PolicyLoss(policy), None
        if self.sharding is not None:  # before the optimizer, which holds the sharded parameters
            self._shard_models()
        decay = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(decay, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        self.scheduler = get_scheduler(cfg.lr_schedule, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.steps)
        device = self.accelerator.device
        if self.sharding is None:
            self.loss_module, self.optimizer = self.accelerator.prepare(self.loss_module, self.optimizer)
            for m in (self.reference, self.teacher.model if self.teacher and self.teacher.mode != "live" else None):
                if m is not None:
                    m.to(device)
        self.policy = self.accelerator.unwrap_model(self.loss_module).model
        self.engine = get_rollout_engine(cfg.engine, self.policy, self.tokenizer)
        self.signals = SignalComputer(self.objective, self.task, self.tokenizer, cfg, device=device, rank=self.rank,
                                      reduce=lambda t: self.accelerator.reduce(t, reduction="sum"),
                                      reference=self.reference, teacher=self.teacher, teacher_spec=self.teacher_spec,
                                      reference_root=self.reference_root)
        self.prompts = PromptSchedule(self.task, self.tokenizer, seed=cfg.seed, prompts_per_step=cfg.prompts_per_step,
                                      rank=self.rank, world=self.world, max_new_tokens=cfg.max_new_tokens,
                                      context_limit=getattr(self.policy.config, "max_position_embeddings", None))
        self.prompts.check_lengths(cfg.steps, cfg.eval_size)
        self.run.init(self._run_config(), fresh=resume_from is None, overwrite=cfg.overwrite)
        self.start_step, self.skipped_total, self.consecutive_skips = 0, 0, 0
        self.finished = False
        if resume_from is not None:
            self._load_state(resume_from)
        else:
            self._start_from(optimizer_state, teacher_state)

    # ------------------------------------------------------------------------------------ setup

    def _note(self, message: str) -> None:
        """A message every process would print alike: printed once, by the main process."""
        if self.is_main:
            self.log(message)

    def _run_config(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.cfg), "objective": self.objective.name,
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
        weights ``self.teacher_spec`` names). A frozen teacher shares the reference's copy of the
        initial weights."""
        cfg, declared = self.cfg, self.objective.signals()
        dtype = getattr(torch, cfg.dtype)
        with ckpt.quiet_transformers():
            policy, self.tokenizer = load_model(str(resume_from / "model") if resume_from else cfg.model,
                                                dtype=dtype, seed=cfg.seed)
        initial = None
        if Signal.REF_LOGP in declared or (self.teacher_spec is not None and self.teacher_spec.mode == "frozen"):
            with ckpt.quiet_transformers():
                initial, _ = ((self.anchor, None) if self.anchor is not None
                              else load_model(cfg.model, dtype=dtype, seed=cfg.seed))
            initial = initial.eval().requires_grad_(False)
        self.reference = initial if Signal.REF_LOGP in declared else None
        self.teacher = None
        if self.teacher_spec is not None:
            self.teacher = TeacherWeights.from_spec(self.teacher_spec, policy, initial)
        return policy

    def _shard_models(self) -> None:
        """FSDP: the policy, then the frozen initial model (reference and frozen teacher share it)
        and the teacher, each sharded alike under its own root; nothing is gathered until used."""
        sharding = self.sharding
        sharding.shard(self.loss_module)
        initial = self.reference if self.reference is not None else (
            self.teacher.model if self.teacher is not None and self.teacher.mode == "frozen" and self.teacher.shared
            else None)
        if initial is not None:
            self.reference_root = sharding.shard(ModelCall(initial), frozen=True)
        if self.teacher is not None:
            self.teacher.shard(sharding, policy_root=self.loss_module, shared_root=self.reference_root)
        units = len(sharding.units(self.loss_module.model))
        models = ", ".join(["the policy"] + (["the reference"] if self.reference is not None else [])
                           + ([f"the {self.teacher.mode} teacher"] if self.teacher is not None else []))
        self._note(f"FSDP2: {models} sharded over {self.world} process(es) ({units} layer units + a root each)")

    def _load_state(self, path: Path) -> None:
        state, trainer_state, teacher_state = ckpt.load_train_state(path)
        if self.sharding is not None:  # a whole state (any number of processes wrote it): keep our shards
            self.sharding.load_optimizer_state(self.optimizer, state["optimizer"])
        else:
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
    def evaluate(self) -> float:
        """Greedy accuracy on the first ``eval_size`` rows of the eval split (all processes), or what
        the ``evaluator`` given to the constructor returns."""
        if self.evaluator is not None:
            return float(self.evaluator(self))
        data = self.task.eval
        idx = list(range(min(self.cfg.eval_size, len(data))))[self.rank::self.world]
        correct = torch.zeros(2, device=self.accelerator.device)
        if idx:
            rows = [data[i] for i in idx]
            params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, num_generations=1, do_sample=False)
            rollout = self._generate(self.prompts.prompt_ids(rows), params)
            scores = self.task.score_batch(rollout.texts, rows)
            correct[0] = sum(float(self.task.is_success(s)) for s in scores)
            correct[1] = len(rows)
        correct = self.accelerator.reduce(correct, reduction="sum")
        return float(correct[0] / correct[1].clamp_min(1))

    # ------------------------------------------------------------------------------------- step

    def step(self, step: int) -> dict[str, Any]:
        """One rollout batch (0-based ``step``): generate, score, signals, one update; its metrics row."""
        timer = PhaseTimer()
        with timer("generate"):
            rows = self.prompts.rows_for_step(step)
            rollout = self._rollout(rows)
        with timer("signals"):
            scores = self.signals.score(rollout, rows)
            batches = self.signals.micro_batches(rollout, rows, scores, step)
        update = self._update(rollout, batches, timer)
        return self._metrics_row(step, rollout, scores, update, timer)

    def _rollout(self, rows: list[dict]) -> Rollout:
        cfg = self.cfg
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_generations=cfg.num_generations,
                                temperature=cfg.temperature, top_p=cfg.top_p)
        self.policy.eval()
        rollout = self._generate(self.prompts.prompt_ids(rows), params)
        self.policy.train()
        return rollout

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> Rollout:
        """The engine's completions; under FSDP inside the policy root's forward, which gathers
        the weights the engine's model (the policy) runs on."""
        if self.sharding is None:
            return self.engine.generate(prompt_ids, params)
        with torch.no_grad():
            return Sharding.run(self.loss_module, lambda _policy: self.engine.generate(prompt_ids, params))

    def _update(self, rollout: Rollout, batches: list[MicroBatch], timer: PhaseTimer) -> UpdateResult:
        """Accumulate the gradients of every micro-batch, then one optimiser step (skipped when
        the loss or the gradient norm is not finite)."""
        cfg, parts, loss_total = self.cfg, [], 0.0
        for mb in batches:
            with timer("signals"):
                teacher = self.signals.model_signals(rollout, mb)
            with timer("update"):
                loss, metrics = self.loss_module(policy_loss, mb.packed, self.objective, mb.batch, teacher,
                                                 cfg.temperature, cfg.backend, cfg.chunk_size or None)
                # DDP and FSDP average gradients over processes; our normalisers are global sums
                self.accelerator.backward(loss * self.world)
                loss_total += float(loss.detach())
                parts.append(metrics)
        with timer("update"):
            grad_norm = self._clip_gradients()
            loss_sum = float(self._sum_over_processes(torch.tensor([loss_total]))[0])
            applied = math.isfinite(loss_sum) and math.isfinite(grad_norm)
            if applied:
                self.optimizer.step()
                self.scheduler.step()
                if self.teacher is not None:
                    self.teacher.update(self.policy)
                self.engine.update_weights(self.policy)
            self.optimizer.zero_grad(set_to_none=True)
        return UpdateResult(loss_sum, grad_norm, applied, parts)

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

    def _per_reward_means(self, scores: Scores) -> dict[str, float]:
        """``reward/<name>``: the mean of each of a multi-reward task's rewards (same names on every process)."""
        parts = per_reward_sums(scores.scores)
        names = sorted(parts)
        if not names:
            return {}
        totals = self._sum_over_processes(torch.tensor([list(parts[k]) for k in names], dtype=torch.float64))
        return {f"reward/{k}": float(totals[i, 0] / totals[i, 1]) for i, k in enumerate(names)}

    def _metrics_row(self, step: int, rollout: Rollout, scores: Scores, update: UpdateResult,
                     timer: PhaseTimer) -> dict[str, Any]:
        """The step's row of metrics.jsonl: sums and counts over processes, then means."""
        merged = merge_metrics(update.metrics)
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
            "success_rate": stat[2] / n,
            "loss": update.loss,
            **{k: (float(sums[i, 0] / sums[i, 1]) if float(sums[i, 1]) > 0 else None) for i, k in enumerate(names)},
            "response_length": stat[3] / n,
            "truncated_frac": stat[4] / n,
            "grad_norm": update.grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "skipped": 0 if update.applied else 1,
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
        rng = gather_object([ckpt.rng_state()])  # one entry per process, in rank order
        # FSDP: whole tensors gathered by every process for the main one (a single-process checkpoint)
        model_state = optimizer_state = None
        if self.sharding is not None:
            model_state = Sharding.full_state(self.policy.state_dict(), keep=self.is_main)
            optimizer_state = self.sharding.full_optimizer_state(self.optimizer, keep=self.is_main)
        teacher_state = self.teacher.state_dict() if self.teacher else None
        path, error = None, None
        if self.is_main:
            try:
                self.run.sync_metrics()  # the rows this checkpoint counts are on disk
                path = ckpt.save_checkpoint(
                    self.run_dir, step, model=self.policy, tokenizer=self.tokenizer, optimizer=self.optimizer,
                    scheduler=self.scheduler, trainer_state=self._trainer_state(step, finished),
                    teacher_state=teacher_state, keep_last=self.cfg.keep_last, rng=rng,
                    model_state=model_state, optimizer_state=optimizer_state)
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
        return path

    def train(self) -> dict[str, Any]:
        """Run the remaining steps (with evaluations before and after, and checkpoints); a summary."""
        cfg = self.cfg
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "is_main": self.is_main}
        if self.finished:
            path = ckpt.latest_checkpoint(self.run_dir)
            self._note(f"--resume: the run in {self.run_dir} is already complete ({cfg.steps} steps); nothing to do")
            summary.update(already_complete=True, checkpoint=str(path) if path else None)
            return summary
        if self.start_step == 0:
            acc = self.evaluate()
            summary["eval_accuracy_before"] = acc
            self._note(f"eval accuracy before training: {acc:.3f} ({self.task.name}, {cfg.eval_size} greedy prompts)")
            self.run.append_metrics({"step": 0, "eval_accuracy": acc})
        bar = None
        if cfg.progress and self.is_main:
            bar = tqdm(total=cfg.steps, initial=self.start_step, desc=f"{self.objective.name} on {self.task.name}",
                       unit="step", file=sys.stderr, dynamic_ncols=True)
        last = None
        try:
            for step in range(self.start_step, cfg.steps):
                row = self.step(step)
                done = step + 1
                self._count_skips(row, done)
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    row["eval_accuracy"] = self.evaluate()
                self.run.append_metrics(row)
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
        acc = self.evaluate()
        self.run.append_metrics({"step": cfg.steps, "eval_accuracy": acc})
        path = self.save(cfg.steps, finished=True)
        summary.update(eval_accuracy_after=acc, last_step=last, checkpoint=str(path) if path else None)
        self._note(f"eval accuracy after {cfg.steps} steps: {acc:.3f}")
        if path:
            self._note(f"final checkpoint: {path} (AutoModelForCausalLM.from_pretrained('{path / 'model'}'))")
        return summary

    def _count_skips(self, row: dict[str, Any], done: int) -> None:
        self.consecutive_skips = self.consecutive_skips + 1 if row["skipped"] else 0
        self.skipped_total += row["skipped"]
        row["skipped_total"] = self.skipped_total
        if row["skipped"]:
            self._note(f"warning: step {done}: non-finite loss ({row['loss']}) or gradient norm "
                       f"({row['grad_norm']}); update skipped, weights unchanged "
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
        if self.sharding is not None:
            raise ValueError("carry_state: runs under FSDP are not chained by the continual runner")
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


def _task_of(cfg: TrainConfig) -> Task:
    try:
        return get_task(cfg.task or DEFAULT_TASK, seed=cfg.seed)
    except TypeError as e:  # bad inline options (addition?foo=1)
        raise ValueError(str(e)) from None
