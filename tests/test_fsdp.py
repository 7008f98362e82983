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

The default run covers grpo and sdpo with every teacher kind (live, frozen, EMA, trust-region) under
FSDP, a two-process FSDP continual run, a 2 -> 1 resume and the checks of a resume on another number
of processes. ``DENSER_FSDP_TESTS=1`` adds the long forms: every built-in objective under FSDP and
DDP, a reference model, continual runs under DDP and the accelerate launch and resumed inside a
stage, 1 -> 2 and 2 -> 1 resumes under FSDP and DDP, and SIGKILL + ``--resume`` of two FSDP processes.
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
TASK_B = "parity_fixed_compare"  # the second stage of the continual runs
ENGINE = "fixed"
LONG = bool(os.environ.get("DENSER_FSDP_TESTS"))
CONFIG = ROOT / "configs" / "accelerate_fsdp.yaml"

BASE = ["--model", "tiny", "--task", TASK, "--engine", ENGINE, "--steps", "2", "--max-new-tokens", "6",
        "--num-generations", "4", "--eval-size", "2", "--micro-batch-size", "3", "--no-progress", "--lr", "1e-3",
        "--save-every", "1", "--keep-last", "3", "--cpu"]
PROMPTS = 2  # per process with two processes; one process takes 2 * PROMPTS
RTOL, ATOL_WEIGHTS = 2e-5, 5e-5

OBJECTIVES = {  # the default test run: grpo and one configuration of every teacher kind
    "grpo": ["--objective", "grpo"],
    "sdpo-ema": ["--objective", "sdpo", "--teacher", "ema", "--teacher-update-rate", "0.3"],
    "sdpo-live": ["--objective", "sdpo", "--teacher", "live"],
    "sdpo-frozen": ["--objective", "sdpo", "--teacher", "frozen", "--distill-mode", "full"],
    "sdpo-trust-region": ["--objective", "sdpo", "--teacher", "trust-region"],
}
LONG_OBJECTIVES = {
    "grpo-kl": ["--objective", "grpo", "--kl-coef", "0.1"],  # a frozen reference model
    "dr_grpo": ["--objective", "dr_grpo"],
    "dapo": ["--objective", "dapo"],
    "gspo": ["--objective", "gspo"],
    "hybrid": ["--objective", "hybrid", "--teacher", "ema"],
    "hybrid_adv": ["--objective", "hybrid_adv"],
    "grpo-ppo-epochs": ["--objective", "grpo", "--epochs", "2"],  # pre-update log-probs: a policy no-grad forward
    "grpo-checkpointing": ["--objective", "grpo", "--gradient-checkpointing"],
    "rloo": ["--objective", "rloo"],
    "reinforce_pp": ["--objective", "reinforce_pp"],  # batch whitening across processes
    "reinforce_pp_baseline": ["--objective", "reinforce_pp_baseline"],
    "cispo": ["--objective", "cispo"],
    "opd": ["--objective", "opd", "--teacher-path", "tiny"],  # a teacher model of another hidden size, sharded
}


# ------------------------------------------------------------------------ test-only parts


def register_test_parts() -> None:
    """The ``fixed`` rollout engine and the deterministic ``parity_fixed`` task (idempotent)."""
    import torch

    from denser.engines.base import Rollout, RolloutEngine, list_rollout_engines, register_rollout_engine
    from denser.engines.packing import build_packed_batch, completion_logprobs
    from denser.tasks import Score, list_tasks, register_task
    from denser.tasks.builtin import Addition, Compare

    def parity(completion, row):
        ok = len(completion) % 2 == 0
        return Score(float(ok), None if ok else "The reply should have an even number of characters.", None)

    if TASK not in list_tasks():
        @register_task(TASK, "addition prompts; reward 1 for an even-length reply (deterministic)")
        class ParityFixed(Addition):
            def check(self, completion, row):
                return parity(completion, row)

    if TASK_B not in list_tasks():
        @register_task(TASK_B, "compare prompts; reward 1 for an even-length reply (deterministic)")
        class ParityFixedCompare(Compare):
            def check(self, completion, row):
                return parity(completion, row)

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

    had_tasks = {t: t in list_tasks() for t in (TASK, TASK_B)}
    had_engine = ENGINE in rollout.list_rollout_engines()
    register_test_parts()
    try:
        yield
    finally:
        for t, had in had_tasks.items():
            if not had:
                unregister_task(t)
        if not had_engine:
            rollout._ENGINES.pop(ENGINE, None)


