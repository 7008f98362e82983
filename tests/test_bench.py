"""``denser bench`` from the package: the kinds it dispatches to, and one small loss-core run end
to end (its workers are ``python -m denser.bench`` subprocesses, so nothing needs the clone's
``bench/`` folder). Timings are printed, never asserted."""

from __future__ import annotations

import re

import pytest

import denser.bench as bench


def test_first_argument_picks_the_benchmark(capsys):
    assert set(bench.KINDS) == {"gpu", "loop", "step", "fsdp", "lora", "sandbox"}
    assert bench.main(["gpu", "--dry-run", "--shapes", "128x64x1000", "--alphas", "1", "--cases", "chunked"]) == 0
    assert "N=128 H=64 V=1000 alpha=1.0 bfloat16: floor, chunked" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the loss-core flags are checked by the loss-core parser
        bench.main(["--cases", "nope"])
    assert "unknown case(s) nope" in capsys.readouterr().err


@pytest.mark.slow
def test_small_loss_core_run_end_to_end(capsys):
    assert bench.main(["--n", "48", "--h", "8", "--v", "40", "--cases", "chunked,fused-grpo", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "N=48 H=8 V=40 float32" in out
    for case in ("floor", "chunked", "fused-grpo"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {case} |"))
        assert "unavailable" not in row, row
        assert re.match(rf"\| {case} \| \d+\.\d{{3}} \| \d+\.\d\d \|", row), row


@pytest.mark.slow
def test_lora_benchmark_runs_full_and_lora_cases(tmp_path, capsys):
    pytest.importorskip("peft")
    argv = ["lora", "--model", "tiny", "--steps", "1", "--cases", "full-grpo,lora-grpo", "--lora-r", "2",
            "--out-dir", str(tmp_path), "--max-new-tokens", "4", "--prompts-per-step", "1", "--num-generations", "2"]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    for case in ("full-grpo", "lora-grpo"):
        assert re.search(rf"\| {case} \| \d+\.\d\d GiB \| \d+\.\d\d GiB \| \d+\.\d\d GiB \| \d", out), out
    assert "- grpo: training peak RSS x" in out
    assert len(list(tmp_path.glob("lora-*.md"))) == 1 and len(list(tmp_path.glob("lora-*.json"))) == 1


@pytest.mark.parametrize("objective", ["grpo", "sdpo"])
def test_step_benchmarks_micro_batched_cases_compute_the_same_step(objective, monkeypatch):
    """``denser-<objective>-mb`` cuts the step into token-budget micro-batches and accumulates; its loss and
    gradients must be the one-micro-batch step's, or the memory it reports is of another computation."""
    import copy

    import torch

    from denser.bench import step_case
    from denser.trainers.models import load_model
    from denser.trainers.teacher import TeacherWeights

    monkeypatch.setattr(step_case, "MICRO_BATCH_TOKENS", 100)
    policy, tok = load_model("tiny", dtype=torch.float32)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    runs = []
    for case in (f"denser-{objective}", f"denser-{objective}-mb"):
        spec = step_case.Spec(case, 300, False, model="tiny", completion_len=48, prompt_len=8, teacher_extra=5,
                              seed=seed)
        data = step_case._synthetic(spec, policy.get_output_embeddings().weight.shape[0])
        torch.manual_seed(seed)
        p = copy.deepcopy(policy).train()
        teacher = None
        if objective == "sdpo":  # a teacher that differs from the student, so the distillation term is not 0
            teacher = TeacherWeights(p, "ema", 0.05)
            with torch.no_grad():
                for q in teacher.model.parameters():
                    q.add_(0.02 * torch.randn_like(q))
        loss = step_case._denser_step(spec, p, teacher, data, int(tok.pad_token_id))
        runs.append((loss, [q.grad.clone() for q in p.parameters() if q.grad is not None]))
    (whole, g_whole), (split, g_split) = runs
    assert len(data[2]) == 7  # 6 x 48 + 12 tokens: 4 micro-batches of <= 100 tokens
    assert split == pytest.approx(whole, rel=1e-5, abs=1e-7)
    assert len(g_whole) == len(g_split) > 0
    for a, b in zip(g_whole, g_split):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
