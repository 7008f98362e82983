"""Preemption: a graceful stop on SIGTERM and Ctrl-C, and a save clock, agreed by every process.

A cluster scheduler sends SIGTERM and kills with SIGKILL after a grace period (Slurm's KillWait,
torchrun's and accelerate's signal forwarding: 30 s by default); a person presses Ctrl-C. So:

- :class:`StopSignals` catches SIGTERM and SIGINT. The first one only sets a flag (and says so on
  stderr); it also restores the default action of both signals, so a second one ends the process
  at once, even inside a long C call or a collective that will never return.
- :class:`StopControl` answers the loop's two questions at its check points: "stop now?" (the
  flag) and, at step boundaries, "save now?" (the clock of ``--save-every-minutes``). With several
  processes each answer is an all-reduce max over all of them, so every process stops (or saves) at
  the same check point and none waits in a collective for a peer that has left; the loop places its
  check points where every process passes in the same order (after generation, after each
  micro-batch, at each step boundary).
- :meth:`StopControl.during_generation` is what the rollout engine polls; the ``hf`` engine
  (:func:`denser.engines.hf.abandon_forward_on_stop`) makes a long forward (a generation's prefill
  takes seconds on a busy CPU) end within one layer once a stop is requested (single process only).
- :class:`Interrupted` is what a check raises: the loop abandons the step in progress, writes a
  checkpoint of the last finished step (with the RNG streams snapshotted at that step's boundary,
  so the resumed run is bit-identical to an uninterrupted one) and the CLI exits with
  ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), as a shell reports a process the signal ended.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """``128 + signum``: 143 for SIGTERM, 130 for SIGINT (what a shell reports for the signal)."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(Exception):
    """A stop was requested (a signal on some process); raised at a check point of the loop.

    ``where``: the check point ("step start", "generation", "micro-batch 2/4", "final eval").
    The loop fills in ``step`` (the last finished step), ``checkpoint`` (the checkpoint holding
    it, or None), ``head`` (what happened, where, how long it took) and ``message`` (one line:
    ``head``, where the checkpoint is, how to resume)."""

    def __init__(self, signum: int, where: str):
        super().__init__(f"stopped by {signal_name(signum)} at {where}")
        self.signum, self.where = int(signum), where
        self.step: int | None = None
        self.checkpoint = None
        self.head = self.message = str(self)
        self.is_main = True

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


class StopSignals:
    """SIGTERM and SIGINT handlers: the first signal sets :attr:`signum`; the second ends the process.

    Use as a context manager around a run; the previous handlers come back on exit. Outside the
    main thread (where Python cannot install handlers) it installs nothing and never fires, and
    :meth:`request` still works (for a caller that wants to stop a run itself)."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS, *, announce: bool = True):
        self.signals = tuple(signals)
        self.announce = announce
        self.signum: int | None = None
        self.received_at: float | None = None  # time.monotonic() of the first signal
        self._previous: dict[int, object] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)  # None: set outside Python
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Ask for a stop as if ``signum`` had arrived (the handler, without the second-signal arming)."""
        if self.signum is None:
            self.signum, self.received_at = int(signum), time.monotonic()

    def _handle(self, signum, frame) -> None:
        self.request(signum)
        for s in self.signals:  # a second signal (either kind) ends the process at once
            signal.signal(s, signal.SIG_DFL)
        if self.announce:  # os.write: print() from a handler can re-enter a print in progress
            line = (f"denser: {signal_name(signum)} received: finishing at the next check point (the step in "
                    "progress is abandoned) and writing a checkpoint of the last finished step; "
                    "a second signal stops at once\n")
            try:
                os.write(2, line.encode())
            except OSError:  # pragma: no cover - stderr closed
                pass


class StopControl:
    """The collective "stop?" and "save?" decisions of a run's processes.

    ``signals``: a :class:`StopSignals` (None: no stop is ever requested). ``save_every_minutes``:
    the save clock (0: off); it starts at construction and :meth:`saved` restarts it.
    ``world``/``device``: the processes and the device of their collectives (``world == 1``: no
    collective, the local flag and clock decide)."""

    def __init__(self, signals: StopSignals | None, *, save_every_minutes: float = 0.0, world: int = 1,
                 device: torch.device | str = "cpu", clock: Callable[[], float] = time.monotonic):
        self.signals = signals
        self.interval_s = float(save_every_minutes) * 60.0
        self.world, self.device, self.clock = world, torch.device(device), clock
        self.last_save = clock()

    def _local_signum(self) -> int:
        return int(self.signals.signum or 0) if self.signals is not None else 0

    def _all_max(self, values: list[float]) -> list[float]:
        if self.world <= 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                         device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    @property
    def during_generation(self) -> Callable[[], bool] | None:
        """For ``engine.generate(stop=...)``: True once this process was asked to stop, so a long
        generation ends at its next token. Local, no collective (processes may generate different
        numbers of tokens); the collective :meth:`check` right after generation then makes every
        process abandon the step. None when no signals are watched."""
        if self.signals is None:
            return None
        return lambda: self.signals.signum is not None

    def check(self, where: str) -> None:
        """Raise :class:`Interrupted` if any process was asked to stop (collective when world > 1)."""
        signum = int(self._all_max([float(self._local_signum())])[0])
        if signum:
            raise Interrupted(signum, where)

    def boundary(self, where: str = "step start") -> bool:
        """At a step boundary: raise :class:`Interrupted` on a stop; else whether a timed save is due.

        One collective for both answers; every process gets the same ones."""
        due = self.interval_s > 0 and self.clock() - self.last_save >= self.interval_s
        signum, due_any = self._all_max([float(self._local_signum()), float(due)])
        if int(signum):
            raise Interrupted(int(signum), where)
        return bool(due_any)

    def saved(self) -> None:
        """A checkpoint was written: the save clock restarts."""
        self.last_save = self.clock()
