"""The measurement of a continual run: every column's fixed prompts, before training and after every stage.

:class:`StageMeasurer` generates each set of weights' greedy responses once (keyed by the number of
optimiser updates that made them: a stage trainer's evaluation after its last step and the stage's
measurement share them), measures accuracy, drift and artifacts (:meth:`EvalSuite.measure
<denser.analysis.suite.EvalSuite.measure>`), mean@n at the stages ``--sampled-eval-stages`` selects,
and writes the responses to ``<run>/responses/stage-NNN.jsonl``.

Under FSDP or DDP every process measures every prompt alike (greedy decoding of the same weights:
the same responses; a sharded model's layers are gathered as it runs them, collectives every
process takes part in) and the main process writes the files.

A stop request (SIGTERM, Ctrl-C) ends a generation at its next token and raises
:class:`~denser.trainers.preemption.Interrupted` right after it; nothing of an interrupted
measurement is kept (the cache holds only complete generations), so a resumed run measures that
stage again, and measures it alike.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from denser.analysis.estimators import mean_stderr
from denser.analysis.params import ParameterDrift
from denser.analysis.responses import Generations
from denser.analysis.suite import EvalSuite, generations_to_rows
from denser.continual.config import ContinualConfig
from denser.continual.record import finite
from denser.trainers import lora
from denser.trainers.config import TrainConfig
from denser.trainers.preemption import StopControl
from denser.trainers.sharding import Sharding


class StageMeasurer:
    """Measures the weights of one continual run on its suite.

    Args:
        suite: the fixed prompts of every column (training tasks, then held-out tasks).
        tokenizer: the model's tokenizer.
        initial: the initial model (KL and parameter drift are measured against it).
        meter: the parameter drift meter of ``initial``.
        run_dir: the continual run's directory (``responses/`` goes there).
        cfg, ccfg: the run's flags (eval samples, seed; the stages that are sampled).
        stop: the run's stop control (None: never stops).
        is_main: this process writes the responses (the others of a multi-process run measure alike).
    """

    def __init__(self, suite: EvalSuite, tokenizer, initial, meter: ParameterDrift, run_dir: Path, cfg: TrainConfig,
                 ccfg: ContinualConfig, *, stop: StopControl | None = None, is_main: bool = True):
        self.suite, self.tokenizer, self.initial, self.meter = suite, tokenizer, initial, meter
        self.run_dir, self.cfg, self.ccfg = Path(run_dir), cfg, ccfg
        self.stop = stop if stop is not None else StopControl(None)
        self.is_main = is_main
        self.reference: dict[str, Generations] | None = None  # the initial model's responses (similarity)
        self._cache: dict[tuple[str, int], Generations] = {}

    # ------------------------------------------------------------------------------- generation

    def generate(self, model, names: list[str], version: int, where: str) -> dict[str, Generations]:
        """Responses of the weights numbered ``version`` to ``names``' fixed prompts, generated once.

        ``where``: the check point a stop during the generation is reported at."""
        missing = [n for n in names if (n, version) not in self._cache]
        if missing:
            gens = Sharding.within(model, lambda m: self.suite.generate_many(m, self.tokenizer, missing,
                                                                             stop=self._during_generation(m)))
            self.stop.check(where)  # before caching: a stopped generation is cut short
            for n, g in gens.items():
                self._cache[(n, version)] = g
        return {n: self._cache[(n, version)] for n in names}

    def _during_generation(self, model):
        """The stop poll of a generation; none for a sharded model, whose processes must run the same
        forwards (a stop then waits for the generation's end, checked right after it)."""
        return None if Sharding.root_of(model) is not None else self.stop.during_generation

    def drop_cache_before(self, version: int) -> None:
        for key in [k for k in self._cache if k[1] < version]:
            del self._cache[key]

    def evaluator(self, name: str, base: int, where: str) -> Callable[[Any], dict]:
        """A stage trainer's ``evaluator`` (called by ``train()`` before and after the stage): the
        fixed-prompt suite on task ``name``, keyed by the weights' update count (``base``, the
        updates before the stage, plus the trainer's) so nothing is generated twice."""

        def evaluate(trainer) -> dict:
            version = base + int(trainer.scheduler.last_epoch)
            success = self.generate(trainer.policy, [name], version, where)[name].extra["success"]
            mean, se = mean_stderr([float(x) for x in success])
            return {"eval_accuracy": mean, "eval_accuracy_se": se}

        return evaluate

    # ------------------------------------------------------------------------------ measurement

    def measure(self, stage: int, task: str | None, model, version: int, checkpoint: str | None,
                train_info: dict | None) -> dict:
        """Stage ``stage``'s entry of ``continual.json`` (``version``: the optimiser updates so far)."""
        t0 = time.perf_counter()
        first = stage == 0
        where = "the initial measurement" if first else f"the measurement after stage {stage}"
        generate = lambda names: self.generate(model, names, version, where)  # noqa: E731
        generate(self.suite.names)  # the responses first; then the forwards of the drift, with the weights at hand

        def measure(m, initial):
            return self.suite.measure(m, self.tokenizer, initial=initial, reference=None if first else self.reference,
                                      generate=generate)

        if first:
            record, gens = Sharding.within(model, lambda m: measure(m, None))
        else:
            record, gens = Sharding.within(model, lambda m: Sharding.within(self.initial, lambda i: measure(m, i)))
        if first:  # the initial model against itself: no drift by definition (saves two forwards per prompt)
            self.reference = gens
            for rec in (*record["tasks"].values(), record["overall"]):
                rec.update(kl=0.0, similarity=1.0, token_f1=1.0)
        sampled = self._sampled(stage, model, where)
        for name, values in sampled.items():
            mean, se = mean_stderr(values)
            record["tasks"][name]["sampled"] = {"n": self.cfg.eval_samples, "mean_at_n": mean, "mean_at_n_se": se}
        params = self.meter(lora.effective_weights(model) if lora.is_lora(model) else model)  # LoRA: base + adapters
        self._save_responses(stage, gens)
        self.drop_cache_before(version)
        return finite({
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

    def _sampled(self, stage: int, model, where: str) -> dict[str, list[float]]:
        """Per task, the per-prompt mean@n values of the stages ``--sampled-eval-stages`` selects (the
        first and the last by default: sampling costs ``--eval-samples`` times a greedy eval); empty
        without ``--eval-samples``."""
        which = self.ccfg.sampled_eval_stages
        chosen = which == "all" or (which == "first-last" and stage in (0, len(self.ccfg.tasks)))
        if not self.cfg.eval_samples or not chosen:
            return {}
        cfg = self.cfg
        out = Sharding.within(model, lambda m: self.suite.sample_many(
            m, self.tokenizer, self.suite.names, samples=cfg.eval_samples, temperature=cfg.eval_temperature,
            top_p=cfg.eval_top_p, seed=cfg.seed, stop=self._during_generation(model)))
        self.stop.check(where)
        return out

    def _save_responses(self, stage: int, gens) -> None:
        if not self.is_main:
            return
        rows = [r for name in self.suite.names for r in generations_to_rows(name, gens[name])]
        path = self.run_dir / "responses" / f"stage-{stage:03d}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # --------------------------------------------------------------------------- teacher probe

    def teacher_probe(self, stage: int, name: str, trainer) -> dict:
        """Stage ``stage``'s teacher alignment (``--teacher-probe``), measured once at the stage's start
        with its trainer's student and teacher before any update, on task ``name``'s fixed prompts
        (:func:`denser.analysis.teacher_probe.teacher_alignment`; the teacher's greedy accuracy where it
        can run as a policy). Saved to ``teacher_probe/stage-NN.json`` before the stage trains, so a run
        resumed inside the stage keeps the measurement of its start; the RNG streams are left as they were."""
        from denser.analysis.teacher_probe import teacher_alignment, teacher_policy
        from denser.trainers import checkpoint as ckpt

        path = self.run_dir / "teacher_probe" / f"stage-{stage:02d}.json"
        if path.is_file():
            return json.loads(path.read_text())
        teacher = trainer.teacher
        out: dict[str, Any] = {"stage": stage, "task": name,
                               "teacher": None if teacher is None else teacher.mode,
                               "teacher_path": getattr(trainer.teacher_spec, "teacher_path", None),
                               "teacher_init_alpha": getattr(trainer.teacher_spec, "teacher_init_alpha", None)}
        rng = ckpt.rng_state()
        t0 = time.perf_counter()
        if teacher is not None:
            out.update(teacher_alignment(self.suite.tasks[name], self.suite.rows[name], self.tokenizer,
                                         trainer.policy, teacher, trainer.teacher_spec))
            model = teacher_policy(teacher, trainer.policy)
            if model is not None:
                gen = self.suite.generate_many(model, self.tokenizer, [name], stop=self.stop.during_generation)
                self.stop.check(f"the teacher probe of stage {stage}")
                success = [float(x) for x in gen[name].extra["success"]]
                out["teacher_accuracy"], out["teacher_accuracy_se"] = mean_stderr(success)
            else:
                out["teacher_accuracy"] = out["teacher_accuracy_se"] = None
        out["time_s"] = time.perf_counter() - t0
        ckpt.set_rng_state(rng)
        out = finite(out)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(out, indent=1))
        return out

    # ------------------------------------------------------------------------- stage 0 again

    def load_reference(self) -> dict[str, Generations]:
        """The initial model's responses saved by this run (texts and success flags are what is
        needed: similarity, and the stage-1 trainer's before-training accuracy)."""
        path = self.run_dir / "responses" / "stage-000.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        out = {}
        for name in self.suite.names:
            mine = [r for r in rows if r["task"] == name]
            out[name] = Generations(prompt_ids=[], completion_ids=[], texts=[r["text"] for r in mine],
                                    truncated=[r["truncated"] for r in mine],
                                    extra={"success": [r["success"] for r in mine], "answers": [r["answer"] for r in mine]})
            self._cache[(name, 0)] = out[name]
        self.reference = out
        return out

    def reuse_stage0(self, record: dict, src: Path) -> dict:
        """Stage 0 of another run ``src`` of the same sequence: the initial model and the fixed prompts
        are the same, so is its measurement (greedy decoding); saves one evaluation per extra run."""
        other = json.loads((src / "continual.json").read_text()) if (src / "continual.json").is_file() else None
        if other is None or not other.get("stages"):
            raise ValueError(f"--initial-eval-from {src}: no continual run with a measured stage 0 there")
        cfg = self.cfg
        mine = {"model": cfg.model, "columns": record["columns"], "eval": record["eval"],
                "seed": cfg.seed, "dtype": cfg.dtype, "spectral_rank": self.ccfg.spectral_rank}
        theirs = {"model": other.get("model"), "columns": other.get("columns"), "eval": other.get("eval"),
                  "seed": (other.get("config") or {}).get("seed"), "dtype": (other.get("config") or {}).get("dtype"),
                  "spectral_rank": (other.get("continual") or {}).get("spectral_rank")}
        diffs = [f"{k}: {theirs[k]!r} vs {v!r}" for k, v in mine.items() if theirs[k] != v]
        if diffs:
            raise ValueError(f"--initial-eval-from {src}: a different initial measurement ({'; '.join(diffs)})")
        shutil.copyfile(src / "responses" / "stage-000.jsonl", self.run_dir / "responses" / "stage-000.jsonl")
        self.load_reference()
        return {**other["stages"][0], "reused_from": str(src)}
