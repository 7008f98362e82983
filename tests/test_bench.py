"""``denser bench`` from the package: the kinds it dispatches to, and one small loss-core run end
to end (its workers are ``python -m denser.bench`` subprocesses, so nothing needs the clone's
``bench/`` folder). Timings are printed, never asserted."""

from __future__ import annotations

import re

import pytest

import denser.bench as bench


def test_first_argument_picks_the_benchmark(capsys):
    assert set(bench.KINDS) == {"gpu", "loop", "step", "fsdp", "lora"}
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
