"""The run configuration of ``denser train``: every field is a documented CLI flag.

The objective's own hyper-parameters are not here: they are the fields of the objective's
dataclass and become flags of their own (``denser train --objective sdpo --help``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    objective: str = _f("sdpo", "registered objective to optimise (see `denser objectives`)")
    model: str = _f("default", "'default' (embedded SmolLM2-135M-Instruct), 'tiny' (random-init, for tests) or a local HF model directory")
    task: str = _f("", "built-in task name (see `denser tasks`) or file:PATH.jsonl; empty = the default task")
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
    backend: str = _f("auto", "loss-core backend: auto | chunked | reference | triton")
    chunk_size: int = _f(0, "loss-core tokens per chunk (0 = sized from the vocabulary)")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "parameter dtype")
    teacher_max_context_tokens: int = _f(768, "teacher contexts longer than this are truncated on the left")
    max_consecutive_skips: int = _f(5, "stop after this many consecutive non-finite updates")
    cpu: bool = _f(False, "force CPU even when a GPU is present")
    progress: bool = _f(True, "show a progress bar")

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "num_generations", "prompts_per_step", "max_new_tokens", "micro_batch_size", "eval_size", "keep_last"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "warmup_steps", "chunk_size"):
            if getattr(self, name) < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            problems.append(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.resume and self.overwrite:
            problems.append("--resume and --overwrite contradict each other; pick one")
        if problems:
            raise ValueError("; ".join(problems))


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))