def _skip_report() -> None:
    """Continual runs here skip report.md's plots (~4 s of matplotlib per stage on two cores; the
    records compared do not depend on them; tests/test_continual.py checks the report)."""
    from denser.continual import record

    record.write_run_report = lambda *a, **k: None


def _main(argv: list[str]) -> int:
    """Run ``denser train`` once per ``:::``-separated group of flags, in this process group (a group
    that starts with ``continual`` runs ``denser continual``)."""
    register_test_parts()
    from denser.cli import main

    if os.environ.get("DENSER_TEST_UNSHARED"):  # as if each process had its own disk (RunDir.shared)
        from denser.trainers.run_dir import RunDir

        RunDir.shared = lambda self: False

    groups, current = [], []
    for a in argv:
        if a == ":::":
            groups.append(current)
            current = []
        else:
            current.append(a)
    groups.append(current)
    for flags in groups:
        if flags[:1] == ["continual"]:
            _skip_report()
        rc = main(flags if flags[:1] == ["continual"] else ["train", *flags])
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
    """One process, in this process (world 1, no sharding); ``continual ...`` runs ``denser continual``."""
    from denser.cli import main
    from denser.continual import record

    report = record.write_run_report
    with registered_test_parts():
        try:
            if flags[:1] == ["continual"]:
                _skip_report()
            assert main(flags if flags[:1] == ["continual"] else ["train", *flags]) == 0
        finally:
            record.write_run_report = report


