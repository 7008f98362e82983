"""Atomic checkpoints: a kill or a full disk during the write leaves the previous one loadable;
--resume picks the newest complete one and says which; the last N are kept; state round-trips."""

from __future__ import annotations

import errno
import json
import random
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from denser.cli import main
from denser.trainers import checkpoint as ckpt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import FAST, driver, metrics_rows, run_driver  # noqa: E402

QUICK = ["--objective", "grpo", "--model", "tiny", "--task", "addition", "--max-new-tokens", "4",
         "--num-generations", "2", "--prompts-per-step", "2", "--eval-size", "2", "--no-progress", "--lr", "1e-2"]


def _tiny(tied: bool = False, dtype=torch.float32, seed: int = 0):
    from transformers import LlamaForCausalLM

    from denser.trainers.models import build_tiny_model

    model, tok = build_tiny_model(seed=seed, dtype=dtype)
    if tied:  # as SmolLM2: lm_head shares the embedding matrix
        config = model.config
        config.tie_word_embeddings = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(dtype)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, tok


def _save(run, step, model, tok, *, keep_last=3, teacher_state=None, rng=None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ckpt.save_checkpoint(run, step, model=model, tokenizer=tok, optimizer=opt, scheduler=sched,
                                trainer_state={"step": step, "metrics_rows": step + 1}, teacher_state=teacher_state,
                                keep_last=keep_last, rng=rng)


# ------------------------------------------------------------------------------- kill and disk


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    run = tmp_path / "run"
    args = ["--objective", "grpo", *FAST, "--steps", "4", "--save-every", "1", "--output-dir", str(run)]
    proc = driver(*args, hooks={"pause_before_rename": "3"})
    try:
        deadline = time.monotonic() + 90
        for line in proc.stdout:  # the hook prints PAUSED once every file of step 3 is written, before the rename
            if line.startswith("PAUSED"):
                break
            assert time.monotonic() < deadline
        else:
            raise AssertionError(f"the run ended without pausing: {proc.communicate()[1][-3000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    leftovers = ckpt.incomplete_checkpoints(run)
    assert [p.name[:len(".tmp-step-000003")] for p in leftovers] == [".tmp-step-000003"]
    assert (leftovers[0] / "model" / "model.safetensors").exists()  # it was written in full, only not renamed
    latest = ckpt.latest_checkpoint(run)
    assert latest == ckpt.checkpoint_dir(run, 2)
    # the previous checkpoint is loadable: by transformers and as resume state
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(latest / "model")
    state, trainer_state, _ = ckpt.load_train_state(latest)
    assert trainer_state["step"] == 2 and "optimizer" in state

    resumed = run_driver(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"ignoring {leftovers[0]}" in resumed.stdout
    assert f"resumed from {latest} (step 2" in resumed.stdout
    assert not ckpt.incomplete_checkpoints(run)  # removed by the next save
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000003", "step-000004"]  # --keep-last 2
    assert [r["step"] for r in metrics_rows(run)] == [0, 1, 2, 3, 4, 4]


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    args = ["train", *QUICK, "--steps", "3", "--save-every", "1", "--keep-last", "1", "--output-dir", str(run)]
    real_save = ckpt.save_file

    def full_disk(tensors, f, *a, **k):
        if "step-000002" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, f, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "could not write checkpoint" in err[0] and "step-000002" in err[0] and "No space left on device" in err[0]
    assert f"{ckpt.checkpoint_dir(run, 1)}, is intact" in err[0] and "--resume" in err[0]
    assert ckpt.latest_checkpoint(run) == ckpt.checkpoint_dir(run, 1)
    assert not ckpt.incomplete_checkpoints(run)  # the half-written directory is gone
    ckpt.load_train_state(ckpt.checkpoint_dir(run, 1))

    monkeypatch.setattr(ckpt, "save_file", real_save)  # space freed: the run resumes from step 1
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {ckpt.checkpoint_dir(run, 1)} (step 1" in out
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-000003"]
    assert [r["step"] for r in metrics_rows(run)] == [0, 1, 2, 3, 3]


def test_full_disk_during_a_re_save_keeps_the_old_copy(tmp_path, monkeypatch):
    model, tok = _tiny()
    first = _save(tmp_path, 5, model, tok)
    before = load_file(str(first / "model" / "model.safetensors"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save_pretrained", full)
    with pytest.raises(OSError, match="No space"):
        _save(tmp_path, 5, model, tok)
    assert ckpt.latest_checkpoint(tmp_path) == first
    after = load_file(str(first / "model" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not ckpt.incomplete_checkpoints(tmp_path)


# ------------------------------------------------------------------------------ finding, pruning


def test_only_complete_checkpoints_count_and_the_last_n_are_kept(tmp_path):
    model, tok = _tiny()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, tok, keep_last=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    (root / "step-000009").mkdir()  # a directory without COMPLETE is never loaded
    (root / ".tmp-step-000010-abc").mkdir()
    (root / "step-notanumber").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == root / "step-000003"
    assert {p.name for p in ckpt.incomplete_checkpoints(tmp_path)} == {"step-000009", ".tmp-step-000010-abc"}
    # a re-save killed between its two renames: the old copy is found aside
    (root / "step-000003").rename(root / ".old-step-000003-xyz")
    assert ckpt.latest_checkpoint(tmp_path) == root / ".old-step-000003-xyz"
    assert ckpt.checkpoint_step(root / ".old-step-000003-xyz") == 3
    _save(tmp_path, 4, model, tok, keep_last=1)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000004"]
    assert not list(root.glob(".tmp-*"))


def test_a_checkpoint_without_its_state_is_a_clear_error(tmp_path):
    model, tok = _tiny()
    path = _save(tmp_path, 1, model, tok)
    (path / "state" / "train_state.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing state/train_state.safetensors"):
        ckpt.load_train_state(path)


# ----------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tied, dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)])
def test_policy_and_ema_teacher_round_trip_bit_exactly(tmp_path, tied, dtype):
    """The loop reloads the policy with load_model(<ckpt>/model) and the EMA teacher from its state:
    both must come back bit-identical, tied embeddings still tied, in the run's dtype."""
    from denser.trainers.models import load_model
    from denser.trainers.teacher import TeacherWeights

    model, tok = _tiny(tied, dtype)
    teacher = TeacherWeights(model, "ema", 0.3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, dtype=torch.float32).to(dtype) * 0.01)
    teacher.update(model)
    path = _save(tmp_path, 1, model, tok, teacher_state=teacher.state_dict())

    loaded, _ = load_model(str(path / "model"), dtype=dtype)
    assert loaded.dtype == dtype
    want = model.state_dict()
    got = loaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    _, _, teacher_state = ckpt.load_train_state(path)
    fresh = TeacherWeights(loaded, "ema", 0.3)  # as on resume: a copy of the resumed policy, then its state
    fresh.load_state_dict(teacher_state)
    t_want, t_got = teacher.model.state_dict(), fresh.model.state_dict()
    assert all(torch.equal(t_want[k], t_got[k]) for k in t_want)
    assert not torch.equal(t_got["model.norm.weight"], loaded.state_dict()["model.norm.weight"])  # it is not the policy
    if tied:
        assert fresh.model.lm_head.weight is fresh.model.model.embed_tokens.weight
        fresh.update(loaded)  # and the tie survives an EMA update
        assert torch.equal(fresh.model.lm_head.weight, fresh.model.model.embed_tokens.weight)


def test_rng_streams_round_trip_per_process(tmp_path):
    model, tok = _tiny()

    def draw():
        return random.random(), float(np.random.random()), float(torch.rand(()))

    states = []
    for rank in range(2):  # two processes with different streams
        random.seed(rank), np.random.seed(rank), torch.manual_seed(rank)
        states.append(ckpt.rng_state())
    path = _save(tmp_path, 1, model, tok, rng=states)
    expected = []
    for rank in range(2):
        ckpt.set_rng_state(states[rank])
        expected.append(draw())
    assert expected[0] != expected[1]
    saved = ckpt.load_train_state(path)[0]["rng"]
    for rank in range(2):
        random.seed(99), np.random.seed(99), torch.manual_seed(99)
        ckpt.set_rng_state(saved, rank)
        assert draw() == expected[rank]
    with pytest.raises(ckpt.CheckpointError, match="2 process"):
        ckpt.set_rng_state(saved, 2)
    ckpt.set_rng_state(states[0])  # a single state (the format before per-process states) still loads
    assert draw() == expected[0]


def test_teacher_state_file_round_trips_tied_weights(tmp_path):
    """safetensors refuses tensors that share memory: the teacher's state must be independent copies."""
    from denser.trainers.teacher import TeacherWeights

    model, _ = _tiny(tied=True)
    state = TeacherWeights(model, "ema", 0.1).state_dict()
    save_file(state, str(tmp_path / "t.safetensors"))
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


# --------------------------------------------------------------------------- resume edge cases


def test_resume_without_a_checkpoint_starts_over_and_resume_of_a_finished_run_does_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_accuracy": 0.5}) + "\n" + '{"step": 1, "lo')
    args = ["train", *QUICK, "--steps", "1", "--output-dir", str(run)]
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "no complete checkpoint" in out
    assert [r["step"] for r in metrics_rows(run)] == [0, 1, 1]  # the old rows are gone, not duplicated
    before = (run / "metrics.jsonl").read_text()
    final = load_file(str(ckpt.checkpoint_dir(run, 1) / "model" / "model.safetensors"))

    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert "already complete" in out
    assert (run / "metrics.jsonl").read_text() == before  # no second final eval row
    again = load_file(str(ckpt.checkpoint_dir(run, 1) / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_resume_truncates_rows_written_after_the_checkpoint(tmp_path, capsys):
    """A kill after a step's metrics row but before its checkpoint: the resumed run rewrites that row."""
    run = tmp_path / "run"
    args = ["train", *QUICK, "--steps", "2", "--save-every", "1", "--output-dir", str(run)]
    assert main(args) == 0
    rows = (run / "metrics.jsonl").read_text().splitlines()
    # as if killed after writing step 2's row (and half a line) with only checkpoint 1 on disk
    import shutil

    shutil.rmtree(ckpt.checkpoint_dir(run, 2))
    (run / "metrics.jsonl").write_text("\n".join(rows[:3]) + '\n{"step": 2, "rew')
    assert main([*args, "--resume"]) == 0
    assert f"resumed from {ckpt.checkpoint_dir(run, 1)} (step 1" in capsys.readouterr().out
    assert [r["step"] for r in metrics_rows(run)] == [0, 1, 2, 2]



# ------------------------------------------------------------------- manifests and verification


def test_the_marker_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib

    model, tok = _tiny()
    path = _save(tmp_path, 1, model, tok, teacher_state={"w": torch.ones(3)})
    marker = json.loads((path / "COMPLETE").read_text())
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(marker["files"]) == files
    assert {"model/model.safetensors", "state/train_state.safetensors", "state/train_state.json",
            "state/trainer_state.json", "state/teacher.safetensors"} <= set(files)
    for rel in files:
        data = (path / rel).read_bytes()
        assert marker["files"][rel] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert marker["step"] == 1 and marker["hash"] == "sha256"
    ckpt.verify_checkpoint(path)


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _flip_a_bit(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the hash can tell
    p.write_bytes(bytes(data))


DAMAGE = {
    "truncated": ("model/model.safetensors", _truncate, "bytes, its manifest records"),
    "bit-flipped": ("state/train_state.safetensors", _flip_a_bit, "does not match its sha256"),
    "missing": ("state/trainer_state.json", Path.unlink, "state/trainer_state.json is missing"),
    "marker": ("COMPLETE", lambda p: p.write_text('{"files": '), "COMPLETE marker is not a manifest"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A tiny run with checkpoints at steps 1 and 2 (trained once, copied per test)."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *QUICK, "--steps", "2", "--save-every", "1", "--keep-last", "3", "--output-dir",
                 str(run)]) == 0
    return run


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(two_checkpoints, tmp_path, kind, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    rel, damage, says = DAMAGE[kind]
    newest = ckpt.checkpoint_dir(run, 2)
    damage(newest / rel)
    with pytest.raises(ckpt.DamagedCheckpointError, match=re.escape(says)):
        ckpt.verify_checkpoint(newest)
    capsys.readouterr()
    assert main(["train", *QUICK, "--steps", "3", "--save-every", "1", "--keep-last", "3", "--output-dir", str(run),
                 "--resume"]) == 0
    out = capsys.readouterr().out.splitlines()
    damaged = [line for line in out if " is damaged" in line]
    assert len(damaged) == 1 and str(newest) in damaged[0] and says in damaged[0], out
    assert "trying the previous checkpoint" in damaged[0]
    assert any(line.startswith(f"resumed from {ckpt.checkpoint_dir(run, 1)} (step 1") for line in out), out
    assert [r["step"] for r in metrics_rows(run)] == [0, 1, 2, 3, 3]
    for p in ckpt.complete_checkpoints(run):  # the damaged one was replaced by a fresh step 2
        ckpt.verify_checkpoint(p)


def test_resume_from_a_run_whose_only_checkpoint_is_damaged_fails_before_any_compute(two_checkpoints, tmp_path,
                                                                                     monkeypatch, capsys):
    import shutil

    from denser.trainers import loop

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    shutil.rmtree(ckpt.checkpoint_dir(run, 1))
    _flip_a_bit(ckpt.checkpoint_dir(run, 2) / "model" / "model.safetensors")
    before = (run / "metrics.jsonl").read_text()

    def no_compute(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loop, "load_model", no_compute)  # the loop imports it by name
    capsys.readouterr()
    assert main(["train", *QUICK, "--steps", "3", "--output-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("denser train: error: --resume: the only checkpoint of")
    assert "model/model.safetensors does not match its sha256" in err[0] and "--overwrite" in err[0]
    assert (run / "metrics.jsonl").read_text() == before


class _WritesAMarker:
    """Unpickling this creates a file: the stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_training_state_is_refused_and_never_unpickled(two_checkpoints, tmp_path, capsys):
    """A checkpoint in the earlier format (state/train_state.pt, a pickle) whose unpickling would
    write a file: --resume refuses it with one line and the file is never written."""
    import pickle
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    marker = tmp_path / "code-ran"
    for step in (1, 2):  # as an older denser wrote them: a pickle, and a marker holding only the step
        c = ckpt.checkpoint_dir(run, step)
        for f in ("train_state.safetensors", "train_state.json"):
            (c / "state" / f).unlink()
        (c / "state" / "train_state.pt").write_bytes(pickle.dumps({"optimizer": _WritesAMarker(marker)}))
        (c / "COMPLETE").write_text(str(step))
    with pytest.raises(ckpt.LegacyCheckpointError, match="pickle"):
        ckpt.load_train_state(ckpt.checkpoint_dir(run, 2))
    capsys.readouterr()
    assert main(["train", *QUICK, "--steps", "3", "--output-dir", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "state/train_state.pt" in err[0] and "never loaded" in err[0], err
    assert not marker.exists()
    planted = pickle.loads((ckpt.checkpoint_dir(run, 2) / "state" / "train_state.pt").read_bytes())
    planted["optimizer"].close()
    assert marker.exists()  # the test's own check: unpickling that file does run code


def test_a_pickle_planted_next_to_a_current_checkpoint_is_ignored(two_checkpoints, tmp_path, capsys):
    import pickle
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    marker = tmp_path / "code-ran"
    c = ckpt.checkpoint_dir(run, 2)
    (c / "state" / "train_state.pt").write_bytes(pickle.dumps(_WritesAMarker(marker)))
    ckpt.verify_checkpoint(c)  # a file the manifest does not list is not the checkpoint's
    assert main(["train", *QUICK, "--steps", "3", "--output-dir", str(run), "--resume"]) == 0
    assert f"resumed from {c} (step 2" in capsys.readouterr().out
    assert not marker.exists()


def test_state_encoding_round_trips_and_refuses_what_would_need_pickling():
    """encode_state/decode_state against the original object: int-keyed dicts, tuples, tensors of
    several dtypes (0-d included), numpy arrays, non-finite floats."""
    rng = np.random.default_rng(0)
    obj = {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3).to(torch.bfloat16)},
                     7: {"step": torch.tensor(1.0), "m": torch.arange(5, dtype=torch.int64)}},
           "groups": [{"betas": (0.9, 0.99), "params": [0, 7], "fused": None, "lr": float("inf")}],
           "np": ("MT19937", rng.integers(0, 2**32, 624, dtype=np.uint32), 5, 0, 0.25),
           "view": torch.arange(10.0)[2:5], "__tensor__": "a key that looks like a marker"}
    tree, tensors = ckpt.encode_state(obj)
    back = ckpt.decode_state(json.loads(json.dumps(tree)), tensors)
    assert back.keys() == obj.keys() and back["state"].keys() == {0, 7}
    for i in (0, 7):
        for k, v in obj["state"][i].items():
            assert torch.equal(back["state"][i][k], v) and back["state"][i][k].dtype == v.dtype
    assert back["groups"] == obj["groups"] and isinstance(back["groups"][0]["betas"], tuple)
    assert back["np"][0] == "MT19937" and back["np"][2:] == obj["np"][2:]
    assert back["np"][1].dtype == np.uint32 and np.array_equal(back["np"][1], obj["np"][1])
    assert torch.equal(back["view"], obj["view"]) and back["__tensor__"] == obj["__tensor__"]
    with pytest.raises(ckpt.CheckpointError, match="cannot store a _WritesAMarker"):
        ckpt.encode_state({"x": _WritesAMarker("/nonexistent")})
    with pytest.raises(ckpt.CheckpointError, match="object"):
        ckpt.encode_state({"x": np.array([object()])})
