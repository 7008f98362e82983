"""Rollouts on the tiny model: EOS handling, packing layout, behaviour log-probs, hidden states."""

from __future__ import annotations

import pytest
import torch

from denser.engines import (
    HFRolloutEngine,
    Rollout,
    SamplingParams,
    get_rollout_engine,
    list_rollout_engines,
    request_seed,
    truncate_at_stop,
)
from denser.engines.packing import build_packed_batch, completion_hidden_states, completion_logprobs, lm_head_params
from denser.trainers.models import build_tiny_model, render_prompt

QUESTIONS = ["What is 2 + 3?", "Reverse 'cat'.", "hi"]


def _eos_biased_model(eos_bias: float = 3.0, seed: int = 0):
    """The tiny model with a biased head, so EOS is sampled now and then (a random model
    almost never emits it): completions of mixed lengths, some truncated."""
    model, tok = build_tiny_model(seed=seed)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.05)
        head.bias.zero_()
        head.bias[tok.eos_token_id] = eos_bias
    model.lm_head = head
    return model, tok


@pytest.fixture(scope="module")
def tiny():
    return _eos_biased_model()


@pytest.fixture(scope="module")
def rollout(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    return HFRolloutEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=12, num_generations=4), seed=0)


def test_truncate_at_stop():
    assert truncate_at_stop([5, 6, 2, 7, 2], {2}) == ([5, 6, 2], False)
    assert truncate_at_stop([5, 6, 7], [2, 9]) == ([5, 6, 7], True)
    assert truncate_at_stop([9], [2, 9]) == ([9], False)


def test_rollout_shapes_and_eos(tiny, rollout):
    model, tok = tiny
    r = rollout
    eos = tok.eos_token_id
    assert isinstance(r, Rollout) and r.num_prompts == 3 and r.num_samples == 12 and r.num_generations == 4
    assert r.group_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert r.sample_prompt_ids(5) == r.prompt_ids[1]
    lengths = r.lengths
    assert (lengths >= 1).all() and (lengths <= 12).all()
    for ids, trunc, lp, text in zip(r.completion_ids, r.truncated.tolist(), r.logps, r.texts):
        assert len(lp) == len(ids) and lp.dtype == torch.float32 and (lp <= 0).all()
        assert eos not in ids[:-1]  # nothing after the first EOS
        if trunc:
            assert len(ids) == 12 and ids[-1] != eos
        else:
            assert ids[-1] == eos  # EOS kept as the last completion token
        assert text == tok.decode(ids, skip_special_tokens=True) and "<|im_end|>" not in text
    # the test model really exercises both cases
    assert r.truncated.any() and (~r.truncated).any() and len(set(lengths.tolist())) > 2


def test_seed_reproducible_and_global_rng_untouched(tiny, rollout):
    model, tok = tiny
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    state = torch.random.get_rng_state()
    again = HFRolloutEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=12, num_generations=4), seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    assert again.completion_ids == rollout.completion_ids
    assert all(torch.equal(a, b) for a, b in zip(again.logps, rollout.logps))


