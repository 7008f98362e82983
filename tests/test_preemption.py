"""Graceful stop: SIGTERM and Ctrl-C abandon the step in progress, save the last finished step
(bit-exact on resume) and exit 143 / 130; a second signal stops at once; --save-every-minutes.

The subprocess tests run ``denser train`` through the driver of tests/test_resume.py (its
``signal_at`` hook sends the signal to the process itself as a chosen phase begins, so it lands
where the test says; the Ctrl-C test sends it from outside)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from denser.cli import main
from denser.trainers import checkpoint as ckpt
from denser.trainers.preemption import Interrupted, StopControl, StopSignals, exit_code

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_checkpoint import QUICK  # noqa: E402
from test_resume import CASES, FAST, assert_same_run, driver, metrics_rows, run_driver  # noqa: E402

# ------------------------------------------------------------------------------------- units


def test_first_signal_sets_the_flag_and_arms_the_default_for_a_second():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals(announce=False) as stop:
        assert stop.signum is None
        os.kill(os.getpid(), signal.SIGTERM)  # the Python handler runs before the next bytecode
        time.sleep(0.01)
        assert stop.signum == signal.SIGTERM and stop.received_at is not None
        # a second signal of either kind now takes the default action: the process ends at once
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert {s: signal.getsignal(s) for s in before} == before  # the previous handlers are back


def test_stop_control_raises_at_check_points_and_the_save_clock_ticks():
    now = [1000.0]
    signals = StopSignals()  # not installed: request() stands in for a signal
    control = StopControl(signals, save_every_minutes=2, clock=lambda: now[0])
    control.check("anywhere")  # nothing requested: no-op
    assert control.boundary() is False
    now[0] += 119.0
    assert control.boundary() is False
    now[0] += 1.0
    assert control.boundary() is True  # 2 minutes since the clock started
    control.saved()
    assert control.boundary() is False
    assert StopControl(None, save_every_minutes=0, clock=lambda: now[0] + 1e9).boundary() is False  # 0 = off
    signals.request(signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        control.check("step 3, after generation")
    assert e.value.exit_code == 130 and e.value.where == "step 3, after generation"
    with pytest.raises(Interrupted):
        control.boundary()
    assert exit_code(signal.SIGTERM) == 143


@pytest.mark.parametrize("share_prefill", [True, False])
def test_generation_ends_at_the_next_token_or_layer_once_a_stop_is_requested(share_prefill):
    from denser.engines import HFRolloutEngine, SamplingParams
    from denser.trainers.models import build_tiny_model

    model, tok = build_tiny_model(seed=0)
    engine = HFRolloutEngine(model, tok, share_prefill=share_prefill)
    prefills = 1 if share_prefill else 0  # the shared prefill's forward (the two prompts share no prefix) comes first
    params = SamplingParams(max_new_tokens=12, num_generations=2)
    prompts = [[5, 6, 7], [8, 9]]
    plain = engine.generate(prompts, params, seed=1)
    assert engine.generate(prompts, params, seed=1, stop=lambda: False).completion_ids == plain.completion_ids
    assert max(len(c) for c in plain.completion_ids) > 3
    forwards = []
    counting = model.register_forward_hook(lambda m, a, o: forwards.append(1))
    try:  # asked to stop once the third token's forward is done: the third token is the last
        cut = engine.generate(prompts, params, seed=1, stop=lambda: len(forwards) >= 3 + prefills)
    finally:
        counting.remove()
    assert max(len(c) for c in cut.completion_ids) == 3
    assert [c[:3] for c in cut.completion_ids] == [c[:3] for c in plain.completion_ids]
    # asked to stop while a forward runs (as the prefill's second layer begins): it ends there, no token
    entered = []
    watch = model.model.layers[1].register_forward_pre_hook(lambda m, a: entered.append(1))  # runs before the poll
    try:
        cut = engine.generate(prompts, params, seed=1, stop=lambda: bool(entered))
    finally:
        watch.remove()
    assert cut.completion_ids == [[], [], [], []] and cut.truncated.all() and len(entered) == 1
    assert not model.model.layers[1]._forward_pre_hooks  # the engine's polls are gone


def test_save_every_minutes_writes_checkpoints_by_the_clock(tmp_path):
    run = tmp_path / "run"
    args = ["train", *QUICK, "--steps", "3", "--keep-last", "5", "--output-dir", str(run)]
    assert main([*args, "--save-every-minutes", "1e-9"]) == 0  # due at every step boundary
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000001", "step-000002", "step-000003"]
    for p in ckpt.complete_checkpoints(run):
        ckpt.verify_checkpoint(p)
    assert main([*args, "--overwrite"]) == 0  # the default, 30 minutes: only the final one in a short run
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000003"]
    assert main([*args, "--overwrite", "--save-every-minutes", "-1"]) == 2


@pytest.mark.parametrize("call, where", [(1, "the evaluation before training"), (2, "step 1, after generation")])
def test_a_stop_before_any_step_finished_saves_nothing_and_says_so(tmp_path, monkeypatch, capsys, call, where):
    from denser.engines import HFRolloutEngine

    real = HFRolloutEngine.generate
    calls = []

    def generate(self, *a, **k):  # call 1: the eval before training; call 2: step 1's rollout
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)
    before = signal.getsignal(signal.SIGTERM)
    run = tmp_path / "run"
    assert main(["train", *QUICK, "--steps", "3", "--output-dir", str(run)]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(rf"denser train: stopped by SIGTERM at {where} \([0-9.]+ s from the signal to here\): no step "
                        "had finished, nothing to save; rerun the same command to start over", err[-1]), err
    assert ckpt.complete_checkpoints(run) == [] and len(calls) == call
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is gone after the run


# ------------------------------------------------------------------------- real subprocesses


STEPS = 4
# (objective, phase the signal lands in, signal, exit code)
STOPS = {
    "grpo-sigterm-generation": ("grpo", "generate", "TERM", 143, "after generation"),
    "sdpo-sigint-backward": ("sdpo", "backward", "INT", 130, "after micro-batch 1/2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STOPS))
def test_a_signal_mid_step_saves_the_last_finished_step_and_resume_is_bit_exact(tmp_path, name):
    """SIGTERM / SIGINT inside step 3 (of 4, no periodic checkpoints): exit 143 / 130 with a
    checkpoint of step 2 written on the way out; the printed command resumes it, and the run ends
    bit-identical to one never interrupted."""
    objective, phase, sig, code, where = STOPS[name]
    args = [*CASES[objective][0], *FAST, "--steps", str(STEPS)]  # 8 samples a step: 2 micro-batches of 4
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "stopped"
    ref = driver(*args, "--output-dir", str(ref_dir))
    try:
        stopped = run_driver(*args, "--output-dir", str(run_dir), hooks={"signal_at": f"{phase}:3:{sig}"})
        assert stopped.returncode == code, stopped.stderr[-3000:]
        err = stopped.stderr.strip().splitlines()
        signame = f"SIG{sig}"
        assert any(line.startswith(f"denser: {signame} received") for line in err), err
        saved = ckpt.checkpoint_dir(run_dir, 2)
        assert re.match(rf"denser train: stopped by {signame} at step 3, {where} \([0-9.]+ s from the signal to here, "
                        rf"[0-9.]+ s to save\); step 2 of {STEPS} is saved in {re.escape(str(saved))}; continue with: "
                        "denser train --config ", err[-1]), err[-1]
        assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == ["step-000002"]
        ckpt.verify_checkpoint(saved)
        assert [r["step"] for r in metrics_rows(run_dir)] == [0, 1, 2]  # no row of the abandoned step
        command = err[-1].split("continue with: denser train ", 1)[1].split()
        resumed = run_driver(*command)  # exactly what the line says
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"resumed from {saved} (step 2" in resumed.stdout
        out, err_ref = ref.communicate(timeout=300)
        assert ref.returncode == 0, err_ref[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.communicate()
    assert_same_run(ref_dir, run_dir, STEPS)


@pytest.mark.slow
def test_ctrl_c_from_outside_exits_130_and_loses_no_finished_step(tmp_path):
    run = tmp_path / "run"
    args = ["--objective", "grpo", *FAST, "--steps", "6", "--output-dir", str(run)]
    proc = driver(*args, hooks={"slow_after_step": "2"})
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if line.strip() == "MARK step 4":
                break
            assert time.monotonic() < deadline
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        print(f"SIGINT to exit: {time.monotonic() - t0:.2f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    finished = max(r["step"] for r in metrics_rows(run) if "loss" in r)
    assert finished >= 3
    latest = ckpt.latest_checkpoint(run, verify=True)
    assert latest == ckpt.checkpoint_dir(run, finished)  # every finished step is in the checkpoint
    assert re.search(rf"stopped by SIGINT at .*; step {finished} of 6 is saved in {latest}", err.splitlines()[-1])


@pytest.mark.slow
def test_a_second_signal_stops_at_once(tmp_path):
    """The first SIGTERM starts the checkpoint of step 2; the test hook holds that write; a second
    SIGTERM ends the process there (the default action): no checkpoint, a temporary directory that
    the next save removes, and the previous state (here: none) untouched."""
    run = tmp_path / "run"
    args = ["--objective", "grpo", *FAST, "--steps", "4", "--output-dir", str(run)]
    proc = driver(*args, hooks={"signal_at": "generate:3:TERM", "pause_before_rename": "2"})
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:  # PAUSED: every file of step 2 is written, the rename is held for 600 s
            if line.startswith("PAUSED"):
                break
            assert time.monotonic() < deadline
        else:
            raise AssertionError(f"no PAUSED: {proc.communicate()[1][-3000:]}")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM, err[-3000:]  # a shell reports 143
    assert "a second signal stops at once" in err
    assert ckpt.complete_checkpoints(run) == []
    assert [p.name[:16] for p in ckpt.incomplete_checkpoints(run)] == [".tmp-step-000002"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [
    pytest.param([], id="ddp", marks=pytest.mark.skipif(
        not os.environ.get("DENSER_DDP_TESTS"), reason="two torchrun processes, ~1 min: DENSER_DDP_TESTS=1")),
    pytest.param(["--fsdp"], id="fsdp", marks=pytest.mark.skipif(
        not os.environ.get("DENSER_FSDP_TESTS"), reason="two FSDP torchrun processes, ~1 min: DENSER_FSDP_TESTS=1")),
])
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, mode):
    """SIGTERM reaches only process 1: process 0 learns it at the next check point (an all-reduce),
    both abandon the same step, the checkpoint holds both processes' RNG streams, and the resume
    under torchrun ends bit-identical to an uninterrupted two-process run. Under FSDP (sharded
    weights gathered into one checkpoint) the same holds; a stop during generation ends process 1's
    generate early while ``synced_gpus`` keeps it taking part in process 0's layer gathers."""
    import shutil
    import subprocess

    from test_resume import HERE, ROOT

    if shutil.which("torchrun") is None or shutil.which("pgrep") is None:
        pytest.skip("needs torchrun and pgrep")
    launch = ["torchrun", "--nproc_per_node", "2", str(HERE)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [*CASES["sdpo"][0], *FAST, "--steps", str(STEPS), *mode]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "stopped"
    ref = subprocess.Popen([*launch, "--", *args, "--output-dir", str(ref_dir)], env=env, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    victim = subprocess.Popen([*launch, "slow_after_step=2", "--", *args, "--output-dir", str(run_dir)], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in victim.stdout:
            if line.strip().endswith("MARK step 3"):
                break
        workers = subprocess.run(["pgrep", "-P", str(victim.pid)], capture_output=True, text=True).stdout.split()
        rank1 = [int(p) for p in workers if _environ(int(p)).get("RANK") == "1"]
        assert len(rank1) == 1, workers
        os.kill(rank1[0], signal.SIGTERM)
        out, err = victim.communicate(timeout=300)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert "denser train: stopped by SIGTERM at " in err, err[-3000:]  # printed by process 0, which got no signal
    finished = max(r["step"] for r in metrics_rows(run_dir) if "loss" in r)
    latest = ckpt.latest_checkpoint(run_dir, verify=True)
    assert latest == ckpt.checkpoint_dir(run_dir, finished) and finished in (2, 3)
    assert len(ckpt.load_train_state(latest)[0]["rng"]) == 2
    resumed = subprocess.run([*launch, "--", *args, "--output-dir", str(run_dir), "--resume"], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait(timeout=300) == 0
    assert_same_run(ref_dir, run_dir, STEPS)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


@pytest.mark.slow
def test_a_signal_after_a_rollout_batchs_first_update_finishes_that_batch_first(tmp_path):
    """With two updates per rollout batch (--mini-batches 2), SIGTERM as step 3's first optimiser
    step begins: that update is applied, so the batch is finished (its second update, its metrics
    row) and step 3 is saved; never a half-applied rollout batch. Resuming ends bit-identical."""
    args = [*CASES["grpo"][0], *FAST, "--steps", str(STEPS), "--mini-batches", "2"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "stopped"
    ref = driver(*args, "--output-dir", str(ref_dir))
    try:
        stopped = run_driver(*args, "--output-dir", str(run_dir), hooks={"signal_at": "optimizer:3:TERM"})
        assert stopped.returncode == 143, stopped.stderr[-3000:]
        err = stopped.stderr.strip().splitlines()
        saved = ckpt.checkpoint_dir(run_dir, 3)
        assert "stopped by SIGTERM at the start of step 4" in err[-1] and str(saved) in err[-1], err[-1]
        assert [r["step"] for r in metrics_rows(run_dir)] == [0, 1, 2, 3]
        assert metrics_rows(run_dir)[-1]["updates"] == 2
        resumed = run_driver(*err[-1].split("continue with: denser train ", 1)[1].split())
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        out, err_ref = ref.communicate(timeout=300)
        assert ref.returncode == 0, err_ref[-3000:]
    finally:
        if ref.poll() is None:
            ref.kill()
            ref.communicate()
    assert_same_run(ref_dir, run_dir, STEPS)
