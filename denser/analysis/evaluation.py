"""``denser eval``: a model or checkpoint on any tasks, without training.

    evaluate_model("runs/grpo-addition/checkpoints/step-000012", ["addition", "compare"],
                   samples=8, temperature=0.6, top_p=0.95)

The prompts are the first ``eval_size`` rows of each task's eval split (as the training loop's
greedy eval and ``denser continual`` use them), rendered with the model's chat template; the
completions come from a rollout engine (``engine``: a run's :class:`~denser.engines.base.EngineSpec`;
by default the loop's ``hf`` engine at ``--batch-size`` sequences per call) and are scored by the task (``task.score_batch``, ``task.is_success``): a run's final
``eval_accuracy`` and ``denser eval``'s greedy accuracy of its final checkpoint measure one thing.

Per task, each a mean over prompts with its standard error over prompts
(:mod:`denser.analysis.estimators`):

- ``greedy``: accuracy of one greedy completion per prompt;
- with ``samples=n``: ``mean@n`` (the fraction of the ``n`` sampled completions that succeed),
  ``pass@k`` (unbiased estimator from the ``n``) and ``maj@k`` (majority vote over parsed answers,
  averaged over all size-``k`` subsets) for every ``k`` in ``ks``.

A model is named as ``denser report drift`` names it (:func:`~denser.analysis.checkpoints.resolve_model`):
``default``, ``tiny``, a Hugging Face model directory, a checkpoint directory (``.../step-000012``)
or its ``model/``, a ``denser train`` run (its newest checkpoint) or a continual run (``RUN@K``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import yaml

from denser.analysis.checkpoints import resolve_model, tasks_of
from denser.analysis.estimators import majority_at_k, mean_stderr, pass_at_k, vote_groups
from denser.analysis.responses import build_engine
from denser.analysis.suite import EvalSuite
from denser.engines import DEFAULT_ENGINE, EngineSpec, SamplingParams, list_rollout_engines
from denser.objectives.fields import help_field as _f
from denser.tasks import DEFAULT_TASK, get_task, parse_number
from denser.tasks.answers import normalize_text
from denser.trainers.checkpoint import quiet_transformers
from denser.trainers.config import EVAL_SIZE_CAP, TrainConfig
from denser.trainers.models import load_model

__all__ = ["EvalSettings", "default_ks", "default_tasks", "eval_table", "evaluate_model", "run_config", "vote_key"]


def _run_default(train_field: str, help: str):
    """An eval setting that is the training eval's: its default is :class:`~denser.trainers.config.TrainConfig`'s
    ``train_field`` default, and when ``--model`` is a run directory (or one of its checkpoints) that run's own
    value (from its config.yaml). None: not set (resolved by :meth:`EvalSettings.resolve`)."""
    unset = next(f.default for f in fields(TrainConfig) if f.name == train_field)
    return field(default=None, metadata={"help": help, "unset": unset, "from_run": train_field})


@dataclass
class EvalSettings:
    """What ``denser eval`` measures and how (its flags). The settings the training eval has too (eval
    size, generation budget, the sampled eval's temperature and top-p, seed, dtype) default to ``denser
    train``'s, and, for a run directory, to that run's own: ``denser eval RUN`` measures what the run's
    final eval line measured. :meth:`resolve` fills them in."""

    eval_size: int | None = _run_default("eval_size", f"prompts per task: the first rows of its eval split (0 = the "
                                         f"whole split, at most {EVAL_SIZE_CAP} rows, as `denser train`; a run "
                                         "directory: the run's own)")
    max_new_tokens: int | None = _run_default("max_new_tokens", "generation budget (0 = the task's suggested budget, "
                                              "the largest of several tasks', as `denser train`; a run directory: "
                                              "the run's own)")
    greedy: bool = _f(True, "measure greedy accuracy")
    samples: int | None = _run_default("eval_samples", "sampled completions per prompt for mean@N, pass@k and maj@k "
                                       "(0 = no sampling; a run directory: the run's --eval-samples)")
    ks: list[int] = _f([], "the k of pass@k and maj@k, each <= N (default: 1, 2, 4, ... up to N, and N)",
                       metavar="K[,K...]")
    temperature: float | None = _run_default("eval_temperature", "sampling temperature (as `denser train "
                                             "--eval-temperature`; a run directory: the run's own)")
    top_p: float | None = _run_default("eval_top_p", "nucleus sampling mass (as `denser train --eval-top-p`; a run "
                                       "directory: the run's own)")
    seed: int | None = _run_default("seed", "task generation, tiny model and sampling seed (a run directory: the "
                                    "run's own)")
    batch_size: int = _f(64, "completions per generate call")
    dtype: Literal["float32", "bfloat16"] | None = _run_default("dtype", "parameter dtype (a run directory: the "
                                                                "run's own)")
    engine: str | None = _run_default("engine", "rollout engine that generates the completions (its options: "
                                      "--ENGINE-OPTION flags; a run directory: the run's engine and its engine_args)")

    def resolve(self, run: Mapping[str, Any] | None = None) -> EvalSettings:
        """A copy with every unset setting (None) taken from ``run`` (a run's config.yaml values), else
        ``denser train``'s default."""
        changes = {}
        for f in fields(self):
            if "from_run" in f.metadata and getattr(self, f.name) is None:
                value = (run or {}).get(f.metadata["from_run"])
                changes[f.name] = value if value is not None else f.metadata["unset"]
        return dataclasses.replace(self, **changes) if changes else self

    def __post_init__(self) -> None:
        problems = []
        if self.eval_size is not None and self.eval_size < 0:
            problems.append(f"--eval-size must be >= 0 (0 = the whole eval split), got {self.eval_size}")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            problems.append(f"--max-new-tokens must be >= 0 (0 = the task's budget), got {self.max_new_tokens}")
        samples = self.samples or 0
        if self.samples is not None and self.samples < 0:
            problems.append(f"--samples must be >= 0, got {self.samples}")
        if not self.greedy and self.samples == 0:
            problems.append("nothing to measure: --no-greedy needs --samples N")
        if self.ks and self.samples == 0:
            problems.append("--k needs --samples N (pass@k and maj@k are estimated from N sampled completions)")
        bad = [k for k in self.ks if not 1 <= k <= samples]
        if samples and bad:
            problems.append(f"--k {bad[0]} is outside [1, --samples {samples}]; k counts samples per prompt")
        if self.temperature is not None and not self.temperature > 0:
            problems.append(f"--temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.engine is not None and self.engine not in list_rollout_engines():
            problems.append(f"--engine must be one of {', '.join(list_rollout_engines())}, got {self.engine!r}")
        if self.dtype not in (None, "float32", "bfloat16"):
            problems.append(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if problems:
            raise ValueError("; ".join(problems))
        if samples and not self.ks:
            self.ks = default_ks(samples)
        self.ks = sorted(set(self.ks))


def run_engine(settings: EvalSettings, run: Mapping[str, Any] | None = None,
               options: Mapping[str, Any] | None = None) -> EngineSpec | None:
    """The engine of an eval with resolved ``settings``: ``settings.engine`` with the options ``run``
    (a run's config.yaml values) recorded for it, when it is that run's engine, and ``options`` over
    them; None when there are none for the default engine (the ``hf`` engine at ``settings.batch_size``
    sequences per call)."""
    recorded = (run or {}).get("engine_args") if (run or {}).get("engine") == settings.engine else None
    if recorded is None and not options and settings.engine == DEFAULT_ENGINE:
        return None
    return EngineSpec.from_args(settings.engine, {**(recorded or {}), **(options or {})}, where="engine options")


def run_config(model: str) -> dict[str, Any] | None:
    """The config.yaml values of the ``denser train`` run that ``model`` is (a run directory) or is in (a
    checkpoint directory or its ``model/``), the run config of a ``denser continual`` run (``RUN`` or
    ``RUN@K``: its continual.json's ``config``); None for anything else."""
    if not model.strip():
        return None
    base, sep, stage = model.rpartition("@")
    record = Path(base if sep and stage.isdigit() else model).expanduser() / "continual.json"
    if record.is_file():
        try:
            config = json.loads(record.read_text()).get("config")
        except (ValueError, OSError, UnicodeDecodeError, AttributeError):
            return None
        return config if isinstance(config, dict) else None
    path = Path(model).expanduser()
    for run in (path, path.parent.parent, path.parent.parent.parent):
        config = run / "config.yaml"
        if config.is_file():
            try:
                data = yaml.safe_load(config.read_text())
            except (yaml.YAMLError, OSError, UnicodeDecodeError):
                return None
            return data if isinstance(data, dict) else None
    return None


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, and ``n``."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def vote_key(answer: str | None):
    """What a completion votes for: its answer as a number when it is one (``7``, ``7.0`` and
    ``x = 7`` vote alike), else its text with whitespace collapsed and case folded; None: no vote."""
    if answer is None or not str(answer).strip():
        return None
    number = parse_number(answer)
    if number is not None:
        return ("number", f"{number:.9g}")
    return ("text", normalize_text(str(answer)))


def default_tasks(model: str) -> list[str]:
    """The tasks a run directory (or a checkpoint or model directory inside one) was trained on;
    for anything else the default task."""
    columns = tasks_of(model)
    if columns:
        return columns
    task = (run_config(model) or {}).get("task")
    if isinstance(task, str) and task:
        return [task]
    return [DEFAULT_TASK]


def evaluate_model(model: str, tasks: Sequence[str] | None = None, settings: EvalSettings | None = None, *,
                   device: str | None = None, log: Callable[[str], Any] = print,
                   engine: EngineSpec | None = None) -> dict[str, Any]:
    """Measure ``model`` on ``tasks`` (default: :func:`default_tasks`) with ``engine`` (default:
    ``settings.engine``, for a run directory the run's engine with its options); returns the JSON-able result
    ``{"model", "model_path", "settings", "tasks": {name: {"prompts", "metrics"}}, "overall"}``, each
    metric ``{"mean", "stderr"}``. Bad input raises ``ValueError`` before anything is generated."""
    run = run_config(model)
    settings = (settings or EvalSettings()).resolve(run)  # a run's own eval settings where unset
    if engine is None:  # the run's engine with its recorded options, or the settings' engine
        engine = run_engine(settings, run)
    names = [t.strip() for t in (tasks or default_tasks(model)) if t.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"--tasks lists a task twice: {', '.join(names)}")
    task_objs = {}
    for name in names:
        try:
            task_objs[name] = get_task(name, seed=settings.seed)
        except TypeError as e:  # bad inline options (addition?foo=1)
            raise ValueError(str(e)) from None
    path = resolve_model(model)
    if not settings.max_new_tokens:  # 0: the task's budget (several tasks: the largest), as `denser train`
        settings = dataclasses.replace(settings, max_new_tokens=max(int(t.suggested_max_new_tokens)
                                                                    for t in task_objs.values()))
    # 0: each task's eval split, at most EVAL_SIZE_CAP rows, as `denser train` (resolve_eval_size)
    suite = EvalSuite(task_objs, eval_size=settings.eval_size or EVAL_SIZE_CAP,
                      max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                      engine=engine)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with quiet_transformers():
        policy, tokenizer = load_model(path, dtype=getattr(torch, settings.dtype), seed=settings.seed)
    policy.to(dev).eval().requires_grad_(False)
    prompts = {name: suite.prompt_ids(tokenizer, name) for name in names}
    _check_context(policy, prompts, settings.max_new_tokens)

    t0 = time.perf_counter()
    per_prompt: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    if settings.greedy:
        log(f"greedy: {', '.join(f'{n} ({len(prompts[n])} prompts)' for n in names)}")
        for name, gens in suite.generate_many(policy, tokenizer, names).items():
            per_prompt[name]["greedy"] = [float(s) for s in gens.extra["success"]]
    if settings.samples:
        sampler = build_engine(policy, tokenizer, engine, settings.batch_size)
        params = SamplingParams(max_new_tokens=settings.max_new_tokens, num_generations=settings.samples,
                                temperature=settings.temperature, top_p=settings.top_p)
        for name in names:
            log(f"sampling: {name}, {settings.samples} completions for each of {len(prompts[name])} prompts")
            per_prompt[name].update(_sampled(sampler, params, task_objs[name], suite.rows[name], prompts[name],
                                             settings))
    result = {
        "model": model,
        "model_path": path,
        "settings": asdict(settings),
        "time_s": time.perf_counter() - t0,
        "tasks": {name: {"prompts": len(prompts[name]), "metrics": _summaries(per_prompt[name])} for name in names},
    }
    if len(names) > 1:
        pooled: dict[str, list[float]] = {}
        for name in names:
            for metric, values in per_prompt[name].items():
                pooled.setdefault(metric, []).extend(values)
        result["overall"] = {"prompts": sum(len(prompts[n]) for n in names), "metrics": _summaries(pooled)}
    return result


def _sampled(engine, params, task, rows, prompt_ids, settings: EvalSettings) -> dict[str, list[float]]:
    n = settings.samples
    # eval row p's request is seeded request_seed(seed, p), as the training loop's sampled eval seeds it
    rollout = engine.generate(prompt_ids, params, seed=settings.seed)
    scores = task.score_batch(rollout.texts, [row for row in rows for _ in range(n)])
    out: dict[str, list[float]] = {f"mean@{n}": [], **{f"pass@{k}": [] for k in settings.ks},
                                   **{f"maj@{k}": [] for k in settings.ks}}
    for p in range(len(rows)):
        group = scores[p * n:(p + 1) * n]
        success = [bool(task.is_success(s)) for s in group]
        c = sum(success)
        out[f"mean@{n}"].append(c / n)
        votes, accuracy, _ = vote_groups([vote_key(s.answer) for s in group], success)
        for k in settings.ks:
            out[f"pass@{k}"].append(pass_at_k(n, c, k))
            out[f"maj@{k}"].append(majority_at_k(votes, accuracy, n, k))
    return out


def _summaries(per_prompt: dict[str, list[float]]) -> dict[str, dict[str, float | None]]:
    out = {}
    for metric, values in per_prompt.items():
        mean, stderr = mean_stderr(values)
        out[metric] = {"mean": mean, "stderr": stderr}
    return out


def _check_context(model, prompts: dict[str, list[list[int]]], max_new_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    for name, ids in prompts.items():
        for i, p in enumerate(ids):
            if len(p) + max_new_tokens > limit:
                raise ValueError(f"task {name!r}: the prompt of eval row {i} has {len(p)} tokens; with "
                                 f"--max-new-tokens {max_new_tokens} it exceeds the model's context of {limit} "
                                 "tokens; lower --max-new-tokens or --eval-size")


def eval_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table: one row per task (and ``all``), ``mean ± stderr`` cells."""
    rows = [(name, r) for name, r in result["tasks"].items()]
    if "overall" in result:
        rows.append(("all", result["overall"]))
    metrics: list[str] = []
    for _, r in rows:
        metrics += [m for m in r["metrics"] if m not in metrics]
    header = ["task", "prompts", *metrics]

    def cell(m):
        if m is None or m["mean"] is None:
            return "-"
        return f"{m['mean']:.3f}" + (f" ± {m['stderr']:.3f}" if m["stderr"] is not None else "")

    table = [header] + [[name, str(r["prompts"]), *(cell(r["metrics"].get(m)) for m in metrics)] for name, r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
             for row in table]
    s = result["settings"]
    note = f"model {result['model']}"
    if result["model_path"] != result["model"]:
        note += f" ({result['model_path']})"
    note += f"; {s['max_new_tokens']} new tokens"
    if s["samples"]:
        note += f"; {s['samples']} samples per prompt at temperature {s['temperature']:g}, top-p {s['top_p']:g}"
    return "\n".join([note, *lines, "mean ± standard error over prompts"])


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return path
