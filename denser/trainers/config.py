"""The run configuration of ``denser train``: every field is a documented CLI flag.

A ``TrainConfig`` is what the user gave; :func:`denser.trainers.resolve.resolve_run` decides the run from it
(the objective's run defaults for the options left None, the settings that default to the task).

The objective's own hyper-parameters are not here: they are the fields of the objective's
dataclass and become flags of their own (``denser train --objective sdpo --help``).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from denser.engines.base import DEFAULT_ENGINE, list_rollout_engines
from denser.kernels.options import BACKENDS
from denser.objectives import DEFAULT_OBJECTIVE
from denser.objectives.fields import help_field as _f
from denser.objectives.fields import type_problems
from denser.trainers.tracking import TRACKERS, report_to_problems

#: the most eval rows ``eval_size: 0`` (the default) takes: every built-in task's eval split up to this
EVAL_SIZE_CAP = 64

#: config.yaml's record of a teacher model from --teacher-path ({"path", "sha256"}; trainers/teacher.py's
#: teacher_source): written by the run, checked by --resume, not an option (config loaders skip it)
TEACHER_MODEL_KEY = "teacher_model"


def _preset(unset, help: str):
    """A run option an objective's ``run_defaults()`` may set (the ``dapo`` preset's loop options): its
    default is None, "not set", so that a value the user gives (even one equal to ``unset``) is never
    replaced by a preset; :func:`~denser.trainers.resolve.resolve_run` makes it ``unset`` where neither
    the user nor the objective sets it."""
    return field(default=None, metadata={"help": help, "unset": unset})


def preset_options() -> dict[str, Any]:
    """The run options an objective's ``run_defaults()`` may set -> their value when nothing sets them."""
    return {f.name: f.metadata["unset"] for f in fields(TrainConfig) if "unset" in f.metadata}


