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
from denser.trainers.teacher import TeacherSettings, TeacherWeights, teacher_messages

LOOP_SIGNALS = frozenset(Signal)
TASK_SIGNALS = frozenset({Signal.REWARDS, Signal.ADVANTAGES, Signal.TEACHER})


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

    def __init__(self, cfg: TrainConfig, objective: Objective | None = None, *, task: Any = None, log=print):
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
        self.task = task if task is not None else get_task(cfg.task or DEFAULT_TASK, seed=cfg.seed)
        self.run_dir = Path(cfg.output_dir or f"runs/{self.objective.name}-{self.task.name}")
        self._prepare_run_dir()
        set_seed(cfg.seed + self.rank)

        dtype = getattr(torch, cfg.dtype)
        resume_from = ckpt.latest_checkpoint(self.run_dir) if cfg.resume else None
        if cfg.resume and resume_from is None:
            self.log(f"--resume: no complete checkpoint in {self.run_dir}; starting from step 0")
        policy, self.tokenizer = load_model(str(resume_from / "model") if resume_from else cfg.model,
                                            dtype=dtype, seed=cfg.seed)
        initial = None
        needs_initial = Signal.REF_LOGP in self.signals or getattr(self._teacher_opts(), "teacher", None) == "frozen"
        if needs_initial:
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
        self.start_step, self.metrics_rows = 0, 0
        if resume_from is not None:
            self._load_state(resume_from)
        self._perms: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------ setup

    def _teacher_opts(self):
        part = getattr(self.objective, "sdpo_part", None)
        return part() if callable(part) else self.objective

    def _prepare_run_dir(self) -> None:
        import yaml

        cfg, run = self.cfg, self.run_dir
        config = {**dataclasses.asdict(cfg), "objective": self.objective.name, "task": self.task.name,
                  "objective_args": dataclasses.asdict(self.objective)}
        existing = run / "config.yaml"
        if existing.exists() and not cfg.resume and not cfg.overwrite:
            raise ValueError(f"{run} already holds a run; pass --resume to continue it, --overwrite to replace it, "
                             "or choose another --output-dir")
        if existing.exists() and cfg.resume:
            old = yaml.safe_load(existing.read_text()) or {}
            diffs = [f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in ("objective", "model", "task")
                     if old.get(k) != config.get(k)]
            if diffs:
                raise ValueError(f"--resume: {run} holds a different run ({'; '.join(diffs)}); "
                                 "resume with the same objective, model and task, or use another --output-dir")
        if self.accelerator.is_main_process:
            if existing.exists() and cfg.overwrite:
                import shutil

                shutil.rmtree(run)
            run.mkdir(parents=True, exist_ok=True)
            existing.write_text(yaml.safe_dump(config, sort_keys=False))
        self.accelerator.wait_for_everyone()

    def _load_state(self, path: Path) -> None:
        state, trainer_state, teacher_state = ckpt.load_train_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        if self.teacher is not None:
            self.teacher.load_state_dict(teacher_state)
        self.start_step = int(trainer_state["step"])
        self.metrics_rows = int(trainer_state["metrics_rows"])
        self._truncate_metrics(self.metrics_rows)
        self.log(f"resumed from {path} (step {self.start_step})")

    def _truncate_metrics(self, rows: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if self.is_main and path.exists():
            lines = path.read_text().splitlines()[:rows]
            path.write_text("".join(line + "\n" for line in lines))

    # ------------------------------------------------------------------------------------- data

    def _rows_for_step(self, step: int) -> list[dict]:
        """Prompts of ``step`` on this process: a function of (seed, step, rank), so a resumed run
        sees exactly the prompts the uninterrupted run would have."""
        data = self.task.train
        n, per = len(data), self.cfg.prompts_per_step
        start = (step * self.world + self.rank) * per
        rows = []
        for k in range(start, start + per):
            epoch, pos = divmod(k, n)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
                self._perms[epoch] = torch.randperm(n, generator=g)
            rows.append(data[int(self._perms[epoch][pos])])
        return rows

    def _prompt_ids(self, rows: list[dict]) -> list[list[int]]:
        from denser.trainers.models import render_prompt

        ids = [render_prompt(self.tokenizer, self.task.prompt(r)) for r in rows]
        limit = getattr(self.policy.config, "max_position_embeddings", None)
        for r, p in zip(rows, ids):
            if limit and len(p) + self.cfg.max_new_tokens > limit:
                raise ValueError(f"a prompt of task {self.task.name!r} has {len(p)} tokens; with --max-new-tokens "
                                 f"{self.cfg.max_new_tokens} it exceeds the model's context of {limit} tokens")
        return ids

    # ------------------------------------------------------------------------------------- eval

    @torch.no_grad()
    def evaluate(self) -> float:
        """Greedy accuracy on the first ``eval_size`` rows of the eval split (all processes)."""
        from denser.trainers.rollout import SamplingParams

        data = self.task.eval
        idx = list(range(min(self.cfg.eval_size, len(data))))[self.rank::self.world]
        correct = torch.zeros(2, device=self.accelerator.device)
        if idx:
            rows = [data[i] for i in idx]
            params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, num_generations=1, do_sample=False)
            rollout = self.engine.generate(self._prompt_ids(rows), params)
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
        t0 = time.perf_counter()
        rows = self._rows_for_step(step)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_generations=cfg.num_generations,
                                temperature=cfg.temperature, top_p=cfg.top_p)
        self.policy.eval()
        rollout = self.engine.generate(self._prompt_ids(rows), params)
        self.policy.train()
        t_gen = time.perf_counter() - t0

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

    def save(self, step: int) -> Path | None:
        path = None
        if self.is_main:
            path = ckpt.save_checkpoint(
                self.run_dir, step, model=self.policy, tokenizer=self.tokenizer, optimizer=self.optimizer,
                scheduler=self.scheduler, trainer_state={"step": step, "metrics_rows": self.metrics_rows},
                teacher_state=self.teacher.state_dict() if self.teacher else None, keep_last=self.cfg.keep_last)
        self.accelerator.wait_for_everyone()
        return path

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        summary: dict[str, Any] = {"run_dir": str(self.run_dir)}
        if self.start_step == 0:
            acc = self.evaluate()
            summary["eval_accuracy_before"] = acc
            self.log(f"eval accuracy before training: {acc:.3f} ({self.task.name}, {cfg.eval_size} greedy prompts)")
            self._write_metrics({"step": 0, "eval_accuracy": acc})
        bar = None
        if cfg.progress and self.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.start_step, desc=f"{self.objective.name} on {self.task.name}",
                       unit="step", file=sys.stderr, dynamic_ncols=True)
        skips = 0
        last = None
        for step in range(self.start_step, cfg.steps):
            row = self.step(step)
            skips = skips + 1 if row["skipped"] else 0
            if row["skipped"]:
                self.log(f"warning: step {step + 1}: non-finite loss or gradient norm; update skipped "
                         f"({skips} in a row)")
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                row["eval_accuracy"] = self.evaluate()
            self._write_metrics(row)
            last = row
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=f"{row['reward_mean']:.2f}", loss=f"{row['loss']:.3g}",
                                **({"acc": f"{row['eval_accuracy']:.2f}"} if "eval_accuracy" in row else {}))
            if skips >= cfg.max_consecutive_skips:
                self.save(done)
                if bar is not None:
                    bar.close()
                raise RuntimeError(f"stopped after {skips} consecutive non-finite updates at step {done}; the last good "
                                   f"weights are in {ckpt.checkpoint_dir(self.run_dir, done)} (try a lower --lr)")
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                self.save(done)
        if bar is not None:
            bar.close()
        acc = self.evaluate()
        self._write_metrics({"step": cfg.steps, "eval_accuracy": acc})
        path = self.save(cfg.steps)
        summary.update(eval_accuracy_after=acc, last_step=last, checkpoint=str(path) if path else None)
        self.log(f"eval accuracy after {cfg.steps} steps: {acc:.3f}")
        if path:
            self.log(f"final checkpoint: {path} (AutoModelForCausalLM.from_pretrained('{path / 'model'}'))")
        return summary
