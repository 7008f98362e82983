"""FSDP and DDP on two CPU processes equal one process doing the same global batch.

Sampling is seeded per process, so the runs compared here get their completions from a test-only
rollout engine, ``fixed``: each completion is a function of its prompt and its index in the group
only (not of the process, the weights or any RNG), with the policy's own log-probs as behaviour
log-probs. Two processes with ``--prompts-per-step P`` then train on exactly the samples one
process with ``2P`` trains on (the prompt schedule gives process ``r`` of ``W`` the draws
``[(tW + r)P, (tW + r + 1)P)``), and the loss normalisers are global sums: the loss, the gradient
norm and the weights after each update must agree up to the order of float sums.

Every multi-process run is this file run by ``torch.distributed.run``: the ``__main__`` block
registers the engine and a deterministic task, then runs ``denser train`` once per group of flags
(groups separated by ``:::``), so one launch (~10 s of start-up on two cores) covers several runs.

Tolerance. Two processes sum the same float32 terms in another order (each process sums its own
micro-batches, then the gradients are reduce-scattered; the loss and normalisers are all-reduced),
so values differ by a few float32 roundings: relative 1e-6 of a value's scale (float32 epsilon is
1.2e-7; a sum of n terms in another order moves by up to ~n*eps of its largest term). The checks use
``rtol = 2e-5`` on loss and gradient norm, and on weights ``atol = 5e-5`` (the learning rate here is
1e-3: AdamW's first steps move every weight by about lr, so 5e-5 is 5% of a step). Most weights agree
to ~4e-6; AdamW divides each gradient by its own magnitude, so an element whose gradient is near
AdamW's eps (1e-8) and is a sum that nearly cancels sees its rounding amplified into its step: the
worst seen were 1.9e-5 under FSDP and 1.6e-5 under DDP (an embedding row, grpo with a KL reference,
the second update; 0.96e-5 for the same run started in a fresh process, so the summation order also
depends on what ran before in the process) and 1.6e-5 for hybrid_adv. A wrong formula (a missed micro-batch, a teacher not updated) moves whole tensors by
a full step, and a gradient off by the process count changes the gradient norm.

``DENSER_FSDP_TESTS=1`` adds the long forms: every built-in objective under FSDP, live and frozen
teachers and a reference model, DDP equality, and SIGKILL + ``--resume`` of two FSDP processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
TASK = "parity_fixed"
ENGINE = "fixed"
LONG = bool(os.environ.get("DENSER_FSDP_TESTS"))
CONFIG = ROOT / "configs" / "accelerate_fsdp.yaml"

BASE = ["--model", "tiny", "--task", TASK, "--engine", ENGINE, "--steps", "2", "--max-new-tokens", "6",
        "--num-generations", "4", "--eval-size", "2", "--micro-batch-size", "3", "--no-progress", "--lr", "1e-3",
        "--save-every", "1", "--keep-last", "3", "--cpu"]
PROMPTS = 2  # per process with two processes; one process takes 2 * PROMPTS
RTOL, ATOL_WEIGHTS = 2e-5, 5e-5

OBJECTIVES = {
    "grpo": ["--objective", "grpo"],
    "sdpo-ema": ["--objective", "sdpo", "--teacher", "ema", "--teacher-update-rate", "0.3"],
}
LONG_OBJECTIVES = {
    "grpo-kl": ["--objective", "grpo", "--kl-coef", "0.1"],  # a frozen reference model
    "dr_grpo": ["--objective", "dr_grpo"],
    "dapo": ["--objective", "dapo"],
    "gspo": ["--objective", "gspo"],
    "sdpo-live": ["--objective", "sdpo", "--teacher", "live"],
    "sdpo-frozen": ["--objective", "sdpo", "--teacher", "frozen", "--distill-mode", "full"],
    "hybrid": ["--objective", "hybrid", "--teacher", "ema"],
    "hybrid_adv": ["--objective", "hybrid_adv"],
    "sdpo-trust-region": ["--objective", "sdpo", "--teacher", "trust-region"],
    "grpo-ppo-epochs": ["--objective", "grpo", "--epochs", "2"],  # pre-update log-probs: a policy no-grad forward
    "grpo-checkpointing": ["--objective", "grpo", "--gradient-checkpointing"],
}


# ------------------------------------------------------------------------ test-only parts


def register_test_parts() -> None:
    """The ``fixed`` rollout engine and the deterministic ``parity_fixed`` task (idempotent)."""
    import torch

    from denser.engines.base import Rollout, RolloutEngine, list_rollout_engines, register_rollout_engine
    from denser.engines.packing import build_packed_batch, completion_logprobs
    from denser.tasks import Score, list_tasks, register_task
    from denser.tasks.builtin import Addition

    if TASK not in list_tasks():
        @register_task(TASK, "addition prompts; reward 1 for an even-length reply (deterministic)")
        class ParityFixed(Addition):
            def check(self, completion, row):
                ok = len(completion) % 2 == 0
                return Score(float(ok), None if ok else "The reply should have an even number of characters.", None)

    if ENGINE not in list_rollout_engines():
        @register_rollout_engine(ENGINE)
        class FixedEngine(RolloutEngine):
            """Completion ``g`` of a prompt is drawn from a generator seeded by (prompt ids, g):
            the same on any process, at any step, for any weights. Behaviour log-probs are the
            policy's (a forward pass: under FSDP the loop runs this inside the gathering forward)."""

            def __init__(self, model, tokenizer):
                self.model, self.tokenizer = model, tokenizer
                self.eos = int(tokenizer.eos_token_id)

            def generate(self, prompt_ids, params, *, seeds=None, seed=None, stop=None):
                prompts = [list(map(int, p)) for p in prompt_ids]
                vocab = self.model.get_output_embeddings().weight.shape[0]
                completions, truncated = [], []
                for p in prompts:
                    for g in range(params.num_generations):
                        gen = torch.Generator().manual_seed(zlib.crc32(repr((p, g)).encode()))
                        n = 1 + int(torch.randint(params.max_new_tokens, (1,), generator=gen))
                        tokens = torch.randint(40, min(vocab, 120), (n,), generator=gen).tolist()
                        if n < params.max_new_tokens:
                            tokens[-1] = self.eos
                        completions.append(tokens)
                        truncated.append(tokens[-1] != self.eos)
                contexts = [p for p in prompts for _ in range(params.num_generations)]
                batch = build_packed_batch(contexts, completions, pad_token_id=int(self.tokenizer.pad_token_id))
                was = self.model.training
                self.model.eval()
                with torch.no_grad():
                    logp = completion_logprobs(self.model, batch, temperature=params.temperature).float().cpu()
                self.model.train(was)
                logps = list(logp.split([len(c) for c in completions]))
                return Rollout(prompt_ids=prompts, completion_ids=completions,
                               texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
                               logps=logps, truncated=torch.tensor(truncated), num_generations=params.num_generations,
                               params=params, pad_token_id=int(self.tokenizer.pad_token_id))