def steps_of(run: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _checkpoint(run: Path, step: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from denser.trainers import checkpoint as ckpt
    from denser.trainers import sharded_checkpoint
    from denser.trainers.models import build_tiny_model

    path = ckpt.checkpoint_dir(run, step)
    if sharded_checkpoint.has_shards(path):  # FSDP: each process's shards, read whole, keyed by parameter name
        whole = sharded_checkpoint.read_whole(path)
        opt = {f"{n}.{k}": torch.as_tensor(v) for n, s in whole["optimizer"]["state"].items() for k, v in s.items()}
        return {"model": whole["model"], "teacher": whole.get("teacher", {}), "opt": opt}
    state, _, teacher = ckpt.load_train_state(path)
    names = [n for n, _ in build_tiny_model()[0].named_parameters()]  # the optimizer's order
    opt = {f"{names[int(i)]}.{k}": torch.as_tensor(v) for i, s in state["optimizer"]["state"].items()
           for k, v in s.items()}
    return {"model": load_file(str(path / "model" / "model.safetensors")), "teacher": teacher or {}, "opt": opt}


def assert_equal_runs(one: Path, many: Path, *, what: str, processes: tuple[int, int] = (2, 2)) -> None:
    """Loss, gradient norm and weights (and EMA teacher) after each update: ``many`` == ``one``
    (``processes``: the number of processes ``many`` ran each step on)."""
    import torch

    a, b = steps_of(one), steps_of(many)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    assert [r["processes"] for r in b] == list(processes) and [r["processes"] for r in a] == [1, 1]
    for ra, rb in zip(a, b):
        assert ra["skipped"] == rb["skipped"] == 0
        for k in ("loss", "grad_norm", "reward_mean", "response_length"):
            # a loss that is zero in exact arithmetic (REINFORCE++'s batch-whitened advantages at ratio 1 sum
            # to 0) is float32 rounding, +-1e-7 on either side: an absolute floor of 1e-6 for the loss
            atol = 1e-6 if k == "loss" else 1e-7
            assert rb[k] == pytest.approx(ra[k], rel=RTOL, abs=atol), (what, ra["step"], k, ra[k], rb[k])
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


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """``one_process(name)``: the one-process run of ``OBJECTIVES[name]`` with the global batch of two
    processes, run once for the tests of this module that compare with it."""
    root, done = tmp_path_factory.mktemp("one_process"), set()

    def run(name: str) -> Path:
        if name not in done:
            single(_flags(OBJECTIVES[name], root / name, 2 * PROMPTS))
            done.add(name)
        return root / name

    return run


@pytest.mark.slow
def test_two_fsdp_processes_equal_one_process(tmp_path, one_process):
    """grpo and sdpo with each teacher kind (live, frozen, EMA, trust-region), launched as the README
    says (``accelerate launch`` with configs/accelerate_fsdp.yaml, no denser flag): 2 FSDP processes
    == 1 process, after one and two updates."""
    runs = {name: tmp_path / name for name in OBJECTIVES}
    proc = launch([_flags(flags, runs[name] / "fsdp", PROMPTS) for name, flags in OBJECTIVES.items()], accelerate=True)
    assert proc.stdout.count("FSDP2: the policy") == len(OBJECTIVES), proc.stdout  # sharded, not DDP
    assert "FSDP2: the policy, the ema teacher sharded over 2 process(es)" in proc.stdout
    for name in OBJECTIVES:
        assert_equal_runs(one_process(name), runs[name] / "fsdp", what=f"{name} fsdp")
    rows = steps_of(runs["sdpo-ema"] / "fsdp")
    assert any(r.get("teacher_frac", 0) > 0 for r in rows), "no sample had a teacher"
    assert_sharded_checkpoints(runs["sdpo-ema"] / "fsdp", processes=2)


def assert_sharded_checkpoints(run: Path, processes: int) -> None:
    """An FSDP run's checkpoints: each process's shard file in the manifest, the weights exported
    into the final one only, and ``denser export`` of the first equal to its shards."""
    import torch
    from transformers import AutoModelForCausalLM

    from denser.trainers import checkpoint as ckpt
    from denser.trainers import sharded_checkpoint
    from denser.trainers.models import ModelNotFoundError, load_model

    first, final = ckpt.checkpoint_dir(run, 1), ckpt.checkpoint_dir(run, 2)
    for path in (first, final):
        files = ckpt.read_manifest(path)["files"]
        assert {f"state/shards/__{r}_0.distcp" for r in range(processes)} <= set(files)
        assert "state/shards/.metadata" in files
        ckpt.verify_checkpoint(path)
    assert not (first / "model" / "model.safetensors").exists()
    with pytest.raises(ModelNotFoundError, match="denser export"):
        load_model(str(first / "model"))
    final_model = AutoModelForCausalLM.from_pretrained(final / "model")
    whole = sharded_checkpoint.read_whole(final)
    for k, v in final_model.state_dict().items():
        assert torch.equal(v, whole["model"][k]), k
    out = run / "exported"
    proc = subprocess.run([sys.executable, "-m", "denser", "export", str(first), "--output", str(out)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_mode & 0o777 == 0o755  # readable by others, as a checkpoint's model/ is
    exported, first_whole = AutoModelForCausalLM.from_pretrained(out), sharded_checkpoint.read_whole(first)
    for k, v in exported.state_dict().items():
        assert torch.equal(v, first_whole["model"][k]), k
    assert any(not torch.equal(first_whole["model"][k], whole["model"][k]) for k in whole["model"])


CONTINUAL = ["continual", "--objective", "sdpo", "--teacher", "ema", "--teacher-update-rate", "0.3", "--model", "tiny",
             "--tasks", f"{TASK},{TASK_B}", "--eval-tasks", "reverse", "--engine", ENGINE, "--steps-per-task", "1",
             "--max-new-tokens", "6", "--num-generations", "4", "--eval-size", "2", "--micro-batch-size", "3",
             "--no-progress", "--lr", "1e-3", "--spectral-rank", "4", "--carry-optimizer", "--cpu"]


def _continual(out: Path, prompts: int, *extra: str) -> list[str]:
    return [*CONTINUAL, "--prompts-per-step", str(prompts), "--output-dir", str(out), *extra]


def _close(a, b, path: str, rtol: float, atol: float) -> None:
    """``b`` == ``a`` (nested records): numbers within ``atol + rtol * |a|``, everything else equal."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, sorted(a), sorted(b) if isinstance(b, dict) else b)
        for k in a:
            _close(a[k], b[k], f"{path}.{k}", rtol, atol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", rtol, atol)
    elif isinstance(a, float) and not isinstance(b, bool):
        assert abs(a - b) <= atol + rtol * abs(a), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


# what may differ between a continual run on one process and on two: times, paths, the command and the
# process count of the config (the run directories differ); float measurements are compared with tolerances
VOLATILE = {"time_s", "measure_time_s", "step_time_s", "elapsed_s", "checkpoint", "output_dir", "command"}


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def assert_equal_continual(one: Path, many: Path) -> None:
    """The continual records of ``one`` and ``many`` (a multi-process run) agree stage by stage.

    Accuracies, responses and artifacts are those of the same greedy responses: equal. Losses and
    rewards as in :func:`assert_equal_runs`. Response KL and parameter drift are functions of weights
    that agree up to float summation order (see the module docstring): relative L2 drift, cosine and
    KL to 1e-4 relative (seen: 1.5e-5 on a KL of 0.02, 2e-6 on drifts), principal angles to 1e-3
    degrees (seen: 2.3e-5 degrees on angles of 3-17 degrees). A wrong weight, a missing slice of a
    sharded matrix or a layer gathered from the wrong model moves these by their whole size."""
    a, b = (_strip(json.loads((r / "continual.json").read_text())) for r in (one, many))
    for rec in (a, b):
        rec["config"].pop("prompts_per_step")
        rec.pop("continual")
    assert a["status"] == b["status"] == "complete"
    assert len(a["stages"]) == 3
    for sa, sb in zip(a["stages"], b["stages"]):
        k = sa["stage"]
        ra = (Path(one) / "responses" / f"stage-{k:03d}.jsonl").read_text()
        assert ra == (Path(many) / "responses" / f"stage-{k:03d}.jsonl").read_text(), f"stage {k} responses"
        _close(sa["accuracy"], sb["accuracy"], f"stage {k} accuracy", 0, 0)
        _close(sa["eval"]["tasks"], sb["eval"]["tasks"], f"stage {k} eval", 1e-4, 1e-7)
        _close(sa["params"], sb["params"], f"stage {k} params", 1e-4, 1e-3 if k else 0)
        if k:
            assert sa["params"]["relative_l2"] > 1e-4, "the weights did not move"
            for ta, tb in zip(sa["train"]["steps_log"], sb["train"]["steps_log"]):
                for key in ("loss", "grad_norm", "reward_mean"):
                    assert tb[key] == pytest.approx(ta[key], rel=RTOL, abs=1e-7), (k, key)
    _close(a["accuracy_matrix"], b["accuracy_matrix"], "accuracy_matrix", 0, 0)
    _close(a["metrics"], b["metrics"], "metrics", 1e-6, 1e-9)


@pytest.fixture(scope="module")
def two_fsdp_processes(tmp_path_factory):
    """One launch of two FSDP processes (start-up is ~10 s of two cores) for the default tests below:
    a continual run, and one step of sdpo (EMA teacher) that a single process resumes."""
    root = tmp_path_factory.mktemp("two_fsdp")
    proc = launch([_continual(root / "continual", PROMPTS, "--fsdp"),
                   _flags(OBJECTIVES["sdpo-ema"], root / "half", PROMPTS, "--fsdp", "--steps", "1")])
    return root, proc


@pytest.mark.slow
def test_two_fsdp_processes_run_a_continual_sequence_as_one_process(two_fsdp_processes, tmp_path):
    """``denser continual --fsdp`` on two processes (sdpo, EMA teacher carried across stages, AdamW
    carried): every stage trains sharded and the record (accuracy matrix, response KL, drift with
    principal angles, artifacts, responses) equals the one-process run's."""
    root, proc = two_fsdp_processes
    assert proc.stdout.count("FSDP2: the policy, the ema teacher sharded over 2 process(es)") == 3, proc.stdout
    single(_continual(tmp_path / "one", 2 * PROMPTS))
    assert_equal_continual(tmp_path / "one", root / "continual")


@pytest.mark.slow
def test_a_checkpoint_of_two_fsdp_processes_resumes_on_one(two_fsdp_processes, one_process, tmp_path):
    """2 -> 1: one process resumes the two-process FSDP checkpoint of step 1 with the global batch
    kept (the flags say --prompts-per-step 2: it takes 4), so it trains step 2 on the prompts the
    uninterrupted run trains on (the fixed engine's completions are functions of the prompts: other
    prompts would change the loss) and ends where a one-process run ends."""
    root, _ = two_fsdp_processes
    half = tmp_path / "half"
    import shutil

    shutil.copytree(root / "half", half)
    single(_flags(OBJECTIVES["sdpo-ema"], half, PROMPTS, "--resume"))
    assert_equal_runs(one_process("sdpo-ema"), half, what="2 -> 1 resume", processes=(2, 1))
    import yaml

    assert yaml.safe_load((half / "config.yaml").read_text())["prompts_per_step"] == 2 * PROMPTS


def test_a_resume_on_another_process_count_keeps_the_global_batch_or_is_refused(tmp_path):
    """The per-process count a resume takes, and the one-line refusal (before any model is loaded)
    when the new count does not divide the checkpoint's global batch."""
    import json as _json
    from types import SimpleNamespace

    from denser.trainers.config import TrainConfig
    from denser.trainers.loop import Trainer

    path = tmp_path / "step-000001"
    (path / "state").mkdir(parents=True)
    notes: list[str] = []
    cfg = TrainConfig(prompts_per_step=3)
    # the same count: the flags decide, as before (a changed --prompts-per-step is noted by the config check)
    for written, world, per, expect in ((1, 2, 4, 2), (2, 1, 2, 4), (2, 4, 4, 2), (3, 3, 5, 3)):
        (path / "state" / "trainer_state.json").write_text(_json.dumps({"processes": written, "prompts_per_step": per}))
        me = SimpleNamespace(world=world, _note=notes.append)
        assert Trainer._keep_global_batch(me, path, cfg).prompts_per_step == expect
    (path / "state" / "trainer_state.json").write_text(_json.dumps({"processes": 1, "prompts_per_step": 3}))
    with pytest.raises(ValueError, match=r"written by 1 process\(es\) with --prompts-per-step 3 \(3 prompts per step\); "
                                         r"2 processes cannot split them evenly: resume with a number of processes "
                                         r"that divides 3"):
        Trainer._keep_global_batch(SimpleNamespace(world=2, _note=notes.append), path, cfg)
    (path / "state" / "trainer_state.json").write_text(_json.dumps({"step": 1}))  # an earlier denser's: as it was
    assert Trainer._keep_global_batch(SimpleNamespace(world=2, _note=notes.append), path, cfg) is cfg


def test_the_prompt_schedule_continues_on_another_process_count():
    """With the global batch kept, the prompts of every step (all processes together, in the order
    of their request indices) and their request indices are the same for 1, 2, 3 and 6 processes,
    and a run whose process count changes at any step neither skips nor repeats a prompt."""
    from denser.tasks import get_task
    from denser.trainers.prompts import PromptSchedule

    task = get_task("addition", seed=0)
    n = len(task.train)
    total, steps = 6, n // 6 + 3  # past an epoch boundary

    def step_rows(world: int, step: int) -> list:
        out = []
        for r in range(world):
            ps = PromptSchedule(task, None, seed=5, prompts_per_step=total // world, rank=r, world=world,
                                max_new_tokens=4, context_limit=None)
            out += list(zip(ps.request_indices(), map(repr, ps.rows_for_step(step))))
        return sorted(out)

    for step in (0, 1, steps - 1):
        assert step_rows(1, step) == step_rows(2, step) == step_rows(3, step) == step_rows(6, step)
    # 2 processes for the first steps, then 3: the first epoch's draws are each prompt exactly once
    seen = [row for t in range(n // total) for _, row in step_rows(2 if t < 4 else 3, t)]
    assert len(seen) == len(set(seen)) == (n // total) * total


def test_sharding_settings_denser_does_not_run_fail_with_the_fix():
    from types import SimpleNamespace

    import torch

    from denser.trainers.sharding import Sharding

    base = dict(fsdp_version=2, activation_checkpointing=False, cpu_ram_efficient_loading=False)
    for change, words in ((dict(fsdp_version=1), "fsdp_version: 2"),
                          (dict(activation_checkpointing=True), "fsdp_activation_checkpointing")):
        with pytest.raises(ValueError, match=words):
            Sharding(SimpleNamespace(**{**base, **change}), torch.device("cpu"))


def test_fp16_is_refused_under_fsdp(tmp_path):
    """Before any model is loaded or any process group started."""
    import torch.distributed as dist

    from denser.trainers.config import TrainConfig
    from denser.trainers.loop import Trainer

    was = dist.is_initialized()
    cfg = TrainConfig(model="tiny", fsdp=True, output_dir=str(tmp_path / "r"), progress=False, mixed_precision="fp16")
    with pytest.raises(ValueError, match="--mixed-precision fp16 needs a gradient scaler.*bf16"):
        Trainer(cfg, log=lambda *a: None)
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


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="continual under DDP and accelerate, --resume inside a stage, 1 -> 2 and 2 -> 1 "
                                     "under FSDP and DDP: DENSER_FSDP_TESTS=1")
def test_continual_and_resume_on_another_count_long_forms(tmp_path, one_process):
    """The long forms: a continual run under DDP (torchrun without --fsdp) and under the accelerate
    FSDP launch equals one process; a two-process FSDP continual run stopped inside stage 2 after its
    first step (its record and checkpoints as a stop leaves them) and resumed ends with the record of
    the uninterrupted run; checkpoints of one process resume on two (FSDP and DDP), and of two DDP
    processes on one, ending where one process ends."""
    import shutil

    from denser.continual.record import IN_PROGRESS

    sdpo = OBJECTIVES["sdpo-ema"]
    two_steps = ["--steps-per-task", "2", "--save-every", "1", "--keep-last", "3"]
    for name in ("r12-fsdp", "r12-ddp"):  # one step on one process (4 prompts), resumed below on two
        single(_flags(sdpo, tmp_path / name, 2 * PROMPTS, "--steps", "1"))
    single(_continual(tmp_path / "c-one", 2 * PROMPTS))
    single(_continual(tmp_path / "c2-one", 2 * PROMPTS, *two_steps))
    launch([_continual(tmp_path / "c-ddp", PROMPTS), _continual(tmp_path / "c2-fsdp", PROMPTS, "--fsdp", *two_steps),
            _flags(sdpo, tmp_path / "r12-fsdp", PROMPTS, "--resume", "--fsdp"),
            _flags(sdpo, tmp_path / "r12-ddp", PROMPTS, "--resume"),
            _flags(sdpo, tmp_path / "r21-ddp", PROMPTS, "--steps", "1")])
    single(_flags(sdpo, tmp_path / "r21-ddp", PROMPTS, "--resume"))
    for name, processes in (("r12-fsdp", (1, 2)), ("r12-ddp", (1, 2)), ("r21-ddp", (2, 1))):
        assert_equal_runs(one_process("sdpo-ema"), tmp_path / name, what=name, processes=processes)
    assert_equal_continual(tmp_path / "c-one", tmp_path / "c-ddp")
    assert_equal_continual(tmp_path / "c2-one", tmp_path / "c2-fsdp")

    # stopped inside stage 2 after its first step: what a SIGTERM there leaves
    full, stopped = tmp_path / "c2-fsdp", tmp_path / "c2-stopped"
    shutil.copytree(full, stopped)
    record = json.loads((stopped / "continual.json").read_text())
    stage_dir = next((stopped / "stages").glob("02-*"))
    record.update(stages=record["stages"][:2], accuracy_matrix=record["accuracy_matrix"][:2], status="stopped",
                  metrics=None, **{IN_PROGRESS: {"stage": 2, "task": TASK_B, "dir": f"stages/{stage_dir.name}"}})
    (stopped / "continual.json").write_text(json.dumps(record))
    shutil.rmtree(stage_dir / "checkpoints" / "step-000002")
    (stopped / "responses" / "stage-002.jsonl").unlink()
    # stopped between stages 1 and 2: stage 2 starts from stage 1's sharded checkpoint (its weights as
    # exported, its AdamW state and EMA teacher read from the shards)
    between = tmp_path / "c2-between"
    shutil.copytree(full, between)
    record = json.loads((between / "continual.json").read_text())
    record.update(stages=record["stages"][:2], accuracy_matrix=record["accuracy_matrix"][:2], status="stopped",
                  metrics=None)
    (between / "continual.json").write_text(json.dumps(record))
    shutil.rmtree(next((between / "stages").glob("02-*")))
    (between / "responses" / "stage-002.jsonl").unlink()
    proc = launch([_continual(stopped, PROMPTS, *two_steps, "--resume"),
                   _continual(between, PROMPTS, *two_steps, "--resume"),
                   _continual(tmp_path / "c-accelerate", PROMPTS)], accelerate=True)
    assert "resuming" in proc.stdout and "inside stage 2" in proc.stdout, proc.stdout[-2000:]
    assert "after stage 1\n" in proc.stdout or "after stage 1 " in proc.stdout, proc.stdout[-2000:]
    assert_equal_continual(tmp_path / "c2-one", stopped)
    assert_equal_continual(tmp_path / "c2-one", between)
    assert_equal_continual(tmp_path / "c-one", tmp_path / "c-accelerate")


def _two_process_check(dirs: list[Path]) -> tuple[list, dict[int, list[str]]]:
    """``RunDir.check(resume=True)`` on two simulated processes (threads; process r sees run
    directory ``dirs[r]``): their results and the checkpoints each verified (hashed)."""
    import threading

    from denser.trainers import checkpoint as ckpt
    from denser.trainers.run_dir import RunDir

    barrier, slot = threading.Barrier(2), {}
    hashed: dict[int, list[str]] = {0: [], 1: []}
    rank_of = {}

    def broadcast(obj):
        if rank_of[threading.get_ident()] == 0:
            slot["b"] = obj
        barrier.wait()
        out = slot["b"]
        barrier.wait()
        return out

    def gather(obj):
        slot[rank_of[threading.get_ident()]] = obj
        barrier.wait()
        out = [slot[0], slot[1]]
        barrier.wait()
        return out

    real = ckpt.verify_checkpoint

    def verify(path):
        hashed[rank_of[threading.get_ident()]].append(Path(path).name)
        return real(path)

    results: list = [None, None]

    def proc(r):
        rank_of[threading.get_ident()] = r
        run = RunDir(dirs[r], is_main=r == 0, log=lambda m: None, barrier=barrier.wait, world=2,
                     broadcast=broadcast, gather=gather)
        try:
            results[r] = run.check({}, resume=True, overwrite=False, steps=10)
        except ValueError as e:
            results[r] = e

    ckpt.verify_checkpoint = verify
    try:
        threads = [threading.Thread(target=proc, args=(r,)) for r in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        ckpt.verify_checkpoint = real
    return results, hashed


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="two processes, one launch: DENSER_FSDP_TESTS=1")
def test_fsdp_processes_without_a_shared_directory_write_gathered_checkpoints(tmp_path, one_process, monkeypatch):
    """Where the processes do not share the run directory, the main process writes whole tensors (the
    format of one process), which equal one process's run."""
    monkeypatch.setenv("DENSER_TEST_UNSHARED", "1")
    from denser.trainers import sharded_checkpoint

    run = tmp_path / "unshared"
    launch([_flags(OBJECTIVES["sdpo-ema"], run, PROMPTS, "--fsdp")])
    assert not sharded_checkpoint.has_shards(run / "checkpoints" / "step-000001")
    assert (run / "checkpoints" / "step-000001" / "model" / "model.safetensors").is_file()
    assert_equal_runs(one_process("sdpo-ema"), run, what="sdpo-ema fsdp, gathered checkpoints")


def test_fsdp_checkpoints_are_sharded_on_a_shared_filesystem_and_gathered_otherwise(tmp_path, monkeypatch):
    """RunDir.shared(), which decides how an FSDP run writes its checkpoints: every process writes its
    shards into the run directory when all of them see it; on machines with their own disks (each
    process its own directory here) the main process writes whole tensors, as it alone keeps them."""
    import denser.trainers.run_dir as run_dir_module
    from denser.trainers.run_dir import RunDir

    def shared(dirs):
        def check(run):
            return run.shared(), run.shared()  # asked once: the second call is no collective

        monkeypatch.setattr(RunDir, "check", lambda self, *a, **k: check(self))
        results, _ = _two_process_check(dirs)
        return results

    assert shared([tmp_path / "run", tmp_path / "run"]) == [(True, True), (True, True)]
    assert shared([tmp_path / "a", tmp_path / "b"]) == [(False, False), (False, False)]
    assert list(tmp_path.glob("*/.denser-probe-*")) == []
    assert RunDir(tmp_path / "one").shared() and run_dir_module  # one process: nothing to ask


def test_a_checkpoint_is_verified_once_on_a_shared_filesystem_and_by_each_machine_otherwise(tmp_path):
    """On resume the main process hashes the checkpoint's files and the other processes that see
    the same directory take its verdict; a process on another disk (here: a copy of the run
    directory) verifies its own copy; processes that end on different checkpoints are refused."""
    import shutil

    import torch

    from denser.trainers import checkpoint as ckpt
    from denser.trainers.models import build_tiny_model

    run = tmp_path / "run"
    model, tok = build_tiny_model(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2):
        ckpt.save_checkpoint(run, step, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                             trainer_state={"step": step, "metrics_rows": 0}, teacher_state=None, keep_last=3)
    results, hashed = _two_process_check([run, run])  # a shared filesystem
    assert results == [ckpt.checkpoint_dir(run, 2)] * 2
    assert hashed == {0: ["step-000002"], 1: []}
    assert not list(run.glob(".denser-probe-*"))

    other = tmp_path / "node1" / "run"  # another machine's disk: its own copy, verified there
    shutil.copytree(run, other)
    results, hashed = _two_process_check([run, other])
    assert results == [ckpt.checkpoint_dir(run, 2), ckpt.checkpoint_dir(other, 2)]
    assert hashed == {0: ["step-000002"], 1: ["step-000002"]}

    data = bytearray((ckpt.checkpoint_dir(other, 2) / "model" / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x10  # that copy is damaged: it falls back to step 1, the main process does not
    (ckpt.checkpoint_dir(other, 2) / "model" / "model.safetensors").write_bytes(bytes(data))
    results, _ = _two_process_check([run, other])
    for r in results:
        assert isinstance(r, ValueError) and "different newest intact checkpoints" in str(r) and \
            "step-000002, step-000001" in str(r)


if __name__ == "__main__":
    code = _main(sys.argv[1:])
    from denser.cli import exit_process  # as the entry point ends: the group destroyed, no teardown

    exit_process(code)
