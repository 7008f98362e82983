"""Exact resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run.

Every run here is a subprocess of this very file (``python tests/test_resume.py [hooks] -- train
flags``): the ``__main__`` block at the bottom registers a task the random tiny model scores on
(reward 1 for an even-length reply, so groups vary, advantages are non-zero and SDPO finds
teachers), installs optional test hooks, and calls ``denser.cli.main(["train", ...])``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
TASK = "parity_addition"

# Small and fast, but with a large learning rate so every step moves the weights a lot: a resume
# that restores anything wrongly (an RNG stream, an optimizer moment) changes the samples and so
# the final weights.
FAST = ["--model", "tiny", "--task", TASK, "--max-new-tokens", "6", "--num-generations", "4",
        "--prompts-per-step", "2", "--micro-batch-size", "4", "--eval-size", "2", "--no-progress",
        "--lr", "3e-3", "--lr-schedule", "cosine", "--warmup-steps", "1", "--weight-decay", "0.01",
        "--temperature", "1.3", "--cpu"]


def driver(*args: str, hooks: dict[str, str] | None = None, env: dict[str, str] | None = None, **kw):
    """Start ``denser train`` in a subprocess (hooks: see ``_install_hooks``); returns the Popen."""
    hook_args = [f"{k}={v}" for k, v in (hooks or {}).items()]
    cmd = [sys.executable, str(HERE), *hook_args, "--", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def run_driver(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    proc = driver(*args, **kw)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


TIMING_KEYS = ("time_generate_s", "time_signals_s", "time_update_s", "step_time_s", "tokens_per_s")


def metrics_rows(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (which differ between any two runs)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_run(ref: Path, run: Path, steps: int) -> None:
    """``run`` ended where the uninterrupted ``ref`` did: the same final checkpoint, bit for bit, and
    the same metrics rows (times aside)."""
    final = f"checkpoints/step-{steps:06d}"
    assert_same_state(ref / final, run / final)
    assert metrics_rows(run) == metrics_rows(ref)


def assert_same_state(a: Path, b: Path) -> None:
    """Two checkpoints hold bit-identical weights, EMA teacher, optimizer and scheduler state."""
    import torch
    from safetensors.torch import load_file

    for rel in ("model/model.safetensors", "model/adapter_model.safetensors", "state/teacher.safetensors"):
        if not (a / rel).exists():
            assert not (b / rel).exists(), rel
            continue
        ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
        assert ta.keys() == tb.keys()
        differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not differ, f"{rel}: {len(differ)} of {len(ta)} tensors differ, e.g. {differ[:3]}"
    from denser.trainers import sharded_checkpoint
    from denser.trainers.checkpoint import load_train_state

    sa, sb = load_train_state(a)[0], load_train_state(b)[0]
    assert sharded_checkpoint.has_shards(a) == sharded_checkpoint.has_shards(b)
    if sharded_checkpoint.has_shards(a):  # FSDP: weights, optimizer and EMA teacher in each process's shards
        wa, wb = sharded_checkpoint.read_whole(a), sharded_checkpoint.read_whole(b)
        assert wa.keys() == wb.keys()
        for part in ("model", "teacher"):
            differ = [k for k in wa.get(part, {}) if not torch.equal(wa[part][k], wb[part][k])]
            assert not differ, f"shards, {part}: {len(differ)} tensors differ, e.g. {differ[:3]}"
        sa, sb = {**sa, "optimizer": wa["optimizer"]}, {**sb, "optimizer": wb["optimizer"]}
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), f"optimizer state {i}.{k}"
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert sa["scheduler"] == sb["scheduler"]
    ta, tb = (json.loads((x / "state" / "trainer_state.json").read_text()) for x in (a, b))
    assert ta == tb


STEPS, CHECKPOINT = 4, 2
CASES = {
    # killed between writing step c+1's metrics row and its checkpoint: the resume must drop that row
    "grpo": (["--objective", "grpo"], "row"),
    # killed in the middle of step c+1 (generation, backward); EMA teacher moving fast, the SDPO-CL
    # random token mask and the IS weight on behaviour log-probs
    "sdpo": (["--objective", "sdpo", "--teacher", "ema", "--teacher-update-rate", "0.3", "--mask-ratio", "0.25",
              "--use-old-logp", "--distill-mode", "full"], "step"),
    # several updates per rollout batch (shuffled mini-batches, old_logp from a pre-update forward) and
    # DAPO's dynamic sampling (refill rounds) and overlong shaping
    "dapo_updates": (["--objective", "dapo", "--mini-batches", "2", "--epochs", "2"], "step"),
    # LoRA: the adapter (peft format) and the EMA of its A and B are what a checkpoint holds; the
    # adapter's dropout draws from the RNG streams
    "lora_sdpo": (["--objective", "sdpo", "--teacher", "ema", "--teacher-update-rate", "0.3", "--lora-r", "4",
                   "--lora-dropout", "0.1", "--use-old-logp", "--distill-mode", "full"], "step"),
}


def _kill_at_mark(proc: subprocess.Popen, mark: str, delay: float, timeout: float = 90) -> None:
    """Read the driver's stdout up to ``mark``, wait ``delay`` seconds, SIGKILL it."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        if line.strip() == mark:
            break
        assert time.monotonic() < deadline, f"no {mark!r} within {timeout} s"
    else:
        raise AssertionError(f"the run ended (rc {proc.wait()}) before {mark!r}:\n{proc.stderr.read()[-3000:]}")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_sigkill_then_resume_is_bit_exact(tmp_path, name):
    """K steps uninterrupted == K steps SIGKILLed at a random point after checkpoint c, then --resume.

    ``DENSER_TEST_BREAK=numpy_rng pytest tests/test_resume.py`` (or any ``break=`` of the driver)
    resumes with that part deliberately broken: the test must then fail."""
    flags, window = CASES[name]
    args = [*flags, *FAST, "--steps", str(STEPS), "--save-every", "1", "--eval-every", "2"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    ref = driver(*args, "--output-dir", str(ref_dir))  # the two runs share the two cores
    victim = driver(*args, "--output-dir", str(run_dir), hooks={"slow_after_step": str(CHECKPOINT)})
    try:
        delay = random.uniform(0.0, 0.25)
        _kill_at_mark(victim, f"MARK {window} {CHECKPOINT + 1}", delay)
        assert victim.returncode == -signal.SIGKILL, f"the run was not killed (rc {victim.returncode})"
        killed_at = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        assert f"step-{CHECKPOINT:06d}" in killed_at, killed_at
        if window == "row":  # the row of step c+1 is on disk, its checkpoint is not
            assert f"step-{CHECKPOINT + 1:06d}" not in killed_at and len(metrics_rows(run_dir)) == CHECKPOINT + 2
        breaks = {"break": os.environ["DENSER_TEST_BREAK"]} if os.environ.get("DENSER_TEST_BREAK") else None
        resumed = run_driver(*args, "--output-dir", str(run_dir), "--resume", hooks=breaks)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        newest = [n for n in killed_at if n.startswith("step-")][-1]
        assert f"resumed from {run_dir / 'checkpoints' / newest}" in resumed.stdout, (killed_at, resumed.stdout)
        out, err = ref.communicate(timeout=120)
        assert ref.returncode == 0, err[-3000:]
    finally:
        for p in (ref, victim):
            if p.poll() is None:
                p.kill()
                p.communicate()
    final = f"checkpoints/step-{STEPS:06d}"
    assert_same_state(ref_dir / final, run_dir / final)
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [0, *range(1, STEPS + 1), STEPS]  # no duplicated or missing rows
    assert rows == metrics_rows(ref_dir)
    # the weights did move (a run that never changes its weights would pass trivially)
    from safetensors.torch import load_file

    weights = "adapter_model.safetensors" if "--lora-r" in flags else "model.safetensors"
    first = load_file(str(ref_dir / "checkpoints" / f"step-{STEPS - 1:06d}" / "model" / weights))
    last = load_file(str(ref_dir / final / "model" / weights))
    assert any(not torch_equal(first[k], last[k]) for k in first)
    if name == "sdpo":
        assert any(r.get("teacher_frac", 0) > 0 for r in rows[1:-1]), "no sample had a teacher"
    if name == "dapo_updates":
        assert all(r["updates"] == 4 and r["generation_rounds"] >= 1 for r in rows[1:-1])


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun's workers are not in its process group)."""
    kids = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    os.kill(pid, signal.SIGKILL)
    for kid in kids:
        _kill_tree(int(kid))


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DENSER_DDP_TESTS"), reason="two torchrun processes, ~40 s: DENSER_DDP_TESTS=1")
def test_two_process_sigkill_then_resume_is_bit_exact(tmp_path):
    """Each process has its own RNG streams (seed + rank); each must get its own back. (With
    ``break=rank0_rng`` on the resume, as the loop did before per-process states, this fails.)"""
    import shutil

    if shutil.which("torchrun") is None or shutil.which("pgrep") is None:
        pytest.skip("needs torchrun and pgrep")
    launch = ["torchrun", "--nproc_per_node", "2", str(HERE)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [*CASES["sdpo"][0], *FAST, "--steps", str(STEPS), "--save-every", "1"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    quiet = dict(env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref = subprocess.Popen([*launch, "--", *args, "--output-dir", str(ref_dir)], **quiet)
    victim = subprocess.Popen([*launch, "slow_after_step=2", "--", *args, "--output-dir", str(run_dir)], **quiet)
    marker = run_dir / "checkpoints" / f"step-{CHECKPOINT:06d}" / "COMPLETE"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint c"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.6))
    _kill_tree(victim.pid)
    victim.wait()
    assert ckpt_names(run_dir)[-1] != f"step-{STEPS:06d}", "the run finished before the kill"
    breaks = [f"break={os.environ['DENSER_TEST_BREAK']}"] if os.environ.get("DENSER_TEST_BREAK") else []
    resumed = subprocess.run([*launch, *breaks, "--", *args, "--output-dir", str(run_dir), "--resume"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ref.wait(timeout=300) == 0
    assert_same_run(ref_dir, run_dir, STEPS)
    from denser.trainers.checkpoint import load_train_state

    assert len(load_train_state(run_dir / "checkpoints" / f"step-{STEPS:06d}")[0]["rng"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DENSER_DDP_TESTS"), reason="two torchrun processes, ~40 s: DENSER_DDP_TESTS=1")
def test_two_processes_draw_the_samples_of_one_with_the_same_global_batch(tmp_path):
    """docs/design.md, Contract 4: requests are seeded by (seed, step, round, global index), never by the
    process, so 2 processes x 2 prompts sample the first step's completions of 1 process x 4 prompts
    (the same prompts, the same weights). With DENSER_TEST_BREAK=local_index (seeds from the index on
    the process, as a rank-based seed would do) the test fails."""
    import shutil

    if shutil.which("torchrun") is None:
        pytest.skip("needs torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    fast = list(FAST)
    fast[fast.index("--prompts-per-step") + 1] = "{P}"
    args = ["--objective", "grpo", *fast, "--steps", "1", "--max-new-tokens", "24", "--temperature", "1.0"]
    breaks = [f"break={os.environ['DENSER_TEST_BREAK']}"] if os.environ.get("DENSER_TEST_BREAK") else []
    samples = {}
    for n, per in ((1, 4), (2, 2)):
        dump = tmp_path / f"samples-{n}"
        dump.mkdir()
        cmd = ["torchrun", "--nproc_per_node", str(n), str(HERE), f"dump_samples={dump}", *breaks, "--",
               *[x.format(P=per) for x in args], "--output-dir", str(tmp_path / f"run-{n}")]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        calls = [json.loads(line) for f in sorted(dump.iterdir()) for line in f.read_text().splitlines()]
        samples[n] = {tuple(p): c for call in calls
                      for p, c in zip(call["prompts"], zip(*[iter(call["completions"])] * 4), strict=True)}
    assert len(samples[1]) == 4 and samples[2] == samples[1]
    assert len({tuple(c) for cs in samples[1].values() for c in cs}) > 4  # really sampled


def ckpt_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


# ----------------------------------------------------------------------------------- the driver


def _install_hooks(hooks: dict[str, str]) -> None:
    """Test-only behaviour, installed in the subprocess by monkeypatching (the library has no hooks).

    slow_after_step=N     for steps after N: sleep 0.3 s, print "MARK step S", run the step; after writing
                          its metrics row print "MARK row S" and sleep 0.5 s (before its checkpoint)
    pause_before_rename=N inside save_checkpoint of step N, after every file is written and before the
                          rename, print PAUSED and sleep (the test SIGKILLs the process there)
    disk_full_at=N        save_checkpoint of step N fails with ENOSPC while writing the model
    nan_at_steps=A,B,..   the objective's loss is NaN at these (0-based) steps
    dump_samples=DIR      every sampled generate call appends its prompts and completions to DIR/rank-R.jsonl
    phases=1              print "PHASE <phase> <step>" (flushed) as each phase begins: eval, generate, backward,
                          optimizer (of the 1-based step in progress), save and saved (of the step saved)
    signal_at=P:S:SIG     send SIG (TERM, INT) to this very process as phase P of step S begins
    break=WHAT            a deliberately broken resume, to check that the tests catch it: python_rng,
                          numpy_rng, torch_rng (that stream not restored), rank0_rng (every process
                          gets process 0's streams: only visible with 2+ processes), seed_order (set_seed after
                          the restore), teacher, optimizer, scheduler (state not loaded), metrics (not
                          truncated), data (prompts counted from the resume step), local_index (requests
                          seeded by the prompt's index on its process, not in the whole step)
    """
    import errno

    from denser.trainers import checkpoint as ckpt
    from denser.trainers import loop, run_dir

    if "slow_after_step" in hooks:
        after = int(hooks["slow_after_step"])
        real_step, real_write = loop.Trainer.step, run_dir.RunDir.append_metrics

        def slow_step(self, step):
            if step >= after:
                time.sleep(0.3)
                print("MARK step", step + 1, flush=True)
            return real_step(self, step)

        def slow_write(self, row):
            real_write(self, row)
            if row["step"] > after and "loss" in row:
                print("MARK row", row["step"], flush=True)
                time.sleep(0.5)

        loop.Trainer.step, run_dir.RunDir.append_metrics = slow_step, slow_write
    if "pause_before_rename" in hooks:
        at = int(hooks["pause_before_rename"])
        real_fsync = ckpt._fsync_tree

        def pausing_fsync(root):
            real_fsync(root)
            if f"step-{at:06d}" in Path(root).name:
                print("PAUSED", root, flush=True)
                time.sleep(600)

        ckpt._fsync_tree = pausing_fsync
    if "disk_full_at" in hooks:
        at = int(hooks["disk_full_at"])
        real_save = ckpt.save_checkpoint

        def failing_save(run_dir, step, *, model, **kw):
            if step == at:
                real_save_pretrained = model.save_pretrained

                def full(*a, **k):
                    raise OSError(errno.ENOSPC, "No space left on device")

                model.save_pretrained = full
                try:
                    return real_save(run_dir, step, model=model, **kw)
                finally:
                    model.save_pretrained = real_save_pretrained
            return real_save(run_dir, step, model=model, **kw)

        ckpt.save_checkpoint = failing_save
    if "dump_samples" in hooks:
        from denser.engines import HFRolloutEngine

        real_generate = HFRolloutEngine.generate

        def dumping_generate(self, prompt_ids, params, **kw):
            rollout = real_generate(self, prompt_ids, params, **kw)
            if params.do_sample:
                rank = os.environ.get("RANK", "0")
                with open(Path(hooks["dump_samples"]) / f"rank-{rank}.jsonl", "a") as f:
                    f.write(json.dumps({"prompts": rollout.prompt_ids, "completions": rollout.completion_ids}) + "\n")
            return rollout

        HFRolloutEngine.generate = dumping_generate
    if "phases" in hooks or "signal_at" in hooks:
        _phase_hooks(hooks)
    if "break" in hooks:
        _break_resume(hooks["break"])
    if "nan_at_steps" in hooks:
        bad = {int(s) for s in hooks["nan_at_steps"].split(",") if s}
        from denser.objectives.grpo import GRPO

        real_loss = GRPO.loss

        def nan_loss(self, stats, batch):
            out = real_loss(self, stats, batch)
            if batch.step in bad:
                out = type(out)(out.loss * float("nan"), out.metrics)
            return out

        GRPO.loss = nan_loss


def _phase_hooks(hooks: dict[str, str]) -> None:
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    from denser.engines import HFRolloutEngine
    from denser.trainers import checkpoint as ckpt
    from denser.trainers import loop

    show = hooks.get("phases") == "1"
    target = None
    if "signal_at" in hooks:
        phase, step, sig = hooks["signal_at"].split(":")
        target = (phase, int(step), getattr(signal, f"SIG{sig}"))
    current = {"step": None}  # the 1-based step in progress, None outside Trainer.step

    def enter(phase: str, step) -> None:
        if show:
            print("PHASE", phase, step, flush=True)
        nonlocal target
        if target is not None and (phase, step) == target[:2]:
            sig, target = target[2], None  # once: a phase that begins again (several updates) is no second signal
            os.kill(os.getpid(), sig)

    def wrap(owner, name: str, phase_of) -> None:
        real = getattr(owner, name)

        def wrapped(*a, **k):
            enter(*phase_of(a))
            return real(*a, **k)

        setattr(owner, name, wrapped)

    real_step = loop.Trainer.step

    def step(self, s):
        current["step"] = s + 1
        try:
            return real_step(self, s)
        finally:
            current["step"] = None

    loop.Trainer.step = step
    wrap(HFRolloutEngine, "generate", lambda a: ("generate" if current["step"] else "eval", current["step"]))
    wrap(Accelerator, "backward", lambda a: ("backward", current["step"]))
    wrap(AcceleratedOptimizer, "step", lambda a: ("optimizer", current["step"]))
    real_save = ckpt.save_checkpoint

    def save(*a, **k):  # "save S" ... "saved S": a kill between the two lands inside the write
        enter("save", a[1])
        path = real_save(*a, **k)
        enter("saved", a[1])
        return path

    ckpt.save_checkpoint = save


def _break_resume(what: str) -> None:
    import numpy as np
    import torch

    from denser.trainers import checkpoint as ckpt
    from denser.trainers import prompts, run_dir

    real_set = ckpt.set_rng_state
    streams = {"python_rng": (random.getstate, random.setstate),
               "numpy_rng": (np.random.get_state, np.random.set_state),
               "torch_rng": (torch.get_rng_state, torch.set_rng_state)}
    if what in streams:
        get, put = streams[what]

        def set_rng_state(state, rank=0):
            before = get()
            real_set(state, rank)
            put(before)

        ckpt.set_rng_state = set_rng_state
    elif what == "seed_order":
        from accelerate.utils import set_seed

        def set_rng_state(state, rank=0):
            real_set(state, rank)
            set_seed(0)

        ckpt.set_rng_state = set_rng_state
    elif what == "rank0_rng":  # every process restores process 0's streams (as before per-process states)
        ckpt.set_rng_state = lambda state, rank=0: real_set(state, 0)
    elif what == "teacher":
        from denser.trainers.teacher import LoraTeacherWeights, TeacherWeights

        TeacherWeights.load_state_dict = LoraTeacherWeights.load_state_dict = lambda self, state: None
    elif what == "optimizer":
        from accelerate.optimizer import AcceleratedOptimizer

        AcceleratedOptimizer.load_state_dict = lambda self, state: None
    elif what == "scheduler":
        torch.optim.lr_scheduler.LambdaLR.load_state_dict = lambda self, state: None
    elif what == "metrics":
        run_dir.RunDir.truncate_metrics = lambda self, rows: None
    elif what == "local_index":  # a prompt's request seeded by its index among this process's prompts
        prompts.PromptSchedule.request_indices = lambda self: list(range(self.per_step))
    elif what == "data":  # prompts counted from the first step this process runs (the resume step)
        real_rows, first = prompts.PromptSchedule.rows_for_step, {}
        prompts.PromptSchedule.rows_for_step = lambda self, step: real_rows(self, step - first.setdefault(id(self), step))
    else:
        raise ValueError(f"unknown break={what}")


def _register_task() -> None:
    from denser.tasks import Score, list_tasks, register_task
    from denser.tasks.builtin import Addition

    if TASK in list_tasks():
        return

    @register_task(TASK, "addition prompts; reward 1 for an even-length reply, flipped by noise")
    class ParityAddition(Addition):
        """The random tiny model scores on it (groups vary, SDPO finds teachers), and its reward noise
        draws from python's and numpy's global RNGs, so a resume that fails to restore either
        stream changes the rewards and the weights (torch's stream drives the sampling)."""

        def check(self, completion, row):
            import numpy as np

            ok = len(completion) % 2 == 0
            ok ^= random.random() < 0.2
            ok ^= bool(np.random.random() < 0.2)
            return Score(float(ok), None if ok else "The reply should have an even number of characters.", None)


def _main(argv: list[str]) -> int:
    n = 0  # leading HOOK=VALUE words, then an optional "--" (accelerate launch drops it), then train flags
    while n < len(argv) and "=" in argv[n] and not argv[n].startswith("-"):
        n += 1
    hooks = dict(a.split("=", 1) for a in argv[:n])
    rest = argv[n + 1:] if argv[n:n + 1] == ["--"] else argv[n:]
    _register_task()
    _install_hooks(hooks)
    from denser.cli import main

    return main(["train", *rest])


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    from denser.cli import exit_process  # as the entry point ends: the group destroyed, no teardown

    exit_process(code)