def test_a_prompts_samples_depend_on_its_seed_alone_not_on_the_batch(tiny):
    """docs/design.md, Contract 4: the same prompt with the same request seed draws the same completions
    whether it is generated with other prompts, alone, in another order, or cut into smaller
    generate calls (another number of processes, another --hf-max-batch-size)."""
    model, tok = tiny
    qs = QUESTIONS + ["Sort 3 1 2."]
    prompts = [render_prompt(tok, q) for q in qs]
    seeds = [request_seed(7, 2, 0, i) for i in range(4)]  # run seed 7, step 2, round 0, global index i
    params = SamplingParams(max_new_tokens=10, num_generations=3, temperature=0.9)
    whole = HFRolloutEngine(model, tok).generate(prompts, params, seeds=seeds)

    def per_prompt(r, order):
        g = params.num_generations
        return {p: r.completion_ids[k * g:(k + 1) * g] for k, p in enumerate(order)}, \
               {p: r.logps[k * g:(k + 1) * g] for k, p in enumerate(order)}

    want, want_lp = per_prompt(whole, range(4))
    assert len({tuple(c) for cs in want.values() for c in cs}) > 4  # really sampled, not all alike
    halves = [HFRolloutEngine(model, tok).generate(prompts[a:b], params, seeds=seeds[a:b]) for a, b in ((0, 2), (2, 4))]
    reordered = HFRolloutEngine(model, tok).generate([prompts[3], prompts[1]], params, seeds=[seeds[3], seeds[1]])
    chunked = HFRolloutEngine(model, tok, max_batch_size=2).generate(prompts, params, seeds=seeds)
    for r, order in [(halves[0], [0, 1]), (halves[1], [2, 3]), (reordered, [3, 1]), (chunked, range(4))]:
        got, got_lp = per_prompt(r, order)
        for p in order:
            assert got[p] == want[p], (p, order)
            for a, b in zip(got_lp[p], want_lp[p]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # another seed (another step, round or index) draws other completions
    other = HFRolloutEngine(model, tok).generate(prompts[:1], params, seeds=[request_seed(7, 2, 1, 0)])
    assert other.completion_ids != want[0]
    # seed=s is request_seed(s, position) per prompt
    by_position = HFRolloutEngine(model, tok).generate(prompts, params, seed=7)
    assert by_position.completion_ids == HFRolloutEngine(model, tok).generate(
        prompts, params, seeds=[request_seed(7, p) for p in range(4)]).completion_ids
    with pytest.raises(ValueError, match="3 seeds for 4 prompts"):
        HFRolloutEngine(model, tok).generate(prompts, params, seeds=seeds[:3])


def test_seeded_sampler_draws_from_the_warped_distribution():
    """The sampler's inverse-CDF draws follow softmax(scores) (a chi-square bound on 4000 draws per
    row), never pick a masked (-inf) token, and depend only on the row's own seed."""
    from denser.engines.hf import _SeededSampler

    scores = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), -1.0], [float("-inf"), 3.0, 0.0, 0.0, float("-inf")]])
    probs = torch.softmax(scores.double(), -1)
    n = 4000
    sampler = _SeededSampler([request_seed(1, b) for b in range(2)], max_new_tokens=n)
    counts = torch.zeros(2, 5, dtype=torch.float64)
    for _ in range(n):
        out = sampler(None, scores)
        assert (torch.isfinite(out).sum(-1) == 1).all()
        counts[torch.arange(2), out.argmax(-1)] += 1
    assert counts[0, 3] == 0 and counts[1, 0] == 0 and counts[1, 4] == 0
    expected = probs * n
    support = expected > 0
    chi2 = ((counts - expected)[support] ** 2 / expected[support]).sum()
    assert chi2 < 30, chi2  # 5 degrees of freedom: P(chi2 > 30) < 1e-4
    # row 1 alone, with its seed, draws its tokens exactly as beside row 0
    alone = _SeededSampler([request_seed(1, 1)], max_new_tokens=n)
    again = _SeededSampler([request_seed(1, b) for b in range(2)], max_new_tokens=n)
    for _ in range(50):
        assert alone(None, scores[1:]).argmax(-1) == again(None, scores)[1:].argmax(-1)


def test_request_seeds_are_stable_and_distinct():
    assert request_seed(0, 1, 0, 2) == request_seed(0, 1, 0, 2)
    keys = [(0, s, r, i) for s in range(5) for r in range(3) for i in range(8)] + [(0, i) for i in range(8)]
    assert len({request_seed(*k) for k in keys}) == len(keys)
    assert 0 <= request_seed(-5, 2**40) < 2**63
    # pinned: a change of the function changes every run's samples (and breaks --resume of older runs)
    assert request_seed(0, 0, 0, 0) == 7974950579062360516


