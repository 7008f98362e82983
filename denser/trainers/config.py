"""The run configuration of ``denser train``: every field is a documented CLI flag.

The objective's own hyper-parameters are not here: they are the fields of the objective's
dataclass and become flags of their own (``denser train --objective sdpo --help``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from denser.kernels.options import BACKENDS
from denser.objectives import DEFAULT_OBJECTIVE
from denser.objectives.fields import type_problems
from denser.trainers.rollout import DEFAULT_ENGINE, list_rollout_engines


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    objective: str = _f(DEFAULT_OBJECTIVE, "registered objective to optimise (see `denser objectives`)")
    model: str = _f("default", "'default' (embedded SmolLM2-135M-Instruct), 'tiny' (random-init, for tests) or a local HF model directory")
    task: str = _f("", "built-in task name (see `denser tasks`), file:PATH (jsonl/json/csv/parquet/arrow or a dataset directory) or hf:NAME[:CONFIG], with options after '?' (docs/tasks.md); empty = the default task")
    steps: int = _f(12, "optimiser steps (one rollout batch each)")
    num_generations: int = _f(4, "completions per prompt (the group size)")
    prompts_per_step: int = _f(4, "prompts per step on each process")
    max_new_tokens: int = _f(24, "generation budget per completion")
    temperature: float = _f(1.0, "sampling temperature; the loss core uses the same temperature for log-probs")
    top_p: float = _f(1.0, "nucleus sampling mass (1.0 = off)")
    micro_batch_size: int = _f(8, "completions per forward/backward micro-batch (gradient accumulation over the step)")
    lr: float = _f(2e-5, "peak learning rate (AdamW)")
    lr_schedule: Literal["constant", "linear", "cosine"] = _f("constant", "learning-rate schedule after warmup")
    warmup_steps: int = _f(0, "linear warmup steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta2: float = _f(0.99, "AdamW beta2")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this (0 = off)")
    seed: int = _f(0, "seed of data order, sampling and the tiny model")
    output_dir: str = _f("", "run directory (config.yaml, metrics.jsonl, checkpoints); empty = runs/<objective>-<task>")
    resume: bool = _f(False, "continue the run in --output-dir from its newest complete checkpoint")
    overwrite: bool = _f(False, "replace an existing run in --output-dir")
    eval_every: int = _f(0, "greedy eval accuracy every N steps (0 = only before and after training)")
    eval_size: int = _f(32, "eval-split prompts used by each eval")
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end)")
    keep_last: int = _f(2, "checkpoints to keep")
    engine: str = _f(DEFAULT_ENGINE, "rollout engine (registered with denser.trainers.register_rollout_engine): "
                     + " | ".join(list_rollout_engines()))
    backend: str = _f("auto", "loss-core backend: " + " | ".join(BACKENDS))
    chunk_size: int = _f(0, "loss-core tokens per chunk (0 = sized from the vocabulary)")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "parameter dtype")
    teacher_max_context_tokens: int = _f(768, "teacher contexts longer than this are truncated on the left")
    max_consecutive_skips: int = _f(5, "stop after this many consecutive non-finite updates")
    cpu: bool = _f(False, "force CPU even when a GPU is present")
    fsdp: bool = _f(False, "shard the policy, reference and teacher across processes with FSDP2 (launch with torchrun; "
                    "an accelerate config with distributed_type FSDP turns it on too); without it, processes run DDP")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        problems = type_problems(self, _flag)
        if problems:  # wrong types first: the range checks below would fail on them in confusing ways
            raise ValueError("; ".join(problems))
        for name in ("steps", "num_generations", "prompts_per_step", "max_new_tokens", "micro_batch_size", "eval_size",
                     "keep_last", "max_consecutive_skips", "teacher_max_context_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{_flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps", "chunk_size"):
            if getattr(self, name) < 0:
                problems.append(f"{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "temperature", "top_p", "weight_decay", "adam_beta2", "max_grad_norm"):
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{_flag(name)} must be a finite number, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
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
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite contradict each other; pick one")
        if problems:
            raise ValueError("; ".join(problems))


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"
