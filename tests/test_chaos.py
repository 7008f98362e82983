"""Chaos: a run killed at random moments again and again, each time resumed, ends bit-identical to
a run never interrupted; SIGTERM at a random moment loses no finished step.

Each attempt is a real ``denser train`` subprocess (the driver of tests/test_resume.py, with its
``phases`` hook printing "PHASE <phase> <step>" as each phase begins). A kill lands either at a
random time over the rest of the run, or shortly after a randomly chosen phase begins (generation,
backward, the optimiser update, checkpoint write), so every phase the issue names is hit. Every kill is
printed (``pytest -s``) with the phase it landed in; ``DENSER_CHAOS_LOG=FILE`` appends them as JSON
lines.

CI runs the short version: per objective (grpo; sdpo with an EMA teacher), two SIGKILLs and a
SIGTERM in a row, then the last resume to the end. The long version is opt-in:
``DENSER_CHAOS=N pytest tests/test_chaos.py -s`` kills N times per objective and signal (SIGKILL,
SIGTERM), in as many episodes as that takes (``DENSER_CHAOS_SEED`` fixes the random moments).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from denser.trainers import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import CASES, FAST, assert_same_run, driver, metrics_rows  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 6
TARGET_PHASES = ("generate", "backward", "optimizer", "save")


def chaos_args(objective: str) -> list[str]:
    return [*CASES[objective][0], *FAST, "--steps", str(STEPS), "--save-every", "1"]


class Attempt:
    """One ``denser train`` subprocess whose PHASE lines are read (and timed) by a thread."""

    def __init__(self, args: list[str]):
        self.proc = driver(*args, hooks={"phases": "1"})
        self.phases: list[tuple[float, str]] = []  # (monotonic time read, "generate 3")
        self.stderr: list[str] = []
        self.started = threading.Event()
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("PHASE "):
                self.phases.append((time.monotonic(), line[6:].strip()))
                self.started.set()
        self.started.set()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)

    def wait_for(self, phase: str, nth: int, timeout: float = 300) -> bool:
        """Until the ``nth`` PHASE line of ``phase`` (False if the run ended first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for _, p in self.phases if p.split()[0] == phase) >= nth:
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.002)
        raise AssertionError(f"no PHASE {phase} within {timeout} s")

    def phase_at(self, t: float) -> str:
        seen = [p for when, p in list(self.phases) if when <= t]
        return seen[-1] if seen else "start-up"

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout=timeout)
        for t in self._threads:
            t.join(timeout=10)
        return rc


def _finished_steps(run: Path) -> int:
    return max([r["step"] for r in metrics_rows(run) if "loss" in r] or [0]) if (run / "metrics.jsonl").exists() else 0


def _saved_step(run: Path) -> int:
    latest = ckpt.latest_checkpoint(run, verify=True)
    return ckpt.checkpoint_step(latest) if latest else 0


def _complete(run: Path) -> bool:
    latest = ckpt.latest_checkpoint(run)
    return latest is not None and json.loads((latest / "state" / "trainer_state.json").read_text()).get("finished", False)


def _reference(tmp_path_factory, cache: dict, objective: str) -> tuple[Path, float]:
    """The uninterrupted run of ``objective`` and the seconds it trained (first PHASE to exit)."""
    if objective not in cache:
        run = tmp_path_factory.mktemp(f"chaos-ref-{objective}") / "run"
        a = Attempt([*chaos_args(objective), "--output-dir", str(run)])
        a.started.wait(300)
        t0 = time.monotonic()
        rc = a.finish()
        assert rc == 0, "".join(a.stderr)[-3000:]
        cache[objective] = (run, time.monotonic() - t0)
    return cache[objective]


def _one_kill(a: Attempt, sig: int, rng: random.Random, remaining_s: float, remaining_steps: int) -> dict:
    """Kill attempt ``a`` at a random moment; returns what happened (phase None: it ended first)."""
    a.started.wait(300)
    if rng.random() < 0.5:
        how = "random time"
        deadline = time.monotonic() + rng.uniform(0.0, remaining_s)
        while time.monotonic() < deadline and a.proc.poll() is None:
            time.sleep(0.002)
    else:
        phase = rng.choice(TARGET_PHASES)
        nth = rng.randint(1, max(1, remaining_steps))
        how = f"after PHASE {phase} #{nth}"
        if a.wait_for(phase, nth):
            time.sleep(rng.uniform(0.0, 0.02))
    t_kill = time.monotonic()
    if a.proc.poll() is None:
        a.proc.send_signal(sig)
    rc = a.finish()
    return {"signal": signal.Signals(sig).name, "how": how, "landed": a.phase_at(t_kill), "rc": rc}


