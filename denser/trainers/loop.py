"""The generic on-policy loop: one loop for every registered objective.

Per step:  prompts -> rollout engine -> completions + behaviour log-probs
           -> task.score -> rewards (+ feedback)
           -> the signals the objective declared, and only those (advantages, reference
              log-probs from a frozen copy, the SDPO teacher's hidden states)
           -> per micro-batch: policy forward to final hidden states [N, H]
              -> kernels.fused_loss(hidden, lm_head.weight, targets, objective, batch, teacher_hidden=...)
           -> backward, clip, optimiser step, teacher EMA update, metrics, checkpoint
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from denser.kernels import fused_loss, merge_metrics, token_stats
from denser.objectives import Objective, PolicyBatch, Signal, get_objective
from denser.objectives.common import group_advantages, normaliser_counts
from denser.trainers import checkpoint as ckpt
from denser.trainers.config import TrainConfig
from denser.trainers.preemption import Interrupted, StopControl, StopSignals, signal_name
from denser.trainers.teacher import TeacherSettings, TeacherWeights, teacher_messages

LOOP_SIGNALS = frozenset(Signal)
TASK_SIGNALS = frozenset({Signal.REWARDS, Signal.ADVANTAGES, Signal.TEACHER})
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")  # what a run directory holds (and --overwrite removes)
# Differences between a run's config.yaml and a --resume that make it another run.
RESUME_MUST_MATCH = ("objective", "model", "task")
# Prompts checked against the model's context before any compute (the rest are checked as they are used).
MAX_PREFLIGHT_PROMPTS = 20_000


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many consecutive non-finite updates); a checkpoint was written."""