@contextlib.contextmanager
def registered_test_parts():
    """:func:`register_test_parts`, undone on exit in this process: other test files list the
    engines and tasks (an error message names them all)."""
    from denser.engines import base as rollout
    from denser.tasks import list_tasks, unregister_task

    had_task, had_engine = TASK in list_tasks(), ENGINE in rollout.list_rollout_engines()
    register_test_parts()
    try:
        yield
    finally:
        if not had_task:
            unregister_task(TASK)
        if not had_engine:
            rollout._ENGINES.pop(ENGINE, None)


def _main(argv: list[str]) -> int:
    """Run ``denser train`` once per ``:::``-separated group of flags, in this process group."""
    register_test_parts()
    from denser.cli import main

    groups, current = [], []
    for a in argv:
        if a == ":::":
            groups.append(current)
            current = []
        else:
            current.append(a)
    groups.append(current)
    for flags in groups:
        rc = main(["train", *flags])
        if rc:
            return rc
    return 0


# ------------------------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(runs: list[list[str]], nproc: int = 2, timeout: float = 600, *, accelerate: bool = False,
           ) -> subprocess.CompletedProcess:
    """Run this file's driver on ``nproc`` processes: ``torchrun --standalone`` or, with ``accelerate``,
    ``accelerate launch --config_file configs/accelerate_fsdp.yaml`` (the README's two commands)."""
    if accelerate:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
               "--num_processes", str(nproc), "--main_process_port", str(_free_port()), str(HERE)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(HERE)]
    for i, flags in enumerate(runs):
        cmd += ([":::"] if i else []) + flags
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def single(flags: list[str]) -> None:
    """One process, in this process (world 1, no sharding)."""
    from denser.cli import main

    with registered_test_parts():
        assert main(["train", *flags]) == 0


