"""Continual post-training: one model trained on a sequence of tasks, measured after every stage.

    denser continual --objective sdpo --tasks addition,compare,reverse --eval-tasks logic,format \\
        --steps-per-task 4 --model default

Stage 0 is the model before training; stage k trains ``--steps-per-task`` steps on the k-th task,
starting from stage k-1's final weights. Every stage is an ordinary :class:`~denser.trainers.loop.Trainer`
run in ``<run>/stages/NN-<task>/`` (its own ``config.yaml``, ``metrics.jsonl`` and a final
checkpoint loadable by ``from_pretrained``), so everything the loop does (signals, NaN guards,
checkpoints) is the same as for ``denser train``. Between stages the runner carries:

- the weights (always): stage k's model is stage k-1's final checkpoint;
- the AdamW state (``--carry-optimizer``) or a fresh optimizer (``--reset-optimizer``, the
  default, as when each stage is a separate fine-tuning job). The learning-rate schedule (and any
  schedule of the objective, e.g. hybrid's density schedule) restarts in every stage;
- the SDPO EMA teacher (when the objective has one): it keeps averaging across stages; with
  ``--teacher-reset`` the teacher restarts from the stage's starting policy every stage instead
  (``ema``, ``frozen`` and the ``trust-region`` reference alike), as SDPO-CL's runs restarted per
  stage do;
- anchors stay at the start of the sequence: a ``frozen`` SDPO teacher, the ``trust-region``
  reference (unless ``--teacher-reset``) and the GRPO reference model (``kl_coef > 0``, always) are
  the initial model of stage 0 in every stage, not the stage's start.

Before training and after every stage the runner measures, on fixed prompts (the first
``--eval-size`` rows of each task's eval split) of every training task and every ``--eval-tasks``
task (held out: never trained on): greedy accuracy (the accuracy matrix), parameter drift from
the initial weights, response drift from the initial model's responses and formatting artifacts
(:mod:`denser.analysis`), each accuracy with its standard error over prompts. With
``--eval-samples n`` it also records mean@n (``n`` completions per prompt at ``--eval-temperature``
and ``--eval-top-p``, seeded) per task, at the stages ``--sampled-eval-stages`` selects (``first-last``:
stage 0 and the last stage, the default; ``all``; ``none``): ``stages[k]["sampled_accuracy"]``.
``--eval-size 0`` (the default) takes each task's whole eval split, at most 64 rows;
``--max-new-tokens 0`` (the default) is the largest ``suggested_max_new_tokens`` of the sequence's
tasks, for every stage and every eval. ``<run>/continual.json`` holds everything, rewritten after every stage;
``<run>/report.md`` and ``<run>/plots/*.png`` are rendered from it; the responses themselves are
in ``<run>/responses/stage-NNN.jsonl``.

Each stage's Trainer gets these as constructor arguments (``anchor``, ``optimizer_state``,
``teacher_state``, from the previous stage's ``Trainer.carry_state()``), and its own
before/after evaluation in ``Trainer.train()`` is the same fixed-prompt evaluator (its
``evaluator`` argument), so nothing is generated twice and the stage's ``metrics.jsonl`` shows
the accuracies of the matrix. Single process only.

With ``--report-to``, the whole sequence is one tracker run (:mod:`denser.trainers.tracking`): each
stage's trainer logs through a view of it (``Trainer(tracker=...)``) with stage-prefixed keys
(``stage1/addition/reward_mean``) and steps counted over the sequence (stage k's step j is
``(k - 1) * steps_per_task + j``); after every stage the runner logs the accuracy of every column
(``eval/<task>/accuracy``), the averages and the drift (``drift/relative_l2``, ``drift/kl``).

This module sits above :mod:`denser.analysis` and :mod:`denser.trainers` and drives both; the
command line (``denser continual``) is in :mod:`denser.cli`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from denser.analysis.estimators import mean_stderr
from denser.analysis.forgetting import continual_metrics
from denser.analysis.params import ParameterDrift
from denser.analysis.report import write_run_report
from denser.analysis.responses import Generations
from denser.analysis.suite import EvalSuite, generations_to_rows
from denser.objectives import Objective, get_objective
from denser.tasks import get_task, list_tasks
from denser.trainers import checkpoint as ckpt
from denser.trainers.config import EVAL_SIZE_CAP, TrainConfig
from denser.trainers.loop import Trainer
from denser.trainers.models import load_model
from denser.trainers.tracking import TENSORBOARD_DIR, Tracker

FORMAT_VERSION = 1
SAMPLED_EVAL_STAGES = ("first-last", "all", "none")
# what a continual run writes
RUN_FILES = ("continual.json", "report.md", "plots", "responses", "stages", TENSORBOARD_DIR)


@dataclass
class ContinualConfig:
    """What ``denser continual`` adds to the run flags of ``denser train``."""

    tasks: list[str] = field(default_factory=list)
    eval_tasks: list[str] = field(default_factory=list)
    steps_per_task: int = 4
    carry_optimizer: bool = False
    spectral_rank: int = 16  # 0 = no spectral drift
    initial_eval_from: str = ""  # a continual run whose stage-0 measurement (same model and eval) is reused
    teacher_reset: bool = False  # the teacher restarts from each stage's starting policy (else: EMA carried, frozen = stage 0)
    sampled_eval_stages: str = "first-last"  # stages measured with --eval-samples too: first-last | all | none

    def __post_init__(self) -> None:
        self.tasks = [t.strip() for t in self.tasks if t.strip()]
        self.eval_tasks = [t.strip() for t in self.eval_tasks if t.strip()]
        problems = []
        if not self.tasks:
            problems.append("--tasks needs at least one task (comma-separated, e.g. addition,compare,reverse)")
        for group in (self.tasks, self.eval_tasks):
            dup = sorted({t for t in group if group.count(t) > 1})
            if dup:
                problems.append(f"task {dup[0]!r} is listed twice; each task appears once in a sequence")
        both = sorted(set(self.tasks) & set(self.eval_tasks))
        if both:
            problems.append(f"held-out task {both[0]!r} is also a training task; --eval-tasks are never trained on")
        known = set(list_tasks())
        for t in self.tasks + self.eval_tasks:
            if not t.startswith(("file:", "hf:")) and t.partition("?")[0] not in known:
                problems.append(f"unknown task {t!r}; known tasks: {', '.join(sorted(known))}, or file:PATH.jsonl, "
                                "hf:NAME[:CONFIG]")
        if self.steps_per_task < 1:
            problems.append(f"--steps-per-task must be >= 1, got {self.steps_per_task}")
        if self.spectral_rank < 0:
            problems.append(f"--spectral-rank must be >= 0, got {self.spectral_rank}")
        if self.sampled_eval_stages not in SAMPLED_EVAL_STAGES:
            problems.append(f"--sampled-eval-stages must be one of {', '.join(SAMPLED_EVAL_STAGES)}, "
                            f"got {self.sampled_eval_stages!r}")
        if problems:
            raise ValueError("; ".join(problems))


def default_run_dir(objective: str) -> Path:
    return Path(f"runs/continual-{objective}")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=_json_default))
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _finite(x):
    """NaN/inf -> None, recursively (continual.json is strict JSON)."""
    if isinstance(x, float):
        return x if x == x and abs(x) != float("inf") else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


class ContinualRunner:
    """``ContinualRunner(cfg, objective, ccfg).run()`` trains the sequence and returns ``continual.json``'s dict.

    Args:
        cfg: the run flags shared by every stage (``model`` is the starting model; ``steps`` and
            ``task`` are set per stage; ``output_dir`` is the continual run's directory).
        objective: the objective instance (each stage gets a fresh copy).
        ccfg: the sequence (:class:`ContinualConfig`).
        log: where progress lines go.
    """

    def __init__(self, cfg: TrainConfig, objective: Objective | None, ccfg: ContinualConfig, *, log=print):
        self.cfg, self.ccfg, self.log = cfg, ccfg, log
        self.objective = objective if objective is not None else get_objective(cfg.objective)
        self.run_dir = Path(cfg.output_dir) if cfg.output_dir else default_run_dir(self.objective.name)
        self.updates = 0  # optimiser updates so far over the whole sequence: names the current weights
        self.command: str | None = None  # the command line, recorded in continual.json
        self._cache: dict[tuple[str, int], Any] = {}

    # ------------------------------------------------------------------------------------ setup

    def _prepare(self) -> dict | None:
        """Create the run directory; return the previous record when resuming."""
        path = self.run_dir / "continual.json"
        if (self.run_dir / "config.yaml").exists():
            raise ValueError(f"{self.run_dir} holds a `denser train` run; choose another --output-dir")
        if path.exists() and not (self.cfg.resume or self.cfg.overwrite):
            raise ValueError(f"{self.run_dir} already holds a continual run; pass --resume to continue it, "
                             "--overwrite to replace it, or choose another --output-dir")
        if self.cfg.overwrite:  # only what a continual run writes, never the rest of the directory
            for name in RUN_FILES:
                p = self.run_dir / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        previous = None
        if path.exists() and self.cfg.resume:
            previous = json.loads(path.read_text())
            mine = {"objective": self.objective.name, "train_tasks": self.ccfg.tasks,
                    "heldout_tasks": self.ccfg.eval_tasks, "model": self.cfg.model}
            diffs = [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in mine.items() if previous.get(k) != v]
            if diffs:
                raise ValueError(f"--resume: {self.run_dir} holds a different continual run ({'; '.join(diffs)})")
        elif self.cfg.resume:
            self.log(f"--resume: no continual run in {self.run_dir}; starting from stage 0")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "responses").mkdir(exist_ok=True)
        return previous

    def _record_header(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "denser.continual",
            "objective": self.objective.name,
            "objective_args": dataclasses.asdict(self.objective),
            "model": self.cfg.model,
            "train_tasks": list(self.ccfg.tasks),
            "heldout_tasks": list(self.ccfg.eval_tasks),
            "columns": list(self.ccfg.tasks) + list(self.ccfg.eval_tasks),
            "continual": dataclasses.asdict(self.ccfg),
            "config": dataclasses.asdict(self.cfg),
            "eval": {"eval_size": self.cfg.eval_size, "max_new_tokens": self.cfg.max_new_tokens, "decoding": "greedy",
                     "sampled": ({"samples": self.cfg.eval_samples, "temperature": self.cfg.eval_temperature,
                                  "top_p": self.cfg.eval_top_p, "seed": self.cfg.seed,
                                  "stages": self.ccfg.sampled_eval_stages}
                                 if self.cfg.eval_samples and self.ccfg.sampled_eval_stages != "none" else None),
                     "similarity": "difflib.SequenceMatcher ratio vs the initial model's response",
                     "kl": "mean per-token KL(current || initial) on the current model's greedy responses",
                     "ngram": 3},
            "command": self.command,
            "status": "running",
            "stages": [],
            "accuracy_matrix": [],
            "metrics": None,
        }

    # ------------------------------------------------------------------------------------- eval

    def _generate(self, model, names: list[str], version: int) -> dict:
        """Responses of the weights numbered ``version`` to ``names``' fixed prompts, generated once."""
        missing = [n for n in names if (n, version) not in self._cache]
        if missing:
            for n, gens in self.suite.generate_many(model, self.tokenizer, missing).items():
                self._cache[(n, version)] = gens
        return {n: self._cache[(n, version)] for n in names}

    def _drop_cache_before(self, version: int) -> None:
        for key in [k for k in self._cache if k[1] < version]:
            del self._cache[key]

    def _evaluator(self, name: str) -> Callable[[Trainer], dict]:
        """A stage trainer's ``evaluator`` (called by ``train()`` before and after the stage): the
        fixed-prompt suite on task ``name``, keyed by the weights' update count so nothing is
        generated twice."""
        base = self.updates

        def evaluate(trainer: Trainer) -> float:
            version = base + int(trainer.scheduler.last_epoch)
            success = self._generate(trainer.policy, [name], version)[name].extra["success"]
            mean, se = mean_stderr([float(x) for x in success])
            return {"eval_accuracy": mean, "eval_accuracy_se": se}

        return evaluate

    def _measure(self, stage: int, task: str | None, model, checkpoint: str | None, train_info: dict | None) -> dict:
        t0 = time.perf_counter()
        version = self.updates
        first = stage == 0
        record, gens = self.suite.measure(model, self.tokenizer, initial=None if first else self.initial,
                                          reference=None if first else self.reference,
                                          generate=lambda names: self._generate(model, names, version))
        if first:  # the initial model against itself: no drift by definition (saves two forwards per prompt)
            self.reference = gens
            for rec in (*record["tasks"].values(), record["overall"]):
                rec.update(kl=0.0, similarity=1.0, token_f1=1.0)
        sampled = self._sampled(stage, model)
        for name, values in sampled.items():
            mean, se = mean_stderr(values)
            record["tasks"][name]["sampled"] = {"n": self.cfg.eval_samples, "mean_at_n": mean, "mean_at_n_se": se}
        params = self.meter(model)
        self._save_responses(stage, gens)
        self._drop_cache_before(version)
        return _finite({
            "stage": stage,
            "task": task,
            "checkpoint": checkpoint,
            "updates": version,
            "accuracy": record["accuracy"],
            "accuracy_se": {n: record["tasks"][n]["accuracy_se"] for n in self.suite.names},
            "sampled_accuracy": {n: record["tasks"][n]["sampled"]["mean_at_n"] for n in sampled} or None,
            "eval": {"tasks": record["tasks"], "overall": record["overall"]},
            "params": params,
            "train": train_info,
            "measure_time_s": time.perf_counter() - t0,
        })

    def _sampled(self, stage: int, model) -> dict[str, list[float]]:
        """Per task, the per-prompt mean@n values of the stages ``--sampled-eval-stages`` selects (the
        first and the last by default: sampling costs ``--eval-samples`` times a greedy eval); empty
        without ``--eval-samples``."""
        which = self.ccfg.sampled_eval_stages
        chosen = which == "all" or (which == "first-last" and stage in (0, len(self.ccfg.tasks)))
        if not self.cfg.eval_samples or not chosen:
            return {}
        cfg = self.cfg
        return self.suite.sample_many(model, self.tokenizer, self.suite.names, samples=cfg.eval_samples,
                                      temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, seed=cfg.seed)

    def _save_responses(self, stage: int, gens) -> None:
        rows = [r for name in self.suite.names for r in generations_to_rows(name, gens[name])]
        path = self.run_dir / "responses" / f"stage-{stage:03d}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def _load_reference(self, run_dir: Path):
        """The initial model's responses saved by a run (texts and success flags are what is needed:
        similarity, and the stage-1 trainer's before-training accuracy)."""
        rows = [json.loads(line) for line in (run_dir / "responses" / "stage-000.jsonl").read_text().splitlines()]
        out = {}
        for name in self.suite.names:
            mine = [r for r in rows if r["task"] == name]
            out[name] = Generations(prompt_ids=[], completion_ids=[], texts=[r["text"] for r in mine],
                                    truncated=[r["truncated"] for r in mine],
                                    extra={"success": [r["success"] for r in mine], "answers": [r["answer"] for r in mine]})
            self._cache[(name, 0)] = out[name]
        return out

    def _reuse_stage0(self, record: dict) -> dict:
        """Stage 0 of another run of the same sequence: the initial model and the fixed prompts are the
        same, so is its measurement (greedy decoding); saves one evaluation per extra run."""
        src = Path(self.ccfg.initial_eval_from)
        other = json.loads((src / "continual.json").read_text()) if (src / "continual.json").is_file() else None
        if other is None or not other.get("stages"):
            raise ValueError(f"--initial-eval-from {src}: no continual run with a measured stage 0 there")
        mine = {"model": self.cfg.model, "columns": record["columns"], "eval": record["eval"],
                "seed": self.cfg.seed, "dtype": self.cfg.dtype, "spectral_rank": self.ccfg.spectral_rank}
        theirs = {"model": other.get("model"), "columns": other.get("columns"), "eval": other.get("eval"),
                  "seed": (other.get("config") or {}).get("seed"), "dtype": (other.get("config") or {}).get("dtype"),
                  "spectral_rank": (other.get("continual") or {}).get("spectral_rank")}
        diffs = [f"{k}: {theirs[k]!r} vs {v!r}" for k, v in mine.items() if theirs[k] != v]
        if diffs:
            raise ValueError(f"--initial-eval-from {src}: a different initial measurement ({'; '.join(diffs)})")
        shutil.copyfile(src / "responses" / "stage-000.jsonl", self.run_dir / "responses" / "stage-000.jsonl")
        self.reference = self._load_reference(self.run_dir)
        self.log(f"stage 0: reusing the initial measurement of {src}")
        return {**other["stages"][0], "reused_from": str(src)}

    # ------------------------------------------------------------------------------------ stages

    def _stage_dir(self, k: int, task: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in task)
        return self.run_dir / "stages" / f"{k:02d}-{safe}"

    def _train_stage(self, k: int, task_name: str, model_path: str, optimizer_state, teacher_state):
        """Stage ``k``: a Trainer from ``model_path`` whose frozen reference and frozen teacher are the
        initial model of the whole sequence, with the carried optimizer and EMA teacher state (with
        ``--teacher-reset``: a teacher that starts from ``model_path``)."""
        stage_cfg = dataclasses.replace(self.cfg, model=model_path, task=task_name, steps=self.ccfg.steps_per_task,
                                        output_dir=str(self._stage_dir(k, task_name)), resume=False, overwrite=True)
        trainer = Trainer(stage_cfg, copy.deepcopy(self.objective), task=self.task_objs[task_name], log=self.log,
                          anchor=self.initial, optimizer_state=optimizer_state if self.ccfg.carry_optimizer else None,
                          teacher_state=None if self.ccfg.teacher_reset else teacher_state,
                          teacher_from_policy=self.ccfg.teacher_reset, evaluator=self._evaluator(task_name),
                          tracker=self.tracker.scoped(f"stage{k}/{task_name}/",
                                                      step_offset=(k - 1) * self.ccfg.steps_per_task))
        if trainer.world > 1:
            raise ValueError("denser continual runs in a single process; launch it without accelerate/torchrun")
        t0 = time.perf_counter()
        summary = trainer.train()
        elapsed = time.perf_counter() - t0
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
        checkpoint = summary.get("checkpoint")
        if not checkpoint:
            raise RuntimeError(f"stage {k} ({task_name}) wrote no final checkpoint")
        return trainer, info, Path(checkpoint)

    # ------------------------------------------------------------------------------------- run

    def run(self) -> dict:
        """Train and measure the sequence (resuming after the last finished stage with ``--resume``)."""
        cfg = self.cfg
        config = {**dataclasses.asdict(cfg), "objective": self.objective.name,
                  "continual": dataclasses.asdict(self.ccfg), "objective_args": dataclasses.asdict(self.objective)}
        self.tracker = Tracker(cfg.report_to, self.run_dir, project=cfg.tracker_project, config=config,
                               cpu=cfg.cpu or not torch.cuda.is_available())
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

    def _run(self) -> dict:
        cfg, ccfg = self.cfg, self.ccfg
        previous = self._prepare()
        t_start = time.perf_counter()
        self.task_objs = {n: get_task(n, seed=cfg.seed) for n in ccfg.tasks + ccfg.eval_tasks}
        if cfg.max_new_tokens == 0:  # one budget for every stage and every eval: the largest the tasks suggest
            budget = max(int(t.suggested_max_new_tokens) for t in self.task_objs.values())
            self.cfg = cfg = dataclasses.replace(cfg, max_new_tokens=budget)
        self.suite = EvalSuite(self.task_objs, eval_size=cfg.eval_size or EVAL_SIZE_CAP,
                               max_new_tokens=cfg.max_new_tokens, backend=cfg.backend)
        dtype = getattr(torch, cfg.dtype)
        self.initial, self.tokenizer = load_model(cfg.model, dtype=dtype, seed=cfg.seed)
        self.initial.eval().requires_grad_(False)
        device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
        self.initial.to(device)
        self.meter = ParameterDrift(self.initial, rank=max(1, ccfg.spectral_rank), spectral=ccfg.spectral_rank > 0)

        record = self._record_header()
        model_path, optimizer_state, teacher_state = cfg.model, None, None
        done = 0
        if previous and previous.get("stages"):
            record["stages"] = previous["stages"]
            record["accuracy_matrix"] = previous["accuracy_matrix"]
            record["elapsed_s"] = previous.get("elapsed_s", 0.0)
            done = len(record["stages"]) - 1
            self.updates = int(record["stages"][-1]["updates"])
            self.reference = self._load_reference(self.run_dir)
            if done > 0:
                last = Path(record["stages"][-1]["checkpoint"])
                model_path = str(last / "model")
                state, _, teacher_state = ckpt.load_train_state(last)
                optimizer_state = state["optimizer"] if ccfg.carry_optimizer else None
            self.log(f"resuming {self.run_dir} after stage {done}")
        else:
            if ccfg.initial_eval_from:
                stage0 = self._reuse_stage0(record)
            else:
                self.log(f"stage 0: measuring {cfg.model} on {', '.join(self.suite.names)} "
                         f"({', '.join(str(len(r)) for r in self.suite.rows.values())} prompts)")
                stage0 = self._measure(0, None, self.initial, None, None)
            self._log_stage(stage0, record)
            record["stages"] = [stage0]
            record["accuracy_matrix"] = [[stage0["accuracy"][c] for c in record["columns"]]]
            record["elapsed_s"] = time.perf_counter() - t_start
            self._save(record)
        elapsed_before = record.get("elapsed_s", 0.0)
        t_start = time.perf_counter()

        for k in range(done + 1, len(ccfg.tasks) + 1):
            name = ccfg.tasks[k - 1]
            self.log(f"stage {k}/{len(ccfg.tasks)}: {self.objective.name} on {name} for {ccfg.steps_per_task} steps")
            trainer, info, checkpoint = self._train_stage(k, name, model_path, optimizer_state, teacher_state)
            stage = self._measure(k, name, trainer.policy, str(checkpoint), info)
            self._log_stage(stage, record)
            record["stages"].append(stage)
            record["accuracy_matrix"].append([stage["accuracy"][c] for c in record["columns"]])
            record["elapsed_s"] = elapsed_before + time.perf_counter() - t_start
            acc = ", ".join(f"{c} {stage['accuracy'][c]:.2f}" for c in record["columns"])
            self.log(f"stage {k} done: accuracy {acc}; relative L2 drift {stage['params']['relative_l2']:.2e}; "
                     f"KL to initial {stage['eval']['overall']['kl']:.3g}")
            model_path = str(checkpoint / "model")
            carried = trainer.carry_state()
            optimizer_state = carried["optimizer_state"] if ccfg.carry_optimizer else None
            teacher_state = carried["teacher_state"]
            del trainer
            gc.collect()
            self._save(record)

        record["status"] = "complete"
        record["metrics"] = _finite(continual_metrics(record["accuracy_matrix"], ccfg.tasks, ccfg.eval_tasks))
        self._save(record)
        return record

    def _save(self, record: dict) -> None:
        _write_json(self.run_dir / "continual.json", _finite(record))
        try:
            write_run_report(self.run_dir, record=record)
        except Exception as e:  # a plotting problem must not lose a training run
            self.log(f"warning: could not render the report of {self.run_dir}: {type(e).__name__}: {e}")
