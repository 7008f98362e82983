"""``denser``: train | eval | continual | report | compare | objectives | tasks | bench | merge-lora | export.

    denser train --objective sdpo                       # the embedded model on the default task
    denser train --objective grpo --model tiny --steps 3
    denser train --objective sdpo --help                # every sdpo field is a flag
    denser train --import my_objectives.py --objective reinforce --report-to tensorboard
    denser eval --model runs/grpo-addition --tasks addition,compare --samples 8 --json eval.json
    denser continual --objective sdpo --tasks addition,compare --eval-tasks logic
    denser report RUN ; denser report drift A B ; denser compare RUN RUN
    denser objectives ; denser tasks ; denser bench
    denser train --objective grpo --lora-r 16 ; denser merge-lora runs/grpo-addition
    denser export runs/sdpo-addition                    # an FSDP run's sharded checkpoint as a model
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from denser.cli.commands import COMMANDS
from denser.cli.flags import CLIError, build_train_parser, load_config_file, one_line, parse_run_args, parse_train_args

__all__ = ["COMMANDS", "CLIError", "build_train_parser", "load_config_file", "main", "parse_run_args", "parse_train_args",
           "run"]

STOP_EXIT_CODES = (130, 143)  # a graceful stop by SIGINT / SIGTERM (denser.trainers.preemption.exit_code)


def main(argv: list[str] | None = None) -> int:
    """``denser COMMAND ...`` (the console script and ``python -m denser``): the command's exit code;
    a bad command line is one line on stderr and exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"denser: unknown command {cmd!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](rest)
    except ValueError as e:  # CLIError, and the ValueError of a bad value found before any compute
        print(f"denser {cmd}: error: {one_line(e)}", file=sys.stderr)
        return 2


def run() -> None:
    """The console script and ``python -m denser``: :func:`main`, then exit with its code.

    After a graceful stop (exit code 130 / 143: the checkpoint is written and fsynced, the trackers
    are closed, the last line is printed) the process ends at once, without the interpreter's
    teardown: freeing torch's and transformers' module graph takes seconds on a busy machine, and a
    launcher's grace period (30 s before SIGKILL) is better spent on the checkpoint. A process of a
    multi-process run ends the same way, whatever its code, once its process group is destroyed: in the
    teardown Gloo's threads can still abort a rank whose run finished (:func:`_end_process_group`)."""
    exit_process(main())


def exit_process(code: int) -> NoReturn:
    """End this process with ``code`` as :func:`run` does (its docstring): the process group of a
    multi-process run destroyed first, then, after a graceful stop or in such a run, ``os._exit`` once
    the logs and streams are flushed; else ``sys.exit``. Scripts that drive :func:`main` under
    ``torchrun`` (the opt-in multi-process tests) end through it too."""
    ended_group = _end_process_group()
    if code in STOP_EXIT_CODES or ended_group:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _end_process_group() -> bool:
    """Destroy the torch.distributed process group of a multi-process run (accelerate launch) before
    the interpreter's teardown; True if there was one. Left to that teardown, Gloo's worker threads can
    still hold work whose tensors need the GIL while the interpreter is being finalised, and a rank ends
    in SIGABRT ("terminate called without an active exception") after a run that finished: seen once in
    CI on the two-process LoRA run, and twice on 2026-12-06 on the two-process grpo run with the group
    destroyed first, so :func:`run` then skips the teardown altogether. Only when torch.distributed is
    already imported (no torch import for a command that did not use it)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        return True
    return False
