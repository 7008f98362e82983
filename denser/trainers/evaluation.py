"""The loop's own evaluation: greedy accuracy on the first ``eval_size`` eval rows (each process
its share), with ``--eval-samples n`` the sampled mean@n, standard errors over prompts, and the
printed line."""

from __future__ import annotations

from typing import Any, Callable

from accelerate.utils import gather_object

from denser.engines.base import Rollout, SamplingParams, request_seed
from denser.tasks import Task
from denser.tasks.mixed import MixedTask, part_accuracies
from denser.trainers.config import TrainConfig
from denser.trainers.estimators import mean_stderr
from denser.trainers.prompts import PromptSchedule

#: ``generate(prompt_ids, params, seeds=None, stop=None) -> Rollout`` (the Trainer's engine call)
Generate = Callable[..., Rollout]


def evaluate_policy(task: Task, prompts: PromptSchedule, generate: Generate, cfg: TrainConfig, rank: int,
                    world: int, stop=None) -> dict[str, float | None]:
    """:meth:`Trainer.evaluate_all <denser.trainers.loop.Trainer.evaluate_all>` without an
    ``evaluator``: every process generates for its share of the prompts; the metrics are over all."""
    data = task.eval
    idx = list(range(min(cfg.eval_size, len(data))))[rank::world]
    rows = [data[i] for i in idx]
    greedy: list[float] = []
    sampled: list[float] = []
    if rows:
        prompt_ids = prompts.prompt_ids(rows)
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_generations=1, do_sample=False)
        greedy = successes(task, generate(prompt_ids, params, stop=stop), rows)
        if cfg.eval_samples:
            n = cfg.eval_samples
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, num_generations=n,
                                    temperature=cfg.eval_temperature, top_p=cfg.eval_top_p)
            # eval row i's request: request_seed(seed, i), as `denser eval` seeds it; never the process
            rollout = generate(prompt_ids, params, seeds=[request_seed(cfg.seed, i) for i in idx], stop=stop)
            ok = successes(task, rollout, [r for r in rows for _ in range(n)])
            sampled = [sum(ok[p * n:(p + 1) * n]) / n for p in range(len(rows))]
    all_greedy = gather_object(greedy)
    out = eval_metrics(all_greedy, gather_object(sampled) if cfg.eval_samples else None)
    if isinstance(task, MixedTask):  # a mix: the greedy accuracy of each part too
        out.update(part_accuracies(task, gather_object([r["part"] for r in rows]), all_greedy))
    return out


def successes(task: Task, rollout: Rollout, rows: list[dict]) -> list[float]:
    """1.0 / 0.0 per completion: did the task count it as a success."""
    return [float(task.is_success(s)) for s in task.score_batch(rollout.texts, rows)]


def eval_line(task: Task, cfg: TrainConfig, metrics: dict[str, Any]) -> str:
    """``0.656 ± 0.085 (addition, 32 greedy prompts); mean@4 0.610 ± 0.070 (temperature 0.6, top-p 0.95)``."""
    prompts = min(cfg.eval_size, len(task.eval))
    greedy = format_eval({"eval_accuracy": metrics["eval_accuracy"],
                          "eval_accuracy_se": metrics.get("eval_accuracy_se")})
    line = f"{greedy} ({task.name}, {prompts} greedy prompts)"
    parts = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("eval_accuracy/") and v is not None}
    if parts:
        line += " [" + ", ".join(f"{name} {v:.3f}" for name, v in parts.items()) + "]"
    if metrics.get("eval_mean_at_n") is not None:
        line += (f"; {format_eval(metrics, cfg.eval_samples).split('; ', 1)[1]} "
                 f"(temperature {cfg.eval_temperature:g}, top-p {cfg.eval_top_p:g})")
    return line


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