def run_chaos(tmp_path: Path, reference: tuple[Path, float], objective: str, signals: list[int], seed: int,
              log: list[dict]) -> None:
    """Episodes of kills with the given signals in turn, each episode resumed to its end and compared
    with the reference; returns when every signal of ``signals`` has been sent once."""
    ref_dir, ref_s = reference
    rng = random.Random(seed)
    args = chaos_args(objective)
    queue = list(signals)
    episode = 0
    while queue:
        run = tmp_path / f"episode-{episode}"
        resume: list[str] = []
        while queue:
            saved = _saved_step(run) if run.exists() else 0
            left = STEPS - saved
            a = Attempt([*args, "--output-dir", str(run), *resume])
            resume = ["--resume"]
            event = _one_kill(a, queue[0], rng, ref_s * (left + 0.5) / STEPS, left)
            if event["rc"] == 0 or _complete(run):  # the run ended before the signal (or was exiting): done
                print(f"chaos: {event['signal']} came after the run's end ({event['landed']}, rc {event['rc']})")
                break
            queue.pop(0)
            event.update(objective=objective, episode=episode, checkpoint_before=saved, checkpoint_after=_saved_step(run),
                         finished_steps=_finished_steps(run))
            if event["signal"] == "SIGKILL":
                assert event["rc"] == -signal.SIGKILL, "".join(a.stderr)[-3000:]
            else:  # a graceful stop: every finished step is in the newest checkpoint
                assert event["rc"] == 143, "".join(a.stderr)[-3000:]
                assert event["checkpoint_after"] == event["finished_steps"], event
                assert a.stderr[-1].startswith("denser train: stopped by SIGTERM"), a.stderr[-3:]
            log.append(event)
            print(f"chaos kill {len(log)}: {json.dumps(event)}", flush=True)
            if os.environ.get("DENSER_CHAOS_LOG"):
                with open(os.environ["DENSER_CHAOS_LOG"], "a") as f:
                    f.write(json.dumps(event) + "\n")
        else:  # the signals ran out: resume to the end
            a = Attempt([*args, "--output-dir", str(run), "--resume"])
            assert a.finish() == 0, "".join(a.stderr)[-3000:]
        assert_same_run(ref_dir, run, STEPS)
        episode += 1


_REFS: dict = {}


@pytest.mark.parametrize("objective", ["grpo", "sdpo"])
def test_kills_in_a_row_then_resume_end_bit_identical(tmp_path, tmp_path_factory, objective):
    """Short version (CI): SIGKILL, SIGKILL, SIGTERM at random moments of one run, each resumed."""
    seed = int(os.environ.get("DENSER_CHAOS_SEED") or random.randrange(2**31))
    print(f"chaos seed {seed}")
    log: list[dict] = []
    run_chaos(tmp_path, _reference(tmp_path_factory, _REFS, objective), objective,
              [signal.SIGKILL, signal.SIGKILL, signal.SIGTERM], seed, log)
    assert len(log) == 3


@pytest.mark.skipif(not os.environ.get("DENSER_CHAOS"), reason="many kills, minutes: DENSER_CHAOS=N (kills each)")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("objective", ["grpo", "sdpo"])
def test_many_random_kills_end_bit_identical(tmp_path, tmp_path_factory, objective, sig):
    n = int(os.environ["DENSER_CHAOS"])
    n = 10 if n == 1 else n
    seed = int(os.environ.get("DENSER_CHAOS_SEED") or random.randrange(2**31))
    print(f"chaos seed {seed}: {n} x {sig} on {objective}")
    log: list[dict] = []
    run_chaos(tmp_path, _reference(tmp_path_factory, _REFS, objective), objective, [getattr(signal, sig)] * n, seed,
              log)
    assert len(log) == n
    landed = sorted({e["landed"].split()[0] for e in log})
    print(f"{sig} on {objective}: {n} kills landed in phases {landed}")
