"""Benchmarks of the loss core and the training loop, runnable from an installed package.

    denser bench [flags]         # CPU loss-core table (also: python -m denser.bench, python -m bench in a clone)
    denser bench gpu [flags]     # CUDA loss-core table against the four-matmul floor and Liger-Kernel
    denser bench loop [flags]    # seconds per step of `denser train`, split into phases
    denser bench step [flags]    # peak RSS and seconds of one whole training step vs N tokens, denser vs TRL
    denser bench lora [flags]    # peak RSS and seconds per step of `denser train`, full fine-tuning vs LoRA
    denser bench fsdp [flags]    # peak memory per process of `denser train --fsdp`, 1 vs N processes
    denser bench sandbox [flags] # programs per second of the sandbox, pool vs one at a time; overhead per program

``denser bench <kind> --help`` lists each one's flags. The pytest-benchmark cases and the recorded
results live in the repository's ``bench/`` folder.
"""

from __future__ import annotations

import importlib
import sys

#: the benchmarks named by a first argument (their modules in ``denser.bench``); anything else goes to
#: the loss-core benchmark. Imported when picked: ``python -m denser.bench.step`` imports this package
#: first, and a package that had already imported ``step`` would make runpy warn and run it twice over.
KINDS = {"gpu": "gpu", "loop": "loop", "step": "step", "fsdp": "fsdp", "lora": "lora", "sandbox": "sandbox"}


def main(argv: list[str] | None = None) -> int:
    """``denser bench``: ``gpu``, ``loop``, ``step``, ``fsdp``, ``lora`` or ``sandbox`` as the first argument picks that benchmark, otherwise
    the arguments are the CPU loss-core benchmark's flags. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in KINDS:
        return importlib.import_module(f"denser.bench.{KINDS[argv[0]]}").main(argv[1:])
    return importlib.import_module("denser.bench.loss_core").main(argv)


__all__ = ["KINDS", "main"]
