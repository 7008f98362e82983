"""The continual runner: trains the sequence stage by stage, measures after each (see :mod:`denser.continual`)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from denser.analysis.forgetting import continual_metrics
from denser.analysis.params import ParameterDrift
from denser.analysis.suite import EvalSuite
from denser.continual.config import ContinualConfig, default_run_dir
from denser.continual.measure import StageMeasurer
from denser.continual.record import (
    IN_PROGRESS,
    finite,
    mark_in_progress,
    prepare_run_dir,
    record_header,
    resume_point,
    save_record,
    write_json,
)
from denser.engines.base import EngineSpec
from denser.objectives import Objective, get_objective
from denser.tasks import get_task
from denser.trainers import checkpoint as ckpt
from denser.trainers import lora, sharded_checkpoint
from denser.trainers.config import EVAL_SIZE_CAP, TrainConfig
from denser.trainers.loop import Trainer, accelerator_for
from denser.trainers.models import load_model
from denser.trainers.preemption import Interrupted, StopControl, StopSignals, signal_name
from denser.trainers.resolve import apply_run_defaults, resolve_run
from denser.trainers.sharding import ModelCall, Sharding
from denser.trainers.tracking import Tracker


class ContinualRunner:
    """``ContinualRunner(cfg, objective, ccfg).run()`` trains the sequence and returns ``continual.json``'s dict.

    Args:
        cfg: the run flags shared by every stage, as the user gave them (None: not set; the objective's
            ``run_defaults()`` apply there, and each stage resolves the rest with its task, as
            :func:`~denser.trainers.resolve.resolve_run` does) (``model`` is the starting model; ``steps`` and
            ``task`` are set per stage; ``output_dir`` is the continual run's directory).
        objective: the objective instance (each stage gets a fresh copy).
        ccfg: the sequence (:class:`~denser.continual.config.ContinualConfig`).
        log: where progress lines go.
        stop_signals: SIGTERM / Ctrl-C (:class:`~denser.trainers.preemption.StopSignals`): a stop
            request raises :class:`~denser.trainers.preemption.Interrupted` at the next check point
            (inside a stage: after the stage's trainer saved its last finished step); its
            ``message`` says where the run stopped and how to continue it.
    """

    def __init__(self, cfg: TrainConfig, objective: Objective | None, ccfg: ContinualConfig, *, log=print,
                 stop_signals: StopSignals | None = None, engine: EngineSpec | None = None):
        self.cfg, self.ccfg, self.log = cfg, ccfg, log
        # every stage's rollouts and the measurements (a spec names its engine: it replaces cfg.engine)
        self.engine = engine if engine is not None else EngineSpec(cfg.engine)
        cfg = dataclasses.replace(cfg, engine=self.engine.name)
        if cfg.lora_r and not ccfg.lora_stages:
            raise ValueError("denser continual --lora-r needs --lora-stages: merge (each stage's adapter becomes part "
                             "of the weights, the next stage trains a fresh one) or keep (one adapter through every "
                             "stage)")
        if ccfg.lora_stages and not cfg.lora_r:
            raise ValueError(f"--lora-stages {ccfg.lora_stages} needs --lora-r (a LoRA run); drop --lora-stages")
        if ccfg.lora_stages == "merge" and ccfg.carry_optimizer:
            raise ValueError("--carry-optimizer with --lora-stages merge: every stage trains a fresh adapter, which has "
                             "no AdamW state to carry; use --lora-stages keep, or drop --carry-optimizer")
        if cfg.lora_r and ccfg.teacher_reset:
            raise ValueError("--teacher-reset with --lora-r is not supported: a LoRA run's frozen and trust-region "
                             "teachers are the base model; drop --teacher-reset")
        self.objective = objective if objective is not None else get_objective(cfg.objective)
        # the objective's run defaults (dapo: dynamic sampling) where the user set nothing; each stage's
        # Trainer resolves the rest with its task (resolve_run: max_new_tokens, eval_size, old_logp source)
        self.cfg = cfg = apply_run_defaults(dataclasses.replace(cfg, objective=self.objective.name), self.objective)
        self.run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(self.objective.name)
        self.updates = 0  # optimiser updates so far over the whole sequence: names the current weights
        self.command: str | None = None  # the command line, recorded in continual.json
        self.stage_probe: dict | None = None  # --teacher-probe: the current stage's teacher at its start
        self.resume_command: str | None = None  # what continues this run after a stop (default: built from cfg)
        self.stop_signals = stop_signals
        # the processes of a torchrun / accelerate launch (DDP or FSDP): every one trains and measures,
        # the main one writes the record; under FSDP every model is sharded (self.sharding)
        self.accelerator = accelerator_for(cfg)
        self.world, self.is_main = self.accelerator.num_processes, self.accelerator.is_main_process
        if not self.is_main:
            self.log = lambda *a, **k: None
        self.stop = StopControl(stop_signals, world=self.world, device=self.accelerator.device)
        self.sharding = Sharding.for_run(self.accelerator, cfg.fsdp, mixed_precision=cfg.mixed_precision)
        if ccfg.teacher_probe and self.world > 1:  # its forwards are one process's, outside the sharded roots
            raise ValueError("--teacher-probe measures in one process; run it without accelerate/torchrun, or drop "
                             "--teacher-probe")

    def _prepare(self) -> dict | None:
        """Create the run directory (the main process); return the previous record when resuming."""
        identity = {"objective": self.objective.name, "train_tasks": self.ccfg.tasks,
                    "heldout_tasks": self.ccfg.eval_tasks, "model": self.cfg.model}
        out: list[Any] = [None]
        if self.is_main:
            try:
                out = [prepare_run_dir(self.run_dir, identity, resume=self.cfg.resume, overwrite=self.cfg.overwrite,
                                       log=self.log)]
            except ValueError as e:
                out = [e]
        if self.world > 1:  # every process continues from the same record, or fails with the same error
            from accelerate.utils import broadcast_object_list

            out = broadcast_object_list(out, from_process=0)
        if isinstance(out[0], ValueError):
            raise out[0]
        return out[0]

    # ------------------------------------------------------------------------------------ stages

    def _stage_dir(self, k: int, task: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in task)
        return self.run_dir / "stages" / f"{k:02d}-{safe}"

    def _lora_chain(self, record: dict) -> lora.AdapterChain | None:
        """With --lora-r: the adapters of the stages trained so far (their final checkpoints' ``model/``)."""
        if not self.cfg.lora_r:
            return None
        return lora.AdapterChain(self.ccfg.lora_stages, tuple(str(Path(st["checkpoint"]) / "model")
                                                              for st in record["stages"][1:]))

    def _train_stage(self, k: int, task_name: str, model_path: str, optimizer_state, teacher_state, *,
                     resume: bool = False, lora_chain: lora.AdapterChain | None = None):
        """Stage ``k``: a Trainer from ``model_path`` whose frozen reference and frozen teacher are the
        initial model of the whole sequence, with the carried optimizer and EMA teacher state (with
        ``--teacher-reset``: a teacher that starts from ``model_path``). ``resume``: the stage had
        started; its trainer continues from the newest checkpoint in its directory."""
        stage_cfg = dataclasses.replace(self.cfg, model=model_path, task=task_name, steps=self.ccfg.steps_per_task,
                                        output_dir=str(self._stage_dir(k, task_name)), resume=resume,
                                        overwrite=not resume)
        base = self.updates
        # as denser train's
        run = resolve_run(stage_cfg, copy.deepcopy(self.objective), self.task_objs[task_name], engine=self.engine)
        trainer = Trainer(run, log=self.log,
                          anchor=self.initial, optimizer_state=optimizer_state if self.ccfg.carry_optimizer else None,
                          teacher_state=None if self.ccfg.teacher_reset else teacher_state,
                          teacher_from_policy=self.ccfg.teacher_reset,
                          evaluator=self.measurer.evaluator(task_name, base, f"the evaluation in stage {k}"),
                          tracker=self.tracker.scoped(f"stage{k}/{task_name}/",
                                                      step_offset=(k - 1) * self.ccfg.steps_per_task),
                          stop_signals=self.stop_signals, lora_chain=lora_chain)
        self.stage_probe = self.measurer.teacher_probe(k, task_name, trainer) if self.ccfg.teacher_probe else None
        t0 = time.perf_counter()
        summary = trainer.train()
        elapsed = time.perf_counter() - t0
        if summary.get("already_complete"):  # stopped during the stage's measurement: only that is left
            rng = ckpt.rng_state()  # the streams the final checkpoint restored: the measurement starts from them
            trainer.evaluate_all()  # the stage task's responses, generated as the trainer's last eval did
            ckpt.set_rng_state(rng)
        self.updates += int(trainer.scheduler.last_epoch)
        rows = []
        metrics_path = Path(stage_cfg.output_dir) / "metrics.jsonl"
        if metrics_path.exists():
            rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        steps = [r for r in rows if "reward_mean" in r]

        def mean(key):
            vals = [r[key] for r in steps if r.get(key) is not None]
            return sum(vals) / len(vals) if vals else None

        info = {"steps": len(steps), "updates": int(trainer.scheduler.last_epoch),
                "skipped": sum(int(r.get("skipped", 0)) for r in steps), "time_s": elapsed,
                "reward_mean": mean("reward_mean"), "success_rate": mean("success_rate"), "loss": mean("loss"),
                "response_length": mean("response_length"), "step_time_s": mean("step_time_s"),
                "steps_log": [{k: r.get(k) for k in ("step", "reward_mean", "success_rate", "loss", "grad_norm",
                                                     "response_length", "truncated_frac", "step_time_s")}
                              for r in steps]}
        checkpoint = summary.get("checkpoint")  # the main process's (it wrote it); the same path for the others
        if not checkpoint and not self.is_main:
            checkpoint = str(ckpt.checkpoint_dir(Path(stage_cfg.output_dir), self.ccfg.steps_per_task))
        if not checkpoint:
            raise RuntimeError(f"stage {k} ({task_name}) wrote no final checkpoint")
        return trainer, info, Path(checkpoint)

    # ------------------------------------------------------------------------------------- run

    def run(self) -> dict:
        """Train and measure the sequence (with ``--resume``: from where the record says it stopped)."""
        cfg = self.cfg
        config = {**dataclasses.asdict(cfg), "objective": self.objective.name,
                  "continual": dataclasses.asdict(self.ccfg), "objective_args": dataclasses.asdict(self.objective)}
        self.tracker = Tracker(cfg.report_to if self.is_main else [], self.run_dir, project=cfg.tracker_project,
                               config=config, cpu=cfg.cpu or not torch.cuda.is_available())
        try:
            return self._run()
        finally:
            self.tracker.finish()

    def _log_stage(self, stage: dict, record: dict) -> None:
        """The tracker row of a measured stage: accuracy per column, averages, drift."""
        train, held = self.ccfg.tasks, self.ccfg.eval_tasks
        acc = stage["accuracy"]

        def mean(cols):
            vals = [acc[c] for c in cols if acc.get(c) is not None]
            return sum(vals) / len(vals) if vals else None

        row = {f"eval/{c}/accuracy": acc[c] for c in record["columns"]}
        row.update({
            "eval/average_accuracy": mean(record["columns"]),
            "eval/seen_average_accuracy": mean(train[:stage["stage"]]) if stage["stage"] else None,
            "eval/heldout_average_accuracy": mean(held),
            "drift/relative_l2": (stage.get("params") or {}).get("relative_l2"),
            "drift/kl": ((stage.get("eval") or {}).get("overall") or {}).get("kl"),
            "stage": stage["stage"],
        })
        self.tracker.log({k: v for k, v in row.items() if v is not None},
                         step=stage["stage"] * self.ccfg.steps_per_task)

    def _setup(self) -> None:
        """Tasks, the eval suite, the initial model and the measurer (before any stage)."""
        cfg, ccfg = self.cfg, self.ccfg
        self.task_objs = {n: get_task(n, seed=cfg.seed) for n in ccfg.tasks + ccfg.eval_tasks}
        if cfg.max_new_tokens == 0:  # one budget for every stage and every eval: the largest the tasks suggest
            budget = max(int(t.suggested_max_new_tokens) for t in self.task_objs.values())
            self.cfg = cfg = dataclasses.replace(cfg, max_new_tokens=budget)
        suite = EvalSuite(self.task_objs, eval_size=cfg.eval_size or EVAL_SIZE_CAP,
                          max_new_tokens=cfg.max_new_tokens, backend=cfg.backend, engine=self.engine)
        # FSDP: built empty, each process reads its own rows as it is sharded (trainers/sharded_load.py)
        self.initial, tokenizer = load_model(cfg.model, dtype=getattr(torch, cfg.dtype), seed=cfg.seed,
                                             empty=self.sharding is not None and not cfg.lora_r)
        self.initial.eval().requires_grad_(False)
        if self.sharding is not None:  # sharded once: every stage's reference and frozen teacher share its shards
            self.sharding.shard(ModelCall(self.initial), frozen=True)
        else:
            self.initial.to(torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu"))
        # sharded: the initial weights are gathered one parameter at a time at each measurement, never copied
        meter = ParameterDrift(self.initial, rank=max(1, ccfg.spectral_rank), spectral=ccfg.spectral_rank > 0)
        self.measurer = StageMeasurer(suite, tokenizer, self.initial, meter, self.run_dir, cfg, ccfg, stop=self.stop,
                                      is_main=self.is_main)

    def _run(self) -> dict:
        previous = self._prepare()
        t_start = time.perf_counter()
        self._setup()
        cfg, ccfg, measurer = self.cfg, self.ccfg, self.measurer
        record = record_header(self.objective, cfg, ccfg, self.command)
        model_path, optimizer_state, teacher_state = cfg.model, None, None
        done, in_stage = 0, False
        try:  # a stop before stage 0 is measured ends its generation; after that, stages check at their start
            if previous and previous.get("stages"):
                record["stages"] = previous["stages"]
                record["accuracy_matrix"] = previous["accuracy_matrix"]
                record["elapsed_s"] = previous.get("elapsed_s", 0.0)
                done, in_stage = dataclasses.astuple(resume_point(previous, self._stage_dir, ccfg.tasks, self.log))
                self.updates = int(record["stages"][-1]["updates"])
                measurer.load_reference()
                if done > 0:
                    last = Path(record["stages"][-1]["checkpoint"])
                    model_path = cfg.model if cfg.lora_r else str(last / "model")  # LoRA: the base, never changed
                    state, _, teacher_state = ckpt.load_train_state(last)
                    optimizer_state = state["optimizer"] if ccfg.carry_optimizer else None
                    if sharded_checkpoint.has_shards(last):  # FSDP's: read by the next stage's processes
                        optimizer_state = sharded_checkpoint.ShardedState(last) if ccfg.carry_optimizer else None
                        teacher_state = sharded_checkpoint.ShardedState(last)
                    if ccfg.lora_stages == "merge":  # a fresh adapter: its EMA teacher starts from the stage's start
                        teacher_state = None
                inside = f", inside stage {done + 1}" if in_stage else ""
                self.log(f"resuming {self.run_dir} after stage {done}{inside}")
            else:
                if ccfg.initial_eval_from:
                    stage0 = measurer.reuse_stage0(record, Path(ccfg.initial_eval_from))
                    self.log(f"stage 0: reusing the initial measurement of {ccfg.initial_eval_from}")
                else:
                    self.log(f"stage 0: measuring {cfg.model} on {', '.join(measurer.suite.names)} "
                             f"({', '.join(str(len(r)) for r in measurer.suite.rows.values())} prompts)")
                    stage0 = measurer.measure(0, None, self.initial, 0, None, None)
                self._log_stage(stage0, record)
                record["stages"] = [stage0]
                record["accuracy_matrix"] = [[stage0["accuracy"][c] for c in record["columns"]]]
                record["elapsed_s"] = time.perf_counter() - t_start
                self._save(record)
            if cfg.lora_r:  # from here the initial model is every stage's base: no copy of it is kept
                self.initial = measurer.initial = None
                measurer.meter.reads(None)
                gc.collect()
            elapsed_before = record.get("elapsed_s", 0.0)
            t_start = time.perf_counter()

            for k in range(done + 1, len(ccfg.tasks) + 1):
                name = ccfg.tasks[k - 1]
                self.stop.check(f"the start of stage {k}")
                resume = in_stage and k == done + 1
                if not resume:
                    self.log(f"stage {k}/{len(ccfg.tasks)}: {self.objective.name} on {name} for "
                             f"{ccfg.steps_per_task} steps")
                if self.is_main:
                    mark_in_progress(self.run_dir, record, k, name, self._stage_dir(k, name))
                trainer, info, checkpoint = self._train_stage(k, name, model_path, optimizer_state, teacher_state,
                                                              resume=resume, lora_chain=self._lora_chain(record))
                self.stop.check(f"the end of stage {k}")  # a stop during the final eval or save: measured on resume
                if cfg.lora_r:  # the base with every adapter disabled is the initial model itself: KL and drift
                    measurer.initial = lora.AdapterView(trainer.policy)
                    measurer.meter.reads(lora.effective_weights(trainer.policy, adapters=False))
                stage = measurer.measure(k, name, trainer.policy, self.updates, str(checkpoint), info)
                if self.stage_probe is not None:
                    stage["teacher_probe"] = self.stage_probe
                self._log_stage(stage, record)
                record.pop(IN_PROGRESS, None)
                record["stages"].append(stage)
                record["accuracy_matrix"].append([stage["accuracy"][c] for c in record["columns"]])
                record["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
                acc = ", ".join(f"{c} {stage['accuracy'][c]:.2f}" for c in record["columns"])
                self.log(f"stage {k} done: accuracy {acc}; relative L2 drift {stage['params']['relative_l2']:.2e}; "
                         f"KL to initial {stage['eval']['overall']['kl']:.3g}")
                model_path = cfg.model if cfg.lora_r else str(checkpoint / "model")
                carried = trainer.carry_state()
                optimizer_state = carried["optimizer_state"] if ccfg.carry_optimizer else None
                teacher_state = None if ccfg.lora_stages == "merge" else carried["teacher_state"]
                if cfg.lora_r:  # nothing of the stage's policy outlives it
                    measurer.initial = None
                    measurer.meter.reads(None)
                del trainer
                gc.collect()
                self._save(record)
        except Interrupted as stop:
            raise self._stopped(stop, record) from None

        record["status"] = "complete"
        record["metrics"] = finite(continual_metrics(record["accuracy_matrix"], ccfg.tasks, ccfg.eval_tasks))
        self._save(record)
        return record

    def _save(self, record: dict) -> None:
        if self.is_main:
            save_record(self.run_dir, record, self.log)

    # ------------------------------------------------------------------------------------ stops

    def _stopped(self, stop: Interrupted, record: dict) -> Interrupted:
        """After a stop request: the record says so, and ``stop.message`` says what is kept and how
        to continue (the stage's own checkpoint, when the stop came inside a stage's training)."""
        measured = len(record["stages"]) - 1  # -1: not even stage 0
        if record["stages"]:
            record["status"] = "stopped"
            if self.is_main:
                write_json(self.run_dir / "continual.json", finite(record))
        resume = self.resume_command or self._default_resume_command()
        started = record.get(IN_PROGRESS)
        if stop.step is not None and started is not None:  # inside a stage: its trainer saved what it could
            k, task = started["stage"], started["task"]
            kept = (f"stage {k} ({task}) had no finished step: it starts over on resume" if stop.checkpoint is None
                    else f"step {stop.step} of {self.ccfg.steps_per_task} of stage {k} ({task}) is saved in "
                         f"{stop.checkpoint}")
            stop.message = f"{stop.head}; {kept}; continue with: {resume}"
            return stop
        received = getattr(self.stop_signals, "received_at", None)
        timing = f" ({time.monotonic() - received:.1f} s from the signal)" if received is not None else ""
        head = f"stopped by {signal_name(stop.signum)} at {stop.where}{timing}"
        if measured < 0:
            stop.message = f"{head}: nothing was measured yet; rerun the same command to start over"
            return stop
        redo = (f"; stage {started['stage']} ({started['task']}) is trained, its measurement is done again on resume"
                if started is not None else "")
        kept = "stage 0 is measured" if measured == 0 else f"stages 0-{measured} are measured"
        stop.message = f"{head}; {kept} in {self.run_dir / 'continual.json'}{redo}; continue with: {resume}"
        return stop

    def _default_resume_command(self) -> str:
        return (f"denser continual --objective {self.objective.name} --tasks {','.join(self.ccfg.tasks)} ... "
                f"--output-dir {self.run_dir} --resume (the command that started the run, with --resume)")


def continual(config: TrainConfig | None = None, objective: str | Objective | None = None, *,
              tasks: Sequence[str], eval_tasks: Sequence[str] = (), log: Callable[[str], Any] = print,
              **options: Any) -> dict[str, Any]:
    """``denser continual`` from Python (``denser.continual(...)``): train ``objective`` on ``tasks`` in order from one model, measure
    every task (and the held-out ``eval_tasks``) after every stage; returns ``continual.json``'s dict (the
    run directory is ``config.output_dir``, default ``runs/continual-<objective>``).

    ``options`` are :class:`~denser.continual.ContinualConfig` fields (``steps_per_task``,
    ``carry_optimizer``, ``teacher_reset``, ``spectral_rank``, ...) and ``TrainConfig`` fields (``model``,
    ``lr``, ...), which replace ``config``'s; every stage is resolved as ``denser.train`` resolves a run
    (the objective's ``run_defaults()`` where nothing is set; the stage's task for the rest)."""
    names = {f.name for f in dataclasses.fields(ContinualConfig)}
    ccfg_values = {k: options.pop(k) for k in list(options) if k in names}
    try:
        ccfg = ContinualConfig(tasks=list(tasks), eval_tasks=list(eval_tasks), **ccfg_values)
        if config is not None and not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        if "task" in options or "steps" in options:
            raise ValueError("a continual run sets each stage's task and steps: pass tasks=[...] and steps_per_task")
        obj = objective if isinstance(objective, Objective) else get_objective(
            objective or options.get("objective") or (config.objective if config is not None else None)
            or TrainConfig().objective)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{unknown[0]!r} is neither a run option (TrainConfig) nor a continual option "
                             f"({', '.join(sorted(names))})")
        cfg = dataclasses.replace(config if config is not None else TrainConfig(), **options)
        cfg = apply_run_defaults(dataclasses.replace(cfg, objective=obj.name), obj)
    except ValueError as e:
        raise ValueError(f"denser.continual: {e}") from None
    return ContinualRunner(cfg, obj, ccfg, log=log).run()
