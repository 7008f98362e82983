"""`denser bench loop`'s arithmetic per phase (bench/loop.py: step_flops) against torch's own FLOP counter,
and the machine's matmul rate it prints beside it."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from denser.bench import loop
from denser.engines.packing import build_packed_batch, completion_hidden_states
from denser.trainers.models import build_tiny_model


def _shape(model, prompt_tokens: float) -> dict:
    c = model.config
    blocks = sum(p.numel() for n, p in model.get_decoder().named_parameters() if p.dim() == 2 and "embed" not in n)
    return {"block_params": blocks, "layers": c.num_hidden_layers, "hidden": c.hidden_size, "vocab": c.vocab_size,
            "attn_width": c.num_attention_heads * (c.hidden_size // c.num_attention_heads),
            "prompt_tokens": prompt_tokens}


def test_forward_flops_are_what_torch_counts():
    """One group (a prompt and G completions, no padding anywhere: one sample per row, every row full):
    the linear layers' FLOPs are the counter's matrix products; the attention term is the causal half of
    the dense products the counter sees for a single sequence."""
    model, _ = build_tiny_model(seed=0)
    model.config._attn_implementation = "eager"  # its attention is two batched products the counter sees
    p, c = 9, 5
    batch = build_packed_batch([[7] * p], [[8] * c], pad_token_id=0)  # one row, no padding
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        completion_hidden_states(model, batch)
    counts = counter.get_flop_counts()["Global"]
    linear = sum(v for k, v in counts.items() if "mm" in str(k) and "bmm" not in str(k))
    attention = sum(v for k, v in counts.items() if "bmm" in str(k))
    shape = _shape(model, p)
    attention_part = loop._forward(shape, p, c, 1) - 2 * shape["block_params"] * (p + c)
    assert linear == 2 * shape["block_params"] * (p + c)
    L = p + c  # the counter's dense [L, L] products: the causal half plus the diagonal is what a query needs
    assert attention == 4 * shape["layers"] * shape["attn_width"] * L * L
    assert attention_part == 4 * shape["layers"] * shape["attn_width"] * L * (L + 1) / 2
    # G completions after one prompt: the prompt once, each completion attends to it and to itself
    assert loop._forward(shape, p, c, 3) == 2 * shape["block_params"] * (p + 3 * c) + 4 * shape["layers"] * shape[
        "attn_width"] * (p * (p + 1) / 2 + 3 * (c * p + c * (c + 1) / 2))


def test_step_flops_per_phase():
    model, _ = build_tiny_model(seed=0)
    shape = _shape(model, 20)
    cfg = {"prompts_per_step": 2, "num_generations": 4}
    grpo = loop.step_flops(shape, cfg, 6.0, teacher=False, reference=False, old_logp=False)
    group = loop._forward(shape, 20, 6.0, 4)
    head = 2 * shape["hidden"] * shape["vocab"] * 2 * 4 * 6.0
    assert grpo == {"generate": 2 * group + head, "signals": 0, "update": 3 * (2 * group + head)}
    kl = loop.step_flops(shape, cfg, 6.0, teacher=False, reference=True, old_logp=True)
    assert kl["signals"] == 2 * (2 * group + head)
    sdpo = loop.step_flops(shape, cfg, 6.0, teacher=True, reference=False, old_logp=False)
    assert sdpo["signals"] > 2 * group  # teacher contexts are longer than prompts


def test_matmul_rate_is_a_rate():
    fp32 = loop.matmul_rate(torch.float32, m=64, k=32, n=48, seconds=0.05)
    assert 1e6 < fp32 < 1e15


def test_a_prefix_every_prompt_shares_is_counted_once_as_the_shared_layout_computes_it():
    """Two groups whose prompts begin with the same K tokens: the shared layout's forward runs the linear
    layers on K + 2 (p - K) + 2 G c positions (torch's counter), which is what step_flops counts per
    forward with ``common_prefix_tokens`` K: (P - 1) K positions fewer than each prompt whole."""
    from denser.engines.packing import build_shared_batch

    model, _ = build_tiny_model(seed=0)
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(1)
    K, p, c, G, P = 7, 12, 5, 3, 2
    prefix = torch.randint(3, 200, (K,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 200, (p - K,), generator=g).tolist() for _ in range(P)]
    completions = [torch.randint(3, 200, (c,), generator=g).tolist() for _ in range(P * G)]
    batch = build_shared_batch([q for q in prompts for _ in range(G)], completions, pad_token_id=0)
    assert batch.input_ids.shape == (1, K + P * (p - K) + P * G * c)  # one row, no padding
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        completion_hidden_states(model, batch)
    linear = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "mm" in str(k) and "bmm" not in str(k))
    shape = _shape(model, p)
    assert linear == 2 * shape["block_params"] * (K + P * (p - K) + P * G * c)
    cfg = {"prompts_per_step": P, "num_generations": G}
    whole = loop.step_flops(shape, cfg, float(c), teacher=False, reference=True, old_logp=False)
    shared = loop.step_flops({**shape, "common_prefix_tokens": K}, cfg, float(c), teacher=False, reference=True,
                             old_logp=False)
    saved = 2 * shape["block_params"] * (P - 1) * K
    assert whole["update"] - shared["update"] == 3 * saved and whole["signals"] - shared["signals"] == saved
    assert whole["generate"] - shared["generate"] == saved
