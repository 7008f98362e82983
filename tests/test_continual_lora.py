"""``denser continual --lora-r R --lora-stages merge|keep`` against full-weight references computed by merging.

A LoRA continual run never changes its base model: ``keep`` trains one adapter through every stage,
``merge`` keeps each finished stage's adapter frozen and active beside a fresh one. The references
here are built with full weights, the way the choice reads: ``keep``'s weights after stage k are the
base with stage k's adapter merged in; ``merge``'s are stage 1's adapter merged into the base, then
stage 2's merged into that model (a literal "merge, then train a fresh adapter"). The record's drift
(relative L2, cosine, principal angles) must be that of those weights against the initial model, its
response KL that of those weights against the initial model (the reference is never a merged
stage), and the adapters must have started where the choice says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from denser.cli import main

pytestmark = pytest.mark.slow

from test_fsdp import ENGINE, TASK, TASK_B, registered_test_parts

# rewards that vary within groups (tests/test_fsdp.py's deterministic task and engine): every step moves the adapter
TASKS = [TASK, TASK_B, "reverse"]
FLAGS = ["--objective", "grpo", "--model", "tiny", "--tasks", f"{TASK},{TASK_B}", "--eval-tasks", "reverse",
         "--engine", ENGINE, "--steps-per-task", "1", "--eval-size", "2", "--max-new-tokens", "6",
         "--num-generations", "4", "--prompts-per-step", "2", "--spectral-rank", "4", "--no-progress", "--lr", "1e-2",
         "--lora-r", "2", "--lora-alpha", "4", "--cpu"]
LR = 1e-2


@pytest.fixture(autouse=True)
def test_parts():
    with registered_test_parts():
        yield


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    from denser.continual import record

    root = tmp_path_factory.mktemp("lora_continual")
    report = record.write_run_report
    record.write_run_report = lambda *a, **k: None  # the plots are not what is tested here (~4 s a stage)
    try:
        with registered_test_parts():
            for mode in ("keep", "merge"):
                assert main(["continual", *FLAGS, "--lora-stages", mode, "--output-dir", str(root / mode)]) == 0
    finally:
        record.write_run_report = report
    return root


def _stage_ckpts(run: Path) -> list[Path]:
    rec = json.loads((run / "continual.json").read_text())
    return [Path(s["checkpoint"]) for s in rec["stages"][1:]]


def _merged(base, adapter_dir: Path):
    """``base`` (a full model, copied) with the adapter in ``adapter_dir`` merged in: full weights."""
    import copy

    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).merge_and_unload()


def _adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model" / "adapter_model.safetensors"))


def _check_record(run: Path, references: list, initial, tok) -> None:
    """Stage k's drift and response KL in the record are those of the full-weight model ``references[k-1]``."""
    from denser.analysis.params import ParameterDrift
    from denser.analysis.suite import EvalSuite

    rec = json.loads((run / "continual.json").read_text())
    meter = ParameterDrift(initial, rank=4)
    from denser.engines.base import EngineSpec

    suite = EvalSuite(TASKS, eval_size=2, max_new_tokens=6, backend="auto", engine=EngineSpec(ENGINE))
    for k, model in enumerate(references, start=1):
        stage = rec["stages"][k]
        ref = meter(model)
        assert stage["params"]["relative_l2"] == pytest.approx(ref["relative_l2"], rel=1e-6)
        assert stage["params"]["relative_l2"] > 1e-3, "the effective weights did not move"
        assert stage["params"]["cosine"] == pytest.approx(ref["cosine"], rel=1e-9)
        for name, m in ref["spectral"]["matrices"].items():
            assert stage["params"]["spectral"]["matrices"][name]["angle_deg"] == pytest.approx(m["angle_deg"], abs=1e-4)
        measured, _ = suite.measure(model, tok, initial=initial)
        for task in TASKS:
            got = stage["eval"]["tasks"][task]
            assert got["accuracy"] == measured["tasks"][task]["accuracy"], (k, task)
            # the LoRA forward (base + low-rank paths) and the merged weights round differently: 1e-6 relative
            assert got["kl"] == pytest.approx(measured["tasks"][task]["kl"], rel=1e-3, abs=1e-6), (k, task)


def test_keep_trains_one_adapter_through_the_stages(lora_runs):
    from denser.trainers.models import build_tiny_model

    run = lora_runs / "keep"
    c1, c2 = _stage_ckpts(run)
    a1, a2 = _adapter(c1), _adapter(c2)
    assert a1.keys() == a2.keys()
    # stage 2 started from stage 1's adapter: one AdamW step (fresh moments: each element moves by lr
    # or not at all) from there; B started at zero in stage 1, so it reaches 2 lr somewhere
    for k in a1:
        assert float((a2[k] - a1[k]).abs().max()) <= 1.01 * LR, k
    assert max(float(a2[k].abs().max()) for k in a2 if "lora_B" in k) > 1.5 * LR
    assert not (c2 / "model" / "stage1").exists()
    initial, tok = build_tiny_model(seed=0)
    _check_record(run, [_merged(initial, c1 / "model"), _merged(initial, c2 / "model")], initial, tok)


def test_merge_trains_a_fresh_adapter_on_the_merged_weights(lora_runs):
    from denser.trainers import lora
    from denser.trainers.models import build_tiny_model

    run = lora_runs / "merge"
    c1, c2 = _stage_ckpts(run)
    a1, a2 = _adapter(c1), _adapter(c2)
    # stage 2's adapter is fresh: its B started at zero and one AdamW step moves an element by lr at most
    lora_b = [k for k in a1 if "lora_B" in k]
    assert max(float(a2[k].abs().max()) for k in lora_b) <= 1.01 * LR
    assert max(float((a2[k] - a1[k]).abs().max()) for k in lora_b) > 0.5 * LR  # not stage 1's adapter
    assert (c2 / "model" / "stage1").is_dir()  # stage 1's adapter kept beside it, frozen
    initial, tok = build_tiny_model(seed=0)
    m1 = _merged(initial, c1 / "model")
    m2 = _merged(m1, c2 / "model")  # literally: merge stage 1, then stage 2's adapter into that model
    _check_record(run, [m1, m2], initial, tok)
    # `denser merge-lora` of stage 2 gives those full weights too (every stage's adapter merged)
    out = lora.merge_lora(c2, run / "merged2")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out)
    for (n, p), (n2, q) in zip(merged.named_parameters(), m2.named_parameters()):
        assert n == n2 and float((p - q).abs().max()) <= 1e-6, n


def test_lora_stages_is_required_with_lora_and_refused_without(tmp_path, capsys):
    base = ["continual", "--objective", "grpo", "--model", "tiny", "--tasks", "addition", "--output-dir",
            str(tmp_path / "x")]
    assert main([*base, "--lora-r", "2"]) == 2
    assert "--lora-r needs --lora-stages: merge" in capsys.readouterr().err
    assert main([*base, "--lora-stages", "keep"]) == 2
    assert "--lora-stages keep needs --lora-r" in capsys.readouterr().err
    assert main([*base, "--lora-r", "2", "--lora-stages", "merge", "--carry-optimizer"]) == 2
    assert "--carry-optimizer with --lora-stages merge" in capsys.readouterr().err
    assert main([*base, "--lora-r", "2", "--lora-stages", "both"]) == 2
    assert "--lora-stages must be merge or keep" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