def test_pack_layout(rollout):
    idx = [7, 0, 3]
    b = rollout.pack(idx)
    lengths = [len(rollout.completion_ids[i]) for i in idx]
    C = max(len(rollout.sample_prompt_ids(i)) for i in idx)
    assert b.context_width == C and b.input_ids.shape == (3, C + max(lengths))
    assert b.sample_ids.tolist() == idx and b.lengths.tolist() == lengths
    assert b.targets.tolist() == [t for i in idx for t in rollout.completion_ids[i]]
    assert b.seq_ids.tolist() == [row for row, n in enumerate(lengths) for _ in range(n)]
    assert torch.equal(b.old_logp, torch.cat([rollout.logps[i] for i in idx]))
    assert int(b.predict_mask.sum()) == b.num_tokens == sum(lengths) and b.num_seqs == 3
    for row, i in enumerate(idx):
        p, c = rollout.sample_prompt_ids(i), rollout.completion_ids[i]
        assert b.input_ids[row, C - len(p):C].tolist() == p  # prompt left-padded
        assert b.input_ids[row, C:C + len(c)].tolist() == c  # completion right after it
        assert b.attention_mask[row].tolist() == [0] * (C - len(p)) + [1] * (len(p) + len(c)) + [0] * (
            b.input_ids.shape[1] - C - len(c))
        assert b.position_ids[row, C - len(p):C + len(c)].tolist() == list(range(len(p) + len(c)))
        cols = b.predict_mask[row].nonzero().squeeze(1)
        assert cols.tolist() == list(range(C - 1, C - 1 + len(c)))
        # the token after each predicting position is the target it predicts
        assert b.input_ids[row, cols + 1].tolist() == c
    # row-major order of the mask == packed order of the targets
    shifted = torch.zeros_like(b.predict_mask)
    shifted[:, 1:] = b.predict_mask[:, :-1]
    assert b.input_ids[shifted].tolist() == b.targets.tolist()


def test_pack_with_other_contexts_keeps_the_token_layout(rollout):
    idx = [1, 2, 9]
    student = rollout.pack(idx)
    contexts = [[1, 5, 6], list(range(3, 40)), [7]]
    teacher = rollout.pack(idx, contexts=contexts)
    assert torch.equal(teacher.targets, student.targets) and torch.equal(teacher.seq_ids, student.seq_ids)
    assert teacher.context_width == 37
    cut = rollout.pack(idx, contexts=contexts, max_context_len=5)
    assert cut.context_width == 5 and cut.input_ids[1, :5].tolist() == contexts[1][-5:]
    assert torch.equal(cut.targets, student.targets)
    with pytest.raises(ValueError, match="contexts"):
        rollout.pack(idx, contexts=contexts[:2])
    with pytest.raises(ValueError, match="empty context"):
        build_packed_batch([[]], [[1]], pad_token_id=0)
    with pytest.raises(ValueError, match="empty completion"):
        build_packed_batch([[1]], [[]], pad_token_id=0)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_behaviour_logp_matches_forward(tiny, temperature, top_k, top_p):
    """old_logp recorded inside generate (KV cache, left padding) == a fresh forward pass over
    prompt + completion at the same temperature, over the full vocabulary (top-k/top-p only
    shape the sampler)."""
    model, tok = tiny
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=10, num_generations=3, temperature=temperature, top_k=top_k, top_p=top_p)
    r = HFRolloutEngine(model, tok).generate(prompts, params, seed=1)
    batch = r.pack()
    with torch.no_grad():
        ref = completion_logprobs(model, batch, temperature=temperature)
    torch.testing.assert_close(batch.old_logp, ref, atol=1e-4, rtol=1e-4)