class PolicyLoss(nn.Module):
    """The policy and its loss in one forward, so that wrappers (DDP, FSDP) see the lm_head weight
    whole where the loss core runs, and gradient sync hooks fire as usual."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, packed, objective: Objective, batch: PolicyBatch, teacher_hidden, teacher_weight, teacher_bias,
                temperature: float, backend: str, chunk_size: int | None):
        from denser.trainers.rollout import completion_hidden_states, lm_head_params

        hidden = completion_hidden_states(self.model, packed)
        weight, bias = lm_head_params(self.model)
        out = fused_loss(hidden, weight, packed.targets, objective, batch, bias=bias, teacher_hidden=teacher_hidden,
                         teacher_weight=teacher_weight, teacher_bias=teacher_bias, temperature=temperature,
                         backend=backend, chunk_size=chunk_size)
        return out.loss, out.metrics


def check_signals(objective: Objective, task: Any, policy: nn.Module, teacher: nn.Module | None) -> None:
    """Fail before any generation when a declared signal cannot be provided."""
    name = objective.name
    for s in objective.signals():
        if s not in LOOP_SIGNALS:
            raise ValueError(f"objective {name!r} declares signal {s!r}, which the loop cannot compute; "
                             f"known signals: {', '.join(x.value for x in Signal)}")
    provides = getattr(task, "provides", None)
    if provides is not None:
        for s in objective.signals() & TASK_SIGNALS:
            if s not in provides:
                raise ValueError(f"objective {name!r} needs signal '{s.value}' but task {task.name!r} cannot provide it "
                                 f"(it provides: {', '.join(sorted(x.value for x in provides))})")
    if teacher is not None:
        v_s = policy.get_output_embeddings().weight.shape[0]
        v_t = teacher.get_output_embeddings().weight.shape[0]
        if v_s != v_t:
            raise ValueError(f"objective {name!r} distils from a teacher whose vocabulary ({v_t}) differs from the "
                             f"policy's ({v_s}); token-level distillation needs one shared tokenizer")


class Trainer:
    """``Trainer(cfg, objective).train()`` runs ``cfg.steps`` on-policy steps and returns the final metrics."""

    def __init__(self, cfg: TrainConfig, objective: Objective | None = None, *, task: Any = None, log=print,
                 stop_signals: StopSignals | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from denser.tasks import DEFAULT_TASK, get_task
        from denser.trainers.models import load_model
        from denser.trainers.rollout import HFRolloutEngine

        self.cfg = cfg
        self.log = log
        self.objective = objective if objective is not None else get_objective(cfg.objective)
        self.signals = self.objective.signals()
        self.accelerator = Accelerator(cpu=cfg.cpu or not torch.cuda.is_available())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        if task is None:
            try:
                task = get_task(cfg.task or DEFAULT_TASK, seed=cfg.seed)
            except TypeError as e:  # bad inline options (addition?foo=1)
                raise ValueError(str(e)) from None
        self.task = task
        self._check_data()
        self.run_dir = Path(cfg.output_dir or f"runs/{self.objective.name}-{self.task.name}")
        resume_from = self._check_run_dir()  # refuses another run's directory; writes nothing yet
        set_seed(cfg.seed + self.rank)  # before loading: a resumed run's RNG streams are restored last, below

        dtype = getattr(torch, cfg.dtype)
        with ckpt.quiet_transformers():
            policy, self.tokenizer = load_model(str(resume_from / "model") if resume_from else cfg.model,
                                                dtype=dtype, seed=cfg.seed)
        initial = None
        needs_initial = Signal.REF_LOGP in self.signals or getattr(self._teacher_opts(), "teacher", None) == "frozen"
        if needs_initial:
            with ckpt.quiet_transformers():
                initial, _ = load_model(cfg.model, dtype=dtype, seed=cfg.seed)
            initial = initial.eval().requires_grad_(False)
        self.reference = initial if Signal.REF_LOGP in self.signals else None
        self.teacher = None
        if Signal.TEACHER in self.signals:
            t = self._teacher_opts()
            self.teacher = TeacherWeights(policy, getattr(t, "teacher", "live"), getattr(t, "teacher_update_rate", 0.05),
                                          shared_frozen=initial)
            self.teacher_settings = TeacherSettings.from_objective(self.objective)
        check_signals(self.objective, self.task, policy, self.teacher.model if self.teacher else None)

        policy.train()
        decay = [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(decay, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), weight_decay=cfg.weight_decay)
        from transformers import get_scheduler

        self.scheduler = get_scheduler(cfg.lr_schedule, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                       num_training_steps=cfg.steps)
        self.loss_module, self.optimizer = self.accelerator.prepare(PolicyLoss(policy), self.optimizer)
        self.policy = self.accelerator.unwrap_model(self.loss_module).model
        device = self.accelerator.device
        for m in (self.reference, self.teacher.model if self.teacher and self.teacher.mode != "live" else None):
            if m is not None:
                m.to(device)
        self.engine = HFRolloutEngine(self.policy, self.tokenizer)
        self._perms: dict[int, torch.Tensor] = {}
        self._check_prompt_lengths()
        self._init_run_dir(fresh=resume_from is None)
        self.start_step, self.metrics_rows, self.skipped_total, self.consecutive_skips = 0, 0, 0, 0
        self.finished = False
        if resume_from is not None:
            self._load_state(resume_from)
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

    def _teacher_opts(self):
        part = getattr(self.objective, "sdpo_part", None)
        return part() if callable(part) else self.objective

    def _run_config(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.cfg), "objective": self.objective.name, "task": self.task.name,
                "objective_args": dataclasses.asdict(self.objective)}

    def _check_data(self) -> None:
        name = self.task.name
        if len(self.task.train) == 0:
            raise ValueError(f"task {name!r} has no training rows; nothing to train on")
        if len(self.task.eval) == 0:
            self._note(f"warning: task {name!r} has no eval rows; eval accuracy will read 0")

    def _check_run_dir(self) -> Path | None:
        """Refuse a directory that holds another run; with --resume, the checkpoint to resume from.

        Writes nothing: a run that fails its checks before any compute leaves no trace."""
        import yaml

        cfg, run = self.cfg, self.run_dir
        if run.exists() and not run.is_dir():
            raise ValueError(f"--output-dir {run} is a file, not a directory")
        holds = [n for n in RUN_FILES if (run / n).exists()]
        if holds and not cfg.resume and not cfg.overwrite:
            raise ValueError(f"{run} already holds a run ({', '.join(holds)}); pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --output-dir")
        if not cfg.resume:
            return None
        existing = run / "config.yaml"
        if existing.exists():
            try:
                old = yaml.safe_load(existing.read_text()) or {}
            except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--resume: cannot read {existing} ({str(e).splitlines()[0]})") from None
            if not isinstance(old, dict):
                raise ValueError(f"--resume: {existing} is not a run config (a mapping)")
            new = self._run_config()
            diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in RESUME_MUST_MATCH if old.get(k) != new.get(k)]
            if diffs:
                raise ValueError(f"--resume: {run} holds a different run ({'; '.join(diffs)}); resume with the same "
                                 f"objective, model and task (e.g. --config {existing} --resume), or use another "
                                 "--output-dir")
            ignore = {"resume", "overwrite", "progress", "output_dir"}
            changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items()
                       if k not in ignore and k != "objective_args" and k in old and old[k] != v]
            old_args = old.get("objective_args") or {}
            changed += [f"{k} {old_args.get(k)!r} -> {v!r}" for k, v in new["objective_args"].items()
                        if k in old_args and old_args[k] != v]
            if changed:
                self._note(f"--resume: settings changed since the run started: {'; '.join(changed)}")
        for p in ckpt.incomplete_checkpoints(run):
            self._note(f"--resume: ignoring {p} (an interrupted checkpoint write; removed at the next save)")
        try:  # the newest checkpoint that matches its manifest; damaged ones are named and skipped
            latest = ckpt.latest_checkpoint(run, verify=True, note=lambda m: self._note(f"--resume: {m}"))
        except ckpt.CheckpointError as e:  # damaged or pickled (an older denser): before any compute
            raise ValueError(f"--resume: {e}") from None
        if latest is None:
            self._note(f"--resume: no complete checkpoint in {run}; starting from step 0")
            return None
        step = ckpt.checkpoint_step(latest)
        if step > cfg.steps:
            raise ValueError(f"--resume: the newest checkpoint {latest} is at step {step}, beyond --steps {cfg.steps}; "
                             f"pass --steps {step} or more")
        return latest

    def _init_run_dir(self, fresh: bool) -> None:
        """Create the run directory and its config.yaml (after every check has passed)."""
        import shutil

        import yaml

        run = self.run_dir
        if self.is_main:
            if self.cfg.overwrite:  # only what a run writes: never the rest of a directory
                for name in RUN_FILES:
                    p = run / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
            run.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(run / "config.yaml", yaml.safe_dump(self._run_config(), sort_keys=False))
            if fresh and (run / "metrics.jsonl").exists():  # --resume without a checkpoint starts over
                (run / "metrics.jsonl").unlink()
        self.accelerator.wait_for_everyone()

    def _load_state(self, path: Path) -> None:
        state, trainer_state, teacher_state = ckpt.load_train_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.teacher is not None:
            if self.teacher.mode == "ema" and teacher_state is None:
                self._note(f"warning: {path} holds no EMA teacher; the teacher restarts from the resumed policy")
            self.teacher.load_state_dict(teacher_state)
        self.start_step = int(trainer_state["step"])
        self.metrics_rows = int(trainer_state["metrics_rows"])
        self.skipped_total = int(trainer_state.get("skipped_total", 0))
        self.consecutive_skips = int(trainer_state.get("consecutive_skips", 0))
        self.finished = bool(trainer_state.get("finished", False)) and self.start_step >= self.cfg.steps
        self._truncate_metrics(self.metrics_rows)
        # Last, after everything that might draw random numbers: the streams continue where the run left them.
        ckpt.set_rng_state(state["rng"], self.rank)
        self._note(f"resumed from {path} (step {self.start_step}, the newest complete checkpoint)")

    def _truncate_metrics(self, rows: int) -> None:
        """Keep the first ``rows`` rows of metrics.jsonl: those written before the checkpoint."""
        path = self.run_dir / "metrics.jsonl"
        if self.is_main:
            lines = path.read_text().splitlines() if path.exists() else []
            if len(lines) < rows:
                self.log(f"warning: {path} has {len(lines)} rows but the checkpoint counted {rows}; "
                         "rows written before the checkpoint are missing")
            if len(lines) > rows:  # rows of steps after the checkpoint (or half a row of a killed write)
                _atomic_write_text(path, "".join(line + "\n" for line in lines[:rows]))
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------- data

    def _rows_for_step(self, step: int) -> list[dict]:
        """Prompts of ``step`` on this process: a function of (seed, step, rank), so a resumed run
        sees exactly the prompts the uninterrupted run would have."""
        per = self.cfg.prompts_per_step
        start = (step * self.world + self.rank) * per
        return [self.task.train[self._perm_index(k)] for k in range(start, start + per)]

    def _check_prompt_lengths(self) -> None:
        """Before any compute: every prompt the run will use (up to MAX_PREFLIGHT_PROMPTS) fits the
        model's context together with --max-new-tokens."""
        from denser.trainers.models import render_prompt

        limit = getattr(self.policy.config, "max_position_embeddings", None)
        if not limit:
            return
        data, cfg = self.task.train, self.cfg
        needed = cfg.steps * self.world * cfg.prompts_per_step
        if needed >= len(data):
            train_idx = range(min(len(data), MAX_PREFLIGHT_PROMPTS))
        else:
            train_idx = sorted({int(self._perm_index(k)) for k in range(min(needed, MAX_PREFLIGHT_PROMPTS))})
        splits = [("train", data, train_idx), ("eval", self.task.eval, range(min(cfg.eval_size, len(self.task.eval))))]
        for split, rows, idx in splits:
            for i in idx:
                self._check_fits(len(render_prompt(self.tokenizer, self.task.prompt(rows[i]))), f"{split} row {i}")

    def _check_fits(self, prompt_tokens: int, where: str) -> None:
        """A prompt of ``prompt_tokens`` plus --max-new-tokens must fit the model's context."""
        limit = getattr(self.policy.config, "max_position_embeddings", None)
        if limit and prompt_tokens + self.cfg.max_new_tokens > limit:
            raise ValueError(f"task {self.task.name!r}: the prompt of {where} has {prompt_tokens} tokens; with "
                             f"--max-new-tokens {self.cfg.max_new_tokens} it exceeds the model's context of {limit} "
                             "tokens; shorten or drop that prompt, or lower --max-new-tokens")

    def _perm_index(self, k: int) -> int:
        """Dataset index of the ``k``-th prompt drawn (over all steps and processes)."""
        n = len(self.task.train)
        epoch, pos = divmod(k, n)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(n, generator=g)
        return int(self._perms[epoch][pos])

    def _prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        from denser.trainers.models import render_prompt

        ids = [render_prompt(self.tokenizer, self.task.prompt(r)) for r in rows]
        for p in ids:  # prompts beyond the preflight's sample are checked as they come
            self._check_fits(len(p), "a prompt of this batch")
        return ids

    # ------------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self, stop=None) -> float:
        """Greedy accuracy on the first ``eval_size`` rows of the eval split (all processes).

        ``stop``: passed to the engine (only where an abandoned eval loses nothing: before step 1)."""
        from denser.trainers.rollout import SamplingParams

        data = self.task.eval
        idx = list(range(min(self.cfg.eval_size, len(data))))[self.rank::self.world]
        correct = torch.zeros(2, device=self.accelerator.device)
        if idx:
            rows = [data[i] for i in idx]
            params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, num_generations=1, do_sample=False)
            rollout = self.engine.generate(self._prompt_ids(rows), params, stop=stop)
            scores = self.task.score_batch(rollout.texts, rows)
            correct[0] = sum(float(self.task.is_success(s)) for s in scores)
            correct[1] = len(rows)
        correct = self.accelerator.reduce(correct, reduction="sum")
        return float(correct[0] / correct[1].clamp_min(1))

    # ------------------------------------------------------------------------------------- step

    def _teacher_contexts(self, rollout, rows, scores) -> tuple[list[list[int]], torch.Tensor]:
        from denser.trainers.models import render_prompt

        g = rollout.num_generations
        contexts, mask = [], []
        for s in range(rollout.num_samples):
            p = s // g
            group = range(p * g, (p + 1) * g)
            messages = teacher_messages(self.task.prompt(rows[p]), [rollout.texts[j] for j in group],
                                        [scores[j].score for j in group], [scores[j].feedback for j in group],
                                        s - p * g, self.teacher_settings)
            if messages is None:
                contexts.append(rollout.sample_prompt_ids(s))
                mask.append(False)
            else:
                ids = render_prompt(self.tokenizer, messages)
                contexts.append(ids[-self.cfg.teacher_max_context_tokens:])
                mask.append(True)
        return contexts, torch.tensor(mask, dtype=torch.bool)

    def step(self, step: int) -> dict[str, Any]:
        from denser.trainers.rollout import SamplingParams, completion_hidden_states, lm_head_params

        cfg, dev, sig = self.cfg, self.accelerator.device, self.signals
        # the RNG streams at this step's boundary: a stop inside the step saves these, not the advanced ones
        self._rng_boundary = (step, ckpt.rng_state())
        t0 = time.perf_counter()
        rows = self._rows_for_step(step)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_generations=cfg.num_generations,
                                temperature=cfg.temperature, top_p=cfg.top_p)
        self.policy.eval()
        rollout = self.engine.generate(self._prompt_ids(rows), params, stop=self.stop.during_generation)
        self.policy.train()
        t_gen = time.perf_counter() - t0
        self.stop.check(f"step {step + 1}, after generation")  # a stop during it: the rollout is abandoned

        t1 = time.perf_counter()
        S, G = rollout.num_samples, rollout.num_generations
        sample_rows = [rows[s // G] for s in range(S)]
        scores = self.task.score_batch(rollout.texts, sample_rows)
        rewards = torch.tensor([s.score for s in scores], dtype=torch.float32)
        success = torch.tensor([float(self.task.is_success(s)) for s in scores])
        advantages = None
        if Signal.ADVANTAGES in sig:
            adv_fn = getattr(self.objective, "advantages", None)
            advantages = adv_fn(rewards, G) if callable(adv_fn) else group_advantages(rewards, G)
        teacher_contexts, teacher_mask = (None, None)
        if Signal.TEACHER in sig:
            teacher_contexts, teacher_mask = self._teacher_contexts(rollout, rows, scores)

        micro = [list(range(a, min(S, a + cfg.micro_batch_size))) for a in range(0, S, cfg.micro_batch_size)]
        batches = []
        for i, idx in enumerate(micro):
            packed = rollout.pack(idx, device=dev)
            it = torch.tensor(idx)
            batches.append((packed, PolicyBatch(
                seq_ids=packed.seq_ids, num_seqs=len(idx), global_tokens=1.0, global_seqs=1.0,
                rewards=rewards[it].to(dev),
                advantages=None if advantages is None else advantages[it].to(dev),
                old_logp=packed.old_logp if Signal.OLD_LOGP in sig else None,
                teacher_mask=None if teacher_mask is None else teacher_mask[it].to(dev),
                norm_length=float(cfg.max_new_tokens), step=step, total_steps=cfg.steps,
                micro_batch=self.rank * len(micro) + i)))
        counts: dict[str, float] = {}
        for _, b in batches:
            for k, v in normaliser_counts(b).items():
                counts[k] = counts.get(k, 0.0) + v
        keys = sorted(counts)
        totals = self.accelerator.reduce(torch.tensor([counts[k] for k in keys], device=dev), reduction="sum")
        for _, b in batches:
            for k, v in zip(keys, totals.tolist()):
                setattr(b, k, v)
        t_signals = time.perf_counter() - t1

        t2 = time.perf_counter()
        t_forward_aux = 0.0
        parts, loss_total = [], 0.0
        for i, (packed, batch) in enumerate(batches):
            teacher_hidden = teacher_weight = teacher_bias = None
            ta = time.perf_counter()
            with torch.no_grad():
                if self.reference is not None:
                    h_ref = completion_hidden_states(self.reference, packed)
                    w_ref, b_ref = lm_head_params(self.reference)
                    batch.ref_logp = token_stats(h_ref, w_ref, packed.targets, bias=b_ref, temperature=cfg.temperature,
                                                 backend=cfg.backend).logp
                if self.teacher is not None:
                    tpacked = rollout.pack(micro[i], contexts=[teacher_contexts[j] for j in micro[i]], device=dev)
                    teacher_model = self.teacher.model
                    was_training = teacher_model.training
                    teacher_model.eval()
                    teacher_hidden = completion_hidden_states(teacher_model, tpacked)
                    teacher_model.train(was_training)
                    teacher_weight, teacher_bias = lm_head_params(teacher_model)
                    if self.objective.core_options().get("need_divergence", True) is False:
                        batch.extras["teacher_logp"] = token_stats(teacher_hidden, teacher_weight, packed.targets,
                                                                   bias=teacher_bias, temperature=cfg.temperature,
                                                                   backend=cfg.backend).logp
            t_forward_aux += time.perf_counter() - ta
            loss, metrics = self.loss_module(packed, self.objective, batch, teacher_hidden, teacher_weight, teacher_bias,
                                             cfg.temperature, cfg.backend, cfg.chunk_size or None)
            self.accelerator.backward(loss * self.world)  # DDP averages gradients; our normalisers are global sums
            loss_total += float(loss.detach())
            parts.append(metrics)
            self.stop.check(f"step {step + 1}, after micro-batch {i + 1}/{len(batches)}")

        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm))
        else:
            sq = sum(float(p.grad.float().pow(2).sum()) for p in self.policy.parameters() if p.grad is not None)
            grad_norm = math.sqrt(sq)
        loss_sum = float(self.accelerator.reduce(torch.tensor([loss_total], device=dev), reduction="sum")[0])
        finite = math.isfinite(loss_sum) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            if self.teacher is not None:
                self.teacher.update(self.policy)
        self.optimizer.zero_grad(set_to_none=True)
        t_update = time.perf_counter() - t2 - t_forward_aux

        merged = merge_metrics(parts)
        names = sorted(merged)
        sums = torch.tensor([[float(merged[k].sum), float(merged[k].count)] for k in names] or [[0.0, 0.0]], device=dev)
        sums = self.accelerator.reduce(sums, reduction="sum")
        lengths = rollout.lengths.float()
        stat = self.accelerator.reduce(torch.stack([rewards.sum(), (rewards ** 2).sum(), success.sum(),
                                                    lengths.sum(), rollout.truncated.float().sum(),
                                                    torch.tensor(float(S))]).to(dev), reduction="sum").tolist()
        n = max(stat[5], 1.0)
        mean_r = stat[0] / n
        elapsed = time.perf_counter() - t0
        row = {
            "step": step + 1,
            "processes": self.world,
            "reward_mean": mean_r,
            "reward_std": math.sqrt(max(stat[1] / n - mean_r ** 2, 0.0)),
            "success_rate": stat[2] / n,
            "loss": loss_sum,
            **{k: (float(sums[i, 0] / sums[i, 1]) if float(sums[i, 1]) > 0 else None) for i, k in enumerate(names)},
            "response_length": stat[3] / n,
            "truncated_frac": stat[4] / n,
            "grad_norm": grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "skipped": 0 if finite else 1,
            "time_generate_s": t_gen,
            "time_signals_s": t_signals + t_forward_aux,
            "time_update_s": t_update,
            "step_time_s": elapsed,
            "tokens_per_s": stat[3] / elapsed,
        }
        return row

    # ------------------------------------------------------------------------------------- run

    def _write_metrics(self, row: dict) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        self.metrics_rows += 1

    def _trainer_state(self, step: int, finished: bool) -> dict[str, Any]:
        return {"step": step, "metrics_rows": self.metrics_rows, "skipped_total": self.skipped_total,
                "consecutive_skips": self.consecutive_skips, "finished": finished}

    def save(self, step: int, *, finished: bool = False) -> Path | None:
        """Checkpoint ``step`` (every process takes part: the RNG streams of all of them are stored).

        A failed write (a full disk) leaves the previous checkpoints as they were and raises
        :class:`~denser.trainers.checkpoint.CheckpointError` on every process."""
        from accelerate.utils import gather_object

        at_boundary = self._rng_boundary is not None and self._rng_boundary[0] == step
        rng = gather_object([self._rng_boundary[1] if at_boundary else ckpt.rng_state()])  # one per process, rank order
        path, error = None, None
        if self.is_main:
            try:
                _fsync_file(self.run_dir / "metrics.jsonl")  # the rows this checkpoint counts are on disk
                path = ckpt.save_checkpoint(
                    self.run_dir, step, model=self.policy, tokenizer=self.tokenizer, optimizer=self.optimizer,
                    scheduler=self.scheduler, trainer_state=self._trainer_state(step, finished),
                    teacher_state=self.teacher.state_dict() if self.teacher else None, keep_last=self.cfg.keep_last,
                    rng=rng)
            except OSError as e:
                error = e
        failed = self.accelerator.reduce(torch.tensor([float(error is not None)], device=self.accelerator.device),
                                         reduction="sum")
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
        summary: dict[str, Any] = {"run_dir": str(self.run_dir), "is_main": self.is_main}
        try:
            return self._train(summary)
        except Interrupted as stop:  # abandon the step in progress; keep every finished one
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
            acc = self.evaluate(stop=self.stop.during_generation)
            self.stop.check("the evaluation before training")  # a stop during it: nothing was done, nothing saved
            summary["eval_accuracy_before"] = acc
            self._note(f"eval accuracy before training: {acc:.3f} ({self.task.name}, {cfg.eval_size} greedy prompts)")
            self._write_metrics({"step": 0, "eval_accuracy": acc})
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.start_step, desc=f"{self.objective.name} on {self.task.name}",
                       unit="step", file=sys.stderr, dynamic_ncols=True)
        last = None
        try:
            for step in range(self.start_step, cfg.steps):
                if self.stop.boundary(f"the start of step {step + 1}") and step > 0 and self.saved_step != step:
                    self.save(step)  # --save-every-minutes
                row = self.step(step)
                done = step + 1
                self.consecutive_skips = self.consecutive_skips + 1 if row["skipped"] else 0
                self.skipped_total += row["skipped"]
                row["skipped_total"] = self.skipped_total
                if row["skipped"]:
                    self._note(f"warning: step {done}: non-finite loss ({row['loss']}) or gradient norm "
                             f"({row['grad_norm']}); update skipped, weights unchanged "
                             f"({self.consecutive_skips} in a row, {self.skipped_total} in all)")
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    row["eval_accuracy"] = self.evaluate()
                self._write_metrics(row)
                self.steps_done = done
                last = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{row['reward_mean']:.2f}", loss=f"{row['loss']:.3g}",
                                    **({"acc": f"{row['eval_accuracy']:.2f}"} if "eval_accuracy" in row else {}))
                if self.consecutive_skips >= cfg.max_consecutive_skips:
                    path = self.save(done)
                    good = done - self.consecutive_skips
                    raise TrainingStopped(
                        f"stopped at step {done}: {self.consecutive_skips} consecutive updates had a non-finite loss "
                        f"or gradient norm (--max-consecutive-skips {cfg.max_consecutive_skips}); the weights of the "
                        f"last good update (step {good}) are saved in {path or ckpt.checkpoint_dir(self.run_dir, done)}; "
                        "try a lower --lr or check the objective and rewards")
                if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                    self.save(done)
        finally:
            if bar is not None:
                bar.close()
        self.stop.check("the final evaluation")
        acc = self.evaluate()
        self._write_metrics({"step": cfg.steps, "eval_accuracy": acc})
        path = self.save(cfg.steps, finished=True)
        summary.update(eval_accuracy_after=acc, last_step=last, checkpoint=str(path) if path else None)
        self._note(f"eval accuracy after {cfg.steps} steps: {acc:.3f}")
        if path:
            self._note(f"final checkpoint: {path} (AutoModelForCausalLM.from_pretrained('{path / 'model'}'))")
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


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    if path.exists():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
