"""`denser continual` stopped by SIGTERM (inside a stage's training, during a stage's measurement) and
resumed with the command it prints ends with the record of a run never stopped (but for times),
and with bit-identical final weights, optimizer and EMA teacher.

Every run is a subprocess of this very file (``python tests/test_continual_preemption.py [hooks] --
continual flags``): it registers two tasks the random tiny model scores on (reward for an even- or
odd-length reply: groups vary, advantages are non-zero, SDPO finds teachers; scoring draws no random
numbers), installs the hooks and calls ``denser.cli.main(["continual", ...])``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import assert_same_state  # noqa: E402

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
TASKS = ("parity_even", "parity_odd")
STEPS = 2
# large steps, so a resume that restores anything wrongly changes the weights and the accuracies
TINY = ["--model", "tiny", "--tasks", ",".join(TASKS), "--eval-tasks", "compare", "--steps-per-task", str(STEPS),
        "--eval-size", "4", "--max-new-tokens", "6", "--num-generations", "4", "--prompts-per-step", "2",
        "--micro-batch-size", "4", "--lr", "3e-3", "--temperature", "1.3", "--spectral-rank", "2",
        "--eval-samples", "2", "--no-progress", "--cpu"]
CASES = {
    "ema-carry": ["--objective", "sdpo", "--teacher", "ema", "--teacher-update-rate", "0.3", "--carry-optimizer"],
    "frozen-reset": ["--objective", "sdpo", "--teacher", "frozen", "--teacher-init-alpha", "0.5", "--teacher-reset"],
}


def run(*args: str, hooks: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(HERE), *(f"{k}={v}" for k, v in (hooks or {}).items()), "--", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def comparable(run_dir: Path) -> dict:
    """continual.json without what differs between any two runs: wall-clock times, the command, the
    flags (the output directory, --resume) and the run directory in checkpoint paths."""
    r = json.loads((run_dir / "continual.json").read_text())
    for k in ("command", "config", "elapsed_s"):
        r.pop(k)
    for s in r["stages"]:
        s.pop("measure_time_s")
        if s["checkpoint"]:
            s["checkpoint"] = str(Path(s["checkpoint"]).relative_to(run_dir))
        if s["train"]:
            for k in ("time_s", "step_time_s"):
                s["train"].pop(k)
            for row in s["train"]["steps_log"]:
                row.pop("step_time_s")
    return r


def resume_command(stopped: subprocess.CompletedProcess) -> list[str]:
    line = stopped.stderr.strip().splitlines()[-1]
    assert "; continue with: denser continual " in line, line
    return shlex.split(line.split("; continue with: denser continual ", 1)[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs, one per case."""
    root = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for name, args in CASES.items():
        done = run(*args, *TINY, "--output-dir", str(root / name))
        assert done.returncode == 0, done.stderr[-3000:]
        out[name] = root / name
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigterm_inside_a_stage_resumes_inside_it_and_ends_as_a_run_never_stopped(reference, tmp_path, case):
    run_dir = tmp_path / "run"
    args = [*CASES[case], *TINY, "--output-dir", str(run_dir)]
    stopped = run(*args, hooks={"signal_at_step": "2:2"})  # stage 2 (parity_odd), as its step 2 begins
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    stage2 = run_dir / "stages" / "02-parity_odd"
    saved = stage2 / "checkpoints" / "step-000001"
    line = stopped.stderr.strip().splitlines()[-1]
    assert re.match(r"denser continual: stopped by SIGTERM at step 2, after generation \([0-9.]+ s from the signal "
                    rf"to here, [0-9.]+ s to save\); step 1 of {STEPS} of stage 2 \(parity_odd\) is saved in "
                    f"{re.escape(str(saved))}; continue with: denser continual ", line), line
    record = json.loads((run_dir / "continual.json").read_text())
    assert record["status"] == "stopped" and len(record["stages"]) == 2
    assert record["in_progress"] == {"stage": 2, "task": "parity_odd", "dir": "stages/02-parity_odd"}
    command = resume_command(stopped)
    assert command[-1] == "--resume" and "--output-dir" in command
    resumed = run(*command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming " in resumed.stdout and "after stage 1, inside stage 2" in resumed.stdout
    assert f"resumed from {saved} (step 1" in resumed.stdout
    assert "stage 2/2" not in resumed.stdout  # the stage did not start over
    assert comparable(run_dir) == comparable(reference[case])
    final = f"stages/02-parity_odd/checkpoints/step-{STEPS:06d}"
    assert_same_state(reference[case] / final, run_dir / final)


def test_sigterm_during_a_measurement_measures_that_stage_again_on_resume(reference, tmp_path):
    run_dir = tmp_path / "run"
    args = [*CASES["ema-carry"], *TINY, "--output-dir", str(run_dir)]
    stopped = run(*args, hooks={"signal_at_measure": "1"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert re.match(r"denser continual: stopped by SIGTERM at the measurement after stage 1 \([0-9.]+ s from the "
                    rf"signal\); stage 0 is measured in {re.escape(str(run_dir / 'continual.json'))}; stage 1 "
                    r"\(parity_even\) is trained, its measurement is done again on resume; continue with: ", line), line
    stage1 = run_dir / "stages" / "01-parity_even" / "checkpoints" / f"step-{STEPS:06d}"
    assert json.loads((stage1 / "state" / "trainer_state.json").read_text())["finished"]
    resumed = run(*resume_command(stopped))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "already complete" in resumed.stdout
    assert comparable(run_dir) == comparable(reference["ema-carry"])


def test_a_record_of_an_earlier_denser_restarts_the_unfinished_stage_from_its_beginning(reference, tmp_path):
    """A record without ``in_progress`` (written before stops resumed inside a stage) resumes as it
    always did: after its last measured stage, the next stage from its beginning (its directory,
    checkpoints included, replaced); the run still ends as one never stopped."""
    run_dir = tmp_path / "run"
    args = [*CASES["ema-carry"], *TINY, "--output-dir", str(run_dir)]
    stopped = run(*args, hooks={"signal_at_step": "2:2"})
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    path = run_dir / "continual.json"
    record = json.loads(path.read_text())
    del record["in_progress"]
    record["status"] = "running"
    path.write_text(json.dumps(record))
    resumed = run(*resume_command(stopped))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage 2/2: sdpo on parity_odd" in resumed.stdout and "resumed from" not in resumed.stdout
    assert comparable(run_dir) == comparable(reference["ema-carry"])


# ----------------------------------------------------------------------------------- the driver


def _register_tasks() -> None:
    from denser.tasks import Score, register_task
    from denser.tasks.builtin import Addition

    def parity(name: str, even: bool):
        @register_task(name, f"addition prompts; reward 1 for an {'even' if even else 'odd'}-length reply")
        class Parity(Addition):
            def check(self, completion, row):
                ok = (len(completion) % 2 == 0) == even
                return Score(float(ok), None if ok else "Wrong parity of the reply's length.", None)

        return Parity

    parity("parity_even", True)
    parity("parity_odd", False)


def _install_hooks(hooks: dict[str, str]) -> None:
    """signal_at_step=K:S   SIGTERM to this process as stage K's trainer begins step S (1-based)
    signal_at_measure=K  SIGTERM to this process as the measurement after stage K begins"""
    from denser.continual.measure import StageMeasurer
    from denser.trainers import loop

    if "signal_at_step" in hooks:
        stage, step = (int(x) for x in hooks["signal_at_step"].split(":"))
        real_step = loop.Trainer.step

        def signalling_step(self, s):
            if Path(self.cfg.output_dir).name.startswith(f"{stage:02d}-") and s + 1 == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_step(self, s)

        loop.Trainer.step = signalling_step
    if "signal_at_measure" in hooks:
        at = int(hooks["signal_at_measure"])
        real_measure = StageMeasurer.measure

        def signalling_measure(self, stage, *a, **k):
            if stage == at:
                os.kill(os.getpid(), signal.SIGTERM)
            return real_measure(self, stage, *a, **k)

        StageMeasurer.measure = signalling_measure


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--")
    _register_tasks()
    _install_hooks(dict(a.split("=", 1) for a in argv[:split]))
    from denser.cli import main

    code = main(["continual", *argv[split + 1:]])
    from denser.cli import exit_process  # as the entry point ends: the group destroyed, no teardown

    exit_process(code)
