"""The GPU benchmark's parts that need no GPU: the plan, the table, the targets, the output path.

(The measurements themselves: ``denser bench gpu`` on a CUDA machine; ``--device cpu`` smoke-runs
every case under the Triton interpreter.)
"""

from __future__ import annotations

import datetime as dt

import pytest

from denser.bench import gpu


def test_default_plan_covers_issue_4_grid(capsys):
    assert gpu.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for shape in ("N=4096 H=4096 V=151936", "N=16384 H=4096 V=151936", "N=65536 H=4096 V=151936",
                  "N=8192 H=4096 V=128256"):
        assert f"{shape} alpha=0.5 bfloat16" in out and f"{shape} alpha=1.0 bfloat16" in out
    for case in ("floor", "reference", "chunked", "triton_chunked", "triton_onchip", "triton",
                 "fused-sdpo[triton_chunked]", "fused-grpo[triton_chunked]", "liger-fljsd", "liger-kl"):
        assert case in out
    assert f"{8 * len(gpu.CASES)} subprocesses" in out


def test_floor_is_always_measured_and_unknown_cases_rejected(capsys):
    assert gpu.main(["--dry-run", "--cases", "triton_onchip", "--shapes", "128x64x1000", "--alphas", "1"]) == 0
    assert "floor, triton_onchip" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gpu.main(["--dry-run", "--cases", "nope"])


def test_table_and_targets_from_rows():
    shape = gpu.Shape(4096, 4096, 151936, 0.5)
    rows = [
        dict(case="floor", median_s=0.100, peak_gib=20.0, extra_gib=5.0),
        dict(case="fused-sdpo[triton_chunked]", median_s=0.120, peak_gib=8.0, extra_gib=3.0),
        dict(case="liger-fljsd", median_s=0.300, peak_gib=9.0, extra_gib=4.0),
        dict(case="triton_onchip", median_s=0.300, peak_gib=4.0, extra_gib=0.4),
        dict(case="triton", median_s=0.121, peak_gib=8.0, extra_gib=3.0, path={"path": "triton_chunked"}),
        dict(case="reference", error="OOM: CUDA out of memory"),
    ]
    table = gpu.format_table(rows, shape)
    assert "| fused-sdpo[triton_chunked] | 120.0 | 1.20 |" in table
    assert "| triton | 121.0 | 1.21 | 8.00 | 3.00 | triton_chunked |" in table
    assert "unavailable: OOM" in table
    targets = gpu.check_targets(rows)
    assert targets[0].startswith("fused_loss triton_chunked <= 1.3x floor: PASS")
    assert targets[1].endswith("PASS (2.50x)")
    assert targets[2].startswith("triton_onchip <= 2.5x floor: FAIL (3.00x)")
    assert "PASS (extra 410 MiB)" in targets[3]
    assert all(t.endswith("n/a") for t in gpu.check_targets([dict(case="floor", median_s=1.0)]))


def test_results_path_names_device_and_date():
    path = gpu.results_path({"device": "NVIDIA H100 80GB HBM3"}, dt.date(2026, 1, 2))
    assert path.endswith("bench/results/nvidia-h100-80gb-hbm3-2026-01-02.json")


def test_without_cuda_says_what_to_do(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    assert gpu.main(["--shapes", "64x32x100", "--alphas", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