def steps_of(run: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _checkpoint(run: Path, step: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from denser.trainers import checkpoint as ckpt

    path = ckpt.checkpoint_dir(run, step)
    state, _, teacher = ckpt.load_train_state(path)
    opt = {f"{i}.{k}": torch.as_tensor(v) for i, s in state["optimizer"]["state"].items() for k, v in s.items()}
    return {"model": load_file(str(path / "model" / "model.safetensors")), "teacher": teacher or {}, "opt": opt}


def assert_equal_runs(one: Path, many: Path, *, what: str) -> None:
    """Loss, gradient norm and weights (and EMA teacher) after each update: ``many`` == ``one``."""
    import torch

    a, b = steps_of(one), steps_of(many)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    assert [r["processes"] for r in b] == [2, 2] and [r["processes"] for r in a] == [1, 1]
    for ra, rb in zip(a, b):
        assert ra["skipped"] == rb["skipped"] == 0
        for k in ("loss", "grad_norm", "reward_mean", "response_length"):
            assert rb[k] == pytest.approx(ra[k], rel=RTOL, abs=1e-7), (what, ra["step"], k, ra[k], rb[k])
    moved = False
    for step in (1, 2):
        ca, cb = _checkpoint(one, step), _checkpoint(many, step)
        for part in ("model", "teacher", "opt"):
            assert ca[part].keys() == cb[part].keys(), (what, step, part)
            for k in ca[part]:
                ta, tb = ca[part][k].float(), cb[part][k].float()
                atol = ATOL_WEIGHTS if part != "opt" else 1e-6 + 1e-4 * float(ta.abs().max())
                err = float((ta - tb).abs().max()) if ta.numel() else 0.0
                assert err <= atol, f"{what}: step {step} {part} {k} differs by {err:.3g} (tolerance {atol:.3g})"
        if step == 2:
            c1 = _checkpoint(one, 1)["model"]
            moved = any(not torch.equal(c1[k], ca["model"][k]) for k in c1)
    assert moved, f"{what}: the weights did not move"


def _flags(objective: list[str], out: Path, prompts: int, *extra: str) -> list[str]:
    return [*objective, *BASE, "--prompts-per-step", str(prompts), "--output-dir", str(out), *extra]


# --------------------------------------------------------------------------------- tests


@pytest.fixture
def test_parts():
    """The test-only engine and task for one test, removed after it."""
    with registered_test_parts():
        yield


def test_fixed_engine_is_a_function_of_prompt_and_index(test_parts):
    """The premise of every comparison here: the engine ignores process, weights and RNG."""
    import torch

    from denser.engines.base import SamplingParams, get_rollout_engine
    from denser.trainers.models import load_model

    m0, tok = load_model("tiny", seed=0)
    m1, _ = load_model("tiny", seed=1)
    params = SamplingParams(max_new_tokens=6, num_generations=3)
    a = get_rollout_engine(ENGINE, m0, tok).generate([[5, 6], [7, 8, 9]], params)
    torch.manual_seed(123)
    b = get_rollout_engine(ENGINE, m1, tok).generate([[7, 8, 9]], params)
    assert a.completion_ids[3:] == b.completion_ids
    assert len({len(c) for c in a.completion_ids}) > 1  # lengths vary: parity rewards vary within groups


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_process(tmp_path):
    """grpo and sdpo with an EMA teacher, launched as the README says (``accelerate launch`` with
    configs/accelerate_fsdp.yaml, no denser flag): 2 FSDP processes == 1 process, after one and two updates."""
    runs = {name: tmp_path / name for name in OBJECTIVES}
    proc = launch([_flags(flags, runs[name] / "fsdp", PROMPTS) for name, flags in OBJECTIVES.items()], accelerate=True)
    assert proc.stdout.count("FSDP2: the policy") == len(OBJECTIVES), proc.stdout  # sharded, not DDP
    assert "FSDP2: the policy, the ema teacher sharded over 2 process(es)" in proc.stdout
    for name, flags in OBJECTIVES.items():
        single(_flags(flags, runs[name] / "one", 2 * PROMPTS))
        assert_equal_runs(runs[name] / "one", runs[name] / "fsdp", what=f"{name} fsdp")
    rows = steps_of(runs["sdpo-ema"] / "fsdp")
    assert any(r.get("teacher_frac", 0) > 0 for r in rows), "no sample had a teacher"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(runs["grpo"] / "fsdp" / "checkpoints" / "step-000002" / "model")


def test_sharding_settings_denser_does_not_run_fail_with_the_fix():
    from types import SimpleNamespace

    import torch

    from denser.trainers.sharding import Sharding

    base = dict(fsdp_version=2, activation_checkpointing=False, cpu_ram_efficient_loading=False)
    for change, words in ((dict(fsdp_version=1), "fsdp_version: 2"),
                          (dict(activation_checkpointing=True), "fsdp_activation_checkpointing"),
                          (dict(cpu_ram_efficient_loading=True), "fsdp_cpu_ram_efficient_loading")):
        with pytest.raises(ValueError, match=words):
            Sharding(SimpleNamespace(**{**base, **change}), torch.device("cpu"))


def test_continual_chaining_and_fp16_are_refused_under_fsdp(tmp_path):
    """Before any model is loaded or any process group started."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from denser.trainers.config import TrainConfig
    from denser.trainers.loop import Trainer

    was = dist.is_initialized()
    cfg = TrainConfig(model="tiny", fsdp=True, output_dir=str(tmp_path / "r"), progress=False)
    with pytest.raises(ValueError, match="continual runner"):
        Trainer(cfg, anchor=torch.nn.Linear(1, 1), log=lambda *a: None)
    with pytest.raises(ValueError, match="--mixed-precision fp16 needs a gradient scaler.*bf16"):
        Trainer(dataclasses.replace(cfg, mixed_precision="fp16"), log=lambda *a: None)
    assert not (tmp_path / "r").exists() and dist.is_initialized() == was


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="two processes, every objective, FSDP and DDP: DENSER_FSDP_TESTS=1")
def test_every_objective_fsdp_and_ddp_equal_one_process(tmp_path):
    cases = {**OBJECTIVES, **LONG_OBJECTIVES}
    runs = []
    for name, flags in cases.items():
        runs.append(_flags(flags, tmp_path / name / "fsdp", PROMPTS, "--fsdp"))
        runs.append(_flags(flags, tmp_path / name / "ddp", PROMPTS))
    launch(runs, timeout=1800)
    for name, flags in cases.items():
        single(_flags(flags, tmp_path / name / "one", 2 * PROMPTS))
        for mode in ("fsdp", "ddp"):
            assert_equal_runs(tmp_path / name / "one", tmp_path / name / mode, what=f"{name} {mode}")


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="two processes, three launches: DENSER_FSDP_TESTS=1")
def test_an_fsdp_checkpoint_resumes_without_fsdp(tmp_path):
    """The checkpoint of a sharded run is one process's: DDP processes resume it (and end where the
    sharded run ends, up to summation order)."""
    import torch

    flags = OBJECTIVES["sdpo-ema"]
    half, whole = tmp_path / "half", tmp_path / "whole"
    launch([_flags(flags, half, PROMPTS, "--fsdp", "--steps", "1"), _flags(flags, whole, PROMPTS, "--fsdp")])
    proc = launch([_flags(flags, half, PROMPTS, "--resume")])
    assert "resumed from" in proc.stdout and "FSDP2:" not in proc.stdout
    a, b = _checkpoint(whole, 2), _checkpoint(half, 2)
    for part in ("model", "teacher"):
        for k in a[part]:
            err = float((a[part][k] - b[part][k]).abs().max())
            assert err <= ATOL_WEIGHTS, f"{part} {k} differs by {err:.3g}"
    assert not torch.equal(_checkpoint(half, 1)["model"]["lm_head.weight"], b["model"]["lm_head.weight"])


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="two FSDP processes killed and resumed, ~2 min: DENSER_FSDP_TESTS=1")
def test_two_fsdp_processes_sigkill_then_resume_is_bit_exact(tmp_path):
    """SIGKILL of both FSDP processes after checkpoint c, then --resume: the final checkpoint
    (weights, EMA teacher, optimizer, scheduler, counters) and the metrics are bit-identical to an
    uninterrupted two-process FSDP run (gloo reduces in a fixed order on CPU; the gathered
    checkpoint is resharded exactly). ``DENSER_TEST_BREAK=teacher`` (any ``break=`` of
    tests/test_resume.py's driver) resumes with that part broken: the test must then fail."""
    import random
    import time

    import test_resume as tr  # its driver: a task whose rewards draw from every RNG stream, and hooks

    launch_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tr.HERE)]
    args = [*tr.CASES["sdpo"][0], *tr.FAST, "--steps", str(tr.STEPS), "--save-every", "1", "--fsdp"]
    ref_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    quiet = dict(env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref = subprocess.Popen([*launch_cmd, "--", *args, "--output-dir", str(ref_dir)], **quiet)
    victim = subprocess.Popen([*launch_cmd, "slow_after_step=2", "--", *args, "--output-dir", str(run_dir)], **quiet)
    try:
        marker = run_dir / "checkpoints" / f"step-{tr.CHECKPOINT:06d}" / "COMPLETE"
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert victim.poll() is None and time.monotonic() < deadline, "no checkpoint c"
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 0.6))
        tr._kill_tree(victim.pid)
        victim.wait()
        assert tr.ckpt_names(run_dir)[-1] != f"step-{tr.STEPS:06d}", "the run finished before the kill"
        breaks = [f"break={os.environ['DENSER_TEST_BREAK']}"] if os.environ.get("DENSER_TEST_BREAK") else []
        resumed = subprocess.run([*launch_cmd, *breaks, "--", *args, "--output-dir", str(run_dir), "--resume"], env=_env(),
                                 cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed from" in resumed.stdout and "FSDP2:" in resumed.stdout
        assert ref.wait(timeout=600) == 0
    finally:
        for p in (ref, victim):
            if p.poll() is None:
                tr._kill_tree(p.pid)
                p.wait()
    tr.assert_same_run(ref_dir, run_dir, tr.STEPS)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
