"""Benchmarks of the loss core and the training loop, runnable from an installed package.

    denser bench [flags]         # CPU loss-core table (also: python -m denser.bench, python -m bench in a clone)
    denser bench gpu [flags]     # CUDA loss-core table against the four-matmul floor and Liger-Kernel
    denser bench loop [flags]    # seconds per step of `denser train`, split into phases
    denser bench step [flags]    # peak RSS and seconds of one whole training step vs N tokens, denser vs TRL
    denser bench fsdp [flags]    # peak memory per process of `denser train --fsdp`, 1 vs N processes

``denser bench <kind> --help`` lists each one's flags. The pytest-benchmark cases and the recorded
results live in the repository's ``bench/`` folder.
"""

from __future__ import annotations

import sys

from denser.bench import fsdp, gpu, loop, loss_core, step

#: the benchmarks named by a first argument; anything else goes to the loss-core benchmark
KINDS = {"gpu": gpu.main, "loop": loop.main, "step": step.main, "fsdp": fsdp.main}


def main(argv: list[str] | None = None) -> int:
    """``denser bench``: ``gpu``, ``loop``, ``step`` or ``fsdp`` as the first argument picks that benchmark, otherwise
    the arguments are the CPU loss-core benchmark's flags. Returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in KINDS:
        return KINDS[argv[0]](argv[1:])
    return loss_core.main(argv)


__all__ = ["KINDS", "main"]
