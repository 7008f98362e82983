"""The hf engine's few-row linear layers as ``W x^T`` (``--hf-cpu-decode-matmul``, denser/engines/hf.py):
the same values as torch's linear up to rounding, only where the rule says, and the model's own forward
back afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from denser.engines import SamplingParams
from denser.engines import hf as hf_engine
from denser.engines.hf import HFRolloutEngine, use_weight_major, weight_major_linears
from denser.trainers.models import load_model


def test_the_rule_takes_few_rows_and_leaves_the_down_projection_of_decoding():
    assert use_weight_major(8, 1536, 576) and use_weight_major(16, 576, 1536) and use_weight_major(16, 49152, 576)
    assert not use_weight_major(8, 576, 1536)  # fewer outputs than inputs at <= 8 rows: slower measured
    assert not use_weight_major(1, 1536, 576) and not use_weight_major(17, 1536, 576)


@pytest.mark.parametrize("rows", [3, 8, 16, 40])
def test_a_linear_layer_gives_torchs_values_and_gradients(rows):
    torch.manual_seed(rows)
    layer = nn.Linear(48, 80, bias=True)
    x = torch.randn(2, rows // 2 + rows % 2, 48)
    ref = layer(x)
    with weight_major_linears(layer):
        assert "forward" in layer.__dict__
        got = layer(x)
    assert "forward" not in layer.__dict__
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # not only in generation: a gradient through it is torch's too
    w = layer.weight
    with weight_major_linears(layer):
        (g,) = torch.autograd.grad(layer(x).square().sum(), w)
    (g_ref,) = torch.autograd.grad(layer(x).square().sum(), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_the_forward_is_restored_after_an_error():
    model, _ = load_model("tiny", seed=0)
    with pytest.raises(RuntimeError, match="boom"), weight_major_linears(model):
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_the_engine_samples_as_without_it_and_runs_it_only_where_asked(monkeypatch):
    model, tok = load_model("tiny", seed=0)
    prompts = [tok.encode("1+2="), tok.encode("hello there")]
    taken: list[tuple[int, int, int]] = []
    real = hf_engine.use_weight_major

    def spy(rows, n, k):
        use = real(rows, n, k)
        if use:
            taken.append((rows, n, k))
        return use

    monkeypatch.setattr(hf_engine, "use_weight_major", spy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    on, off = HFRolloutEngine(model, tok), HFRolloutEngine(model, tok, cpu_decode_matmul=False)
    for params in (SamplingParams(max_new_tokens=6, num_generations=4, temperature=1.2),
                   SamplingParams(max_new_tokens=6, num_generations=1, do_sample=False)):
        taken.clear()
        a = off.generate(prompts, params, seed=7)
        assert taken == []
        b = on.generate(prompts, params, seed=7)
        assert taken and all(rows <= hf_engine.WEIGHT_MAJOR_MAX_ROWS for rows, _, _ in taken)
        assert a.completion_ids == b.completion_ids
        assert max(float((x - y).abs().max()) for x, y in zip(a.logps, b.logps)) < 1e-5
    assert not any("forward" in m.__dict__ for m in model.modules())
    # one torch thread: x W^T measured as fast, so the engine leaves torch's linear
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    taken.clear()
    on.generate(prompts, SamplingParams(max_new_tokens=4, num_generations=2), seed=7)
    assert taken == []


def test_the_flag_reaches_the_engine():
    from denser.cli.flags import parse_run_args

    run = parse_run_args(["--objective", "grpo", "--model", "tiny", "--no-hf-cpu-decode-matmul"])
    assert run.engine.options.cpu_decode_matmul is False