def test_checkpoint_generation_config_does_not_leak_into_sampling(tiny):
    """A model's generation_config (top_k, repetition penalty, ...) must not alter the
    distribution the engine samples from and records."""
    model, tok = tiny
    saved = model.generation_config
    cfg = saved.__class__.from_dict(saved.to_dict())
    cfg.top_k, cfg.repetition_penalty, cfg.temperature, cfg.do_sample = 1, 5.0, 0.01, True
    model.generation_config = cfg
    try:
        prompts = [render_prompt(tok, "hi")]
        r = HFRolloutEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=8, num_generations=6), seed=2)
        assert model.generation_config is cfg  # restored after the call
        with torch.no_grad():
            torch.testing.assert_close(r.pack().old_logp, completion_logprobs(model, r.pack()), atol=1e-4, rtol=1e-4)
        assert len({tuple(c) for c in r.completion_ids}) > 1  # top_k=1 would make all six identical
    finally:
        model.generation_config = saved


def test_greedy_and_chunked_generation(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    engine = get_rollout_engine("hf", model, tok, max_batch_size=2)
    assert "hf" in list_rollout_engines()
    r = engine.generate(prompts, SamplingParams(max_new_tokens=6, num_generations=2, do_sample=False))
    assert r.num_samples == 6
    for g in range(3):  # greedy: both samples of a prompt agree
        assert r.completion_ids[2 * g] == r.completion_ids[2 * g + 1]
    with torch.no_grad():
        torch.testing.assert_close(r.pack().old_logp, completion_logprobs(model, r.pack()), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown rollout engine"):
        get_rollout_engine("no-such-engine", model, tok)  # vllm is registered now


def test_sampling_params_validation():
    for bad in (dict(max_new_tokens=0), dict(num_generations=0), dict(temperature=0.0), dict(top_p=0.0),
                dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


@pytest.mark.parametrize("via", ["decoder", "forward"])
def test_hidden_states_feed_lm_head(tiny, rollout, via):
    """lm_head(h) gathered at the targets == log-softmax of the full forward logits, for the
    student's prompts and for other (teacher) contexts with the same completion tokens."""
    model, _ = tiny
    weight, bias = lm_head_params(model)
    assert weight is model.lm_head.weight and bias is model.lm_head.bias
    idx = list(range(rollout.num_samples))
    contexts = [[1] + rollout.sample_prompt_ids(i)[-(3 + i):] for i in idx]  # varied teacher-like contexts
    for batch in (rollout.pack(idx), rollout.pack(idx, contexts=contexts)):
        with torch.no_grad():
            h = completion_hidden_states(model, batch, via=via)
            assert h.shape == (batch.num_tokens, model.config.hidden_size)
            logp = torch.log_softmax((h @ weight.T + bias) / 0.8, -1).gather(1, batch.targets[:, None]).squeeze(1)
            torch.testing.assert_close(logp, completion_logprobs(model, batch, temperature=0.8), atol=1e-5, rtol=1e-5)


def test_hidden_states_are_differentiable_and_finite(tiny, rollout):
    model, _ = tiny
    model.zero_grad()
    batch = rollout.pack([0, 5, 11])
    h = completion_hidden_states(model, batch)
    assert h.requires_grad
    logits = h @ model.lm_head.weight.T
    loss = torch.nn.functional.cross_entropy(logits, batch.targets)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_pad_equal_to_eos_is_fine():
    """SmolLM2 pads with its EOS id; lengths must still come from the first EOS, not from padding."""
    model, tok = _eos_biased_model(eos_bias=2.5, seed=3)
    tok.pad_token = tok.eos_token
    engine = HFRolloutEngine(model, tok)
    assert engine.pad_token_id == tok.eos_token_id
    prompts = [render_prompt(tok, q) for q in QUESTIONS]
    r = engine.generate(prompts, SamplingParams(max_new_tokens=10, num_generations=3), seed=4)
    for ids, trunc in zip(r.completion_ids, r.truncated.tolist()):
        assert (ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id) != trunc
    with torch.no_grad():
        torch.testing.assert_close(r.pack().old_logp, completion_logprobs(model, r.pack()), atol=1e-4, rtol=1e-4)