@dataclass
class TrainConfig:
    objective: str = _f(DEFAULT_OBJECTIVE, "registered objective to optimise (see `denser objectives`)")
    model: str = _f("default", "'default' (embedded SmolLM2-135M-Instruct), 'tiny' (random-init, for tests) or a local HF model directory")
    task: str = _f("", "built-in task name (see `denser tasks`), file:PATH (jsonl/json/csv/parquet/arrow or a dataset directory) or hf:NAME[:CONFIG], with options after '?' (docs/tasks.md); empty = the default task")
    steps: int = _f(12, "training steps: rollout batches (each makes --mini-batches x --epochs optimiser updates)")
    num_generations: int = _f(4, "completions per prompt (the group size)")
    prompts_per_step: int = _f(4, "prompts per step on each process")
    max_new_tokens: int = _f(0, "generation budget per completion (0 = the task's suggested_max_new_tokens, "
                             "32 for the default task)")
    min_new_tokens: int = _f(0, "a completion's first this many tokens are never a stop token, and a stop string counts "
                             "from then on (vLLM's min_tokens, TRL's generation_kwargs min_new_tokens; training rollouts "
                             "only, evaluations stop freely; 0 = off)")
    temperature: float = _f(1.0, "sampling temperature; the loss core uses the same temperature for log-probs")
    top_p: float = _f(1.0, "nucleus sampling mass (1.0 = off)")
    top_k: int = _f(0, "sample among the k most likely tokens (0 = off); as --top-p, part of the sampler: the "
                    "loss core's log-probs stay the full vocabulary's")
    min_p: float = _f(0.0, "drop tokens whose probability is below min_p times the most likely token's (0 = off)")
    repetition_penalty: float = _f(1.0, "CTRL's repetition penalty on the prompt's and completion's tokens while "
                                   "sampling (1.0 = off; as vLLM's and transformers')")
    stop: list[str] = field(default_factory=list, metadata={"help": (
        "stop strings, comma-separated: a completion ends with the token whose text completes one (the token "
        "is kept, the completion is not truncated); a config file's list for strings holding commas")})
    micro_batch_size: int = _f(8, "completions per forward/backward micro-batch (gradient accumulation over an update)")
    max_tokens_per_micro_batch: int = _f(0, "token-budget micro-batches (verl's dynamic batch size): cut each "
                                         "mini-batch, in order, into micro-batches whose policy forward holds at "
                                         "most this many tokens (rows x padded prompt + completion width, counted so "
                                         "whatever --packing), so long "
                                         "completions do not fix the micro-batch by count; a longer sample gets a "
                                         "micro-batch of its own; the loss is unchanged (its normalisers are the "
                                         "mini-batch's); 0 = off: --micro-batch-size completions per micro-batch")
    packing: Literal["shared", "padded"] = _f(
        "shared", "layout of every forward over a micro-batch (the policy's, old_logp's, the reference's, the "
        "teacher's): 'shared' = each distinct context (a group's prompt, a group's teacher context) once, its "
        "completions after it in the same row under a 4D attention mask, several groups per row, so neither "
        "repeated prompts nor padding are computed (needs sdpa or eager attention); 'padded' = a row per "
        "completion, its context left-padded and itself right-padded; the two give the same loss up to "
        "summation order")
    mini_batches: int = _f(1, "optimiser updates per pass over a rollout batch: the batch is cut into this many "
                           "mini-batches (verl: train_batch_size / ppo_mini_batch_size; TRL: steps_per_generation)")
    epochs: int = _f(1, "passes over each rollout batch (verl: ppo_epochs; TRL: num_iterations); a step makes "
                     "mini_batches x epochs optimiser updates, and with more than one the objective's ratios and "
                     "importance weights use old_logp (see --old-logp-source)")
    shuffle_mini_batches: bool = _f(True, "with --mini-batches > 1: cut each epoch's mini-batches from a fresh permutation "
                                    "of the rollout batch, seeded by (seed, step, epoch) (PPO's minibatch SGD; TRL "
                                    "shuffles once per rollout); off: in rollout order, each mini-batch whole groups "
                                    "(verl's FSDP actor, as the SDPO code runs it)")
    old_logp_source: Literal["auto", "forward", "engine"] = _f(
        "auto", "old_logp, where the objective uses them: 'forward' = the policy before the step's first update "
        "(a no-grad forward, as verl's compute_log_prob and TRL), 'engine' = the rollout engine's sampling "
        "log-probs, 'auto' = forward when a step makes several updates or the engine's log-probs are not the "
        "trainer's (vllm), engine otherwise")
    rollout_correction: Literal["auto", "off", "token-truncate", "token-mask", "sequence-truncate", "sequence-mask"] = _f(
        "auto", "rollout-vs-trainer correction (TRL's vllm_importance_sampling_mode, verl's rollout correction): each "
        "sample's advantages times a weight pi_train/pi_rollout per token (token-) or per sample (sequence-), capped at "
        "--rollout-correction-cap (-truncate) or zeroed above it (-mask); 'auto' = token-truncate with an engine whose "
        "log-probs are not the trainer's (vllm) and an objective with advantages, else off (sdpo's distillation has "
        "none: set a mode to log the mismatch metrics alone)")
    rollout_correction_cap: float = _f(2.0, "the cap of --rollout-correction (verl's TIS threshold 2.0)")
    lr: float = _f(2e-5, "peak learning rate (AdamW)")
    lr_schedule: Literal["constant", "linear", "cosine"] = _f("constant", "learning-rate schedule after warmup")
    warmup_steps: int = _f(0, "linear LR warmup over this many steps (rollout batches)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta2: float = _f(0.99, "AdamW beta2")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _f(0, "seed of data order, sampling and the tiny model")
    output_dir: str = _f("", "run directory (config.yaml, metrics.jsonl, checkpoints); empty = runs/<objective>-<task>")
    resume: bool = _f(False, "continue the run in --output-dir from its newest complete checkpoint")
    overwrite: bool = _f(False, "replace an existing run in --output-dir")
    eval_every: int = _f(0, "eval accuracy every N steps (0 = only before and after training)")
    eval_size: int = _f(0, f"eval-split prompts used by each eval: its first N rows (0 = the whole split, at most "
                        f"{EVAL_SIZE_CAP} rows: 50 for the default task)")
    eval_samples: int = _f(0, "also sample N completions per eval prompt and report mean@N accuracy (0 = greedy only)")
    eval_temperature: float = _f(0.6, "sampling temperature of the --eval-samples completions (SDPO's eval: 0.6)")
    eval_top_p: float = _f(0.95, "nucleus mass of the --eval-samples completions (SDPO's eval: 0.95)")
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)")
    save_every_minutes: float = _f(30.0, "also checkpoint when M minutes of training have passed since the last "
                                         "checkpoint (0 = off), so a SIGKILL loses at most about M minutes")
    keep_last: int = _f(2, "checkpoints to keep")
    engine: str = _f(DEFAULT_ENGINE, "rollout engine (registered with denser.engines.register_rollout_engine): "
                     + " | ".join(list_rollout_engines()))
    backend: str = _f("auto", "loss-core backend: " + " | ".join(BACKENDS))
    chunk_size: int = _f(0, "loss-core tokens per chunk (0 = sized from the vocabulary)")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "parameter dtype (bfloat16 trains pure bf16; for fp32 master "
                                                "weights with bf16 compute use --mixed-precision bf16)")
    mixed_precision: Literal["no", "bf16", "fp16"] = _f("no", "accelerate's mixed precision: autocast compute, fp32 "
                                                        "master weights and optimiser state")
    gradient_checkpointing: bool = _f(False, "recompute the policy's activations in backward (transformers' "
                                      "gradient checkpointing): activation memory of one layer instead of all")
    log_teacher_entropy: bool = _f(False, "log teacher_entropy and student_entropy: the mean entropy (nats, at "
                                   "--temperature) of the teacher's and the student's next-token distributions on the "
                                   "tokens of samples with a teacher context (two extra no-grad lm_head passes per "
                                   "micro-batch; no effect without a teacher)")
    teacher_max_context_tokens: int = _f(10240, "teacher contexts (the reprompted prompt) longer than this are cut on "
                                         "the right, as SDPO's max_reprompt_len with reprompt_truncation=right")
    mask_truncated_completions: bool | None = _preset(False, "completions that hit --max-new-tokens without a stop token get no "
                                          "loss (TRL's option); they still count in per-sequence normalisers")
    max_consecutive_skips: int = _f(5, "stop after this many consecutive non-finite updates")
    dynamic_sampling: bool | None = _preset(False, "DAPO's dynamic sampling: drop the groups whose rewards are all equal (zero "
                                "advantage) and generate more prompts until the step has --prompts-per-step groups with "
                                "varied rewards, or --max-generation-rounds is reached (the rest is then filled with "
                                "dropped groups)")
    max_generation_rounds: int | None = _preset(4, "dynamic sampling: at most this many generation rounds per step (the first included)")
    overlong_buffer: int | None = _preset(0, "DAPO's overlong reward shaping: a penalty growing linearly from 0 to "
                              "-overlong_penalty over the last this many tokens of --max-new-tokens (0 = off; a "
                              "buffer longer than the budget covers all of it)")
    overlong_penalty: float | None = _preset(1.0, "the overlong penalty at the full length budget (DAPO: 1.0)")
    lora_r: int = _f(0, "LoRA rank: train a low-rank adapter with peft instead of every weight (0 = full "
                     "fine-tuning); the reference and a frozen teacher are then the base model with the adapter "
                     "disabled, an EMA teacher an EMA of the adapter (needs denser[lora])")
    lora_alpha: float = _f(16.0, "LoRA scale numerator: the adapter's update is (lora_alpha / lora_r) * B @ A")
    lora_dropout: float = _f(0.0, "dropout on the LoRA adapter's input in training forwards (0 keeps the policy "
                             "deterministic: the first update's ratios are exactly 1)")
    lora_target_modules: str = _f("all-linear", "layers that get an adapter: 'all-linear' (every linear layer of the "
                                  "blocks, never the output layer) or comma-separated module names (q_proj,v_proj)")
    merge_lora: bool = _f(False, "with --lora-r: the final checkpoint also holds merged/, the base model with the "
                          "adapter merged in (loadable with from_pretrained); `denser merge-lora RUN` does it later")
    reward_workers: int = _f(0, "completions a task that runs programs (the code task, the tests reward) scores at "
                             "a time, each program in a sandboxed process (0 = the task's own setting, default the "
                             "number of cores); the rewards do not depend on it")
    cpu: bool = _f(False, "force CPU even when a GPU is present")
    fsdp: bool = _f(False, "shard the policy, reference and teacher across processes with FSDP2 (launch with torchrun; "
                    "an accelerate config with distributed_type FSDP turns it on too); without it, processes run DDP")
    progress: bool = _f(True, "show a progress bar")
    report_to: str = _f("none", "experiment trackers, comma-separated: none | " + " | ".join(TRACKERS) + " (through "
                        "accelerate; metrics.jsonl is always written; TensorBoard logs go to <run>/tensorboard)")
    tracker_project: str = _f("denser", "project name for --report-to (W&B and trackio project, MLflow experiment, "
                              "TensorBoard folder); the tracker run is named after the run directory")

    @property
    def updates_per_step(self) -> int:
        """Optimiser updates per rollout batch: ``mini_batches * epochs``."""
        return self.mini_batches * self.epochs

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # a config file's single stop string
            self.stop = [self.stop]
        problems = type_problems(self, _flag)
        if problems:  # wrong types first: the range checks below would fail on them in confusing ways
            raise ValueError("; ".join(problems))
        for name in ("steps", "num_generations", "prompts_per_step", "micro_batch_size", "keep_last",
                     "max_consecutive_skips", "teacher_max_context_tokens", "mini_batches", "epochs",
                     "max_generation_rounds"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("max_new_tokens", "min_new_tokens", "eval_size", "eval_samples", "eval_every", "save_every", "warmup_steps",
                     "chunk_size", "overlong_buffer", "max_tokens_per_micro_batch", "reward_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                problems.append(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.save_every_minutes) and self.save_every_minutes >= 0):
            problems.append(f"--save-every-minutes must be a number >= 0 (0 = off), got {self.save_every_minutes}")
        for name in ("lr", "temperature", "top_p", "eval_temperature", "eval_top_p", "weight_decay", "adam_beta2",
                     "max_grad_norm", "overlong_penalty"):
            if getattr(self, name) is not None and not math.isfinite(getattr(self, name)):
                problems.append(f"{_flag(name)} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            problems.append(f"--min-p must be in [0, 1) (0 = off), got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            problems.append(f"--repetition-penalty must be a number > 0 (1.0 = off), got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            problems.append("--stop: a stop string is empty; give non-empty strings")
        if not self.eval_temperature > 0:
            problems.append(f"--eval-temperature must be > 0, got {self.eval_temperature}")
        if not 0 < self.eval_top_p <= 1:
            problems.append(f"--eval-top-p must be in (0, 1], got {self.eval_top_p}")
        if not self.weight_decay >= 0:
            problems.append(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.adam_beta2 < 1:
            problems.append(f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}")
        if not self.max_grad_norm >= 0:
            problems.append(f"--max-grad-norm must be >= 0 (0 = off), got {self.max_grad_norm}")
        if self.engine not in list_rollout_engines():
            problems.append(f"--engine must be one of {', '.join(list_rollout_engines())}, got {self.engine!r}")
        if self.backend not in BACKENDS:
            problems.append(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.overlong_penalty is not None and not self.overlong_penalty >= 0:
            problems.append(f"--overlong-penalty must be >= 0 (a penalty, subtracted), got {self.overlong_penalty}")
        if not (math.isfinite(self.rollout_correction_cap) and self.rollout_correction_cap > 0):
            problems.append(f"--rollout-correction-cap must be a number > 0, got {self.rollout_correction_cap}")
        if self.old_logp_source not in ("auto", "forward", "engine"):
            problems.append(f"--old-logp-source must be auto, forward or engine, got {self.old_logp_source!r}")
        samples = self.prompts_per_step * self.num_generations
        if not problems and self.mini_batches > samples:
            problems.append(f"--mini-batches {self.mini_batches} is more than the {samples} completions of a rollout "
                            f"batch on each process (--prompts-per-step {self.prompts_per_step} x --num-generations "
                            f"{self.num_generations}); every mini-batch needs at least one")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite contradict each other; pick one")
        problems += report_to_problems(self.report_to)
        problems += self._lora_problems()
        if problems:
            raise ValueError("; ".join(problems))

    def _lora_problems(self) -> list[str]:
        problems = []
        if self.lora_r < 0:
            problems.append(f"--lora-r must be >= 0 (0 = full fine-tuning), got {self.lora_r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            problems.append(f"--lora-alpha must be a number > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules.strip(" ,"):
            problems.append("--lora-target-modules is empty; give 'all-linear' or comma-separated module names")
        if self.merge_lora and self.lora_r == 0:
            problems.append("--merge-lora needs --lora-r > 0 (without LoRA the checkpoint's model/ is the full model)")
        if self.lora_r > 0 and self.fsdp:
            problems.append("--lora-r with --fsdp is not supported (one frozen base model and a small adapter: one "
                            "process or DDP trains it); drop --fsdp or --lora-r")
        if self.lora_r > 0 and importlib.util.find_spec("peft") is None:
            problems.append("--lora-r needs the peft package: pip install 'denser[lora]' (or pip install peft)")
        return problems


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"
