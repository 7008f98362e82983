"""The shared packing layout (--packing shared, the default): each distinct context computed once per
micro-batch, its completions after it in one row under a 4D mask, several segments per row, so no
prompt is computed twice and little padding is. Proved here against the padded layout (a row per
sample, the independent reference): hidden states and log-probs (sdpa and eager attention, fp32),
and the loss and gradients of every built-in objective's update, with the pre-update (old_logp),
reference and teacher forwards, micro-batches that split a group, LoRA and gradient checkpointing.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from denser.engines.packing import build_packed_batch, build_shared_batch, completion_hidden_states, completion_logprobs
from denser.objectives import Signal, get_objective, list_objectives
from denser.tasks import Score
from denser.tasks.builtin import Addition
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer
from denser.trainers.models import build_tiny_model
from denser.trainers.step_metrics import PhaseTimer


def _pairs(seed: int, prefix: int = 0):
    """Random contexts (four distinct, one of them again after another) and completions of varied lengths;
    with ``prefix``, every context begins with the same that many tokens (a chat template's system prompt)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randint(3, 200, (prefix,), generator=g).tolist()
    prompts = [common + torch.randint(3, 200, (n,), generator=g).tolist() for n in (7, 11, 4, 3)]
    if prefix:  # and two of them alike further on (an SDPO group's teacher contexts: the prompt, then each its own feedback)
        prompts[1][:prefix + 5] = prompts[0][:prefix + 5]
    contexts = [prompts[0]] * 3 + [prompts[1]] * 2 + [prompts[2], prompts[0], prompts[3]]
    completions = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 1, 9, 3, 4, 6, 2, 2)]
    return contexts, completions


def test_the_shared_layout_holds_each_context_once():
    contexts, completions = _pairs(0)
    b = build_shared_batch(contexts, completions, pad_token_id=0, sample_ids=[10 + i for i in range(8)])
    padded = build_packed_batch(contexts, completions, pad_token_id=0)
    for name in ("targets", "seq_ids", "lengths"):
        assert torch.equal(getattr(b, name), getattr(padded, name)), name
    assert b.sample_ids.tolist() == list(range(10, 18)) and b.layout == "shared" and padded.layout == "padded"
    # segments: 7 + 5+1+9+2 = 24 (the widest), 11 + 3+4 = 18, 4 + 6 = 10, 3 + 2 = 5; rows of 24, longest first,
    # each into the first row with room: [24], [18, 5], [10]
    assert b.input_ids.shape == (3, 24) and b.attention_mask.shape == (3, 1, 24, 24)
    assert int((b.input_ids != 0).sum()) == 7 + 11 + 4 + 3 + sum(map(len, completions))  # every token once
    assert b.input_ids[1, 18:23].tolist() == contexts[7] + completions[7] and b.position_ids[1, 18:23].tolist() == [
        0, 1, 2, 3, 4]
    assert not b.attention_mask[1, 0, 18:23, :18].any()  # the second segment of a row does not see the first
    flat, pos = b.input_ids.flatten(), b.position_ids.flatten()
    # each token is predicted by the previous token of its own sequence, one position before it
    prev = [c[-1] if j == 0 else y[j - 1] for c, y in zip(contexts, completions) for j in range(len(y))]
    prev_pos = [len(c) - 1 + j for c, y in zip(contexts, completions) for j in range(len(y))]
    assert flat[b.predict_index].tolist() == prev and pos[b.predict_index].tolist() == prev_pos
    assert b.predict_mask.flatten()[b.predict_index].all() and int(b.predict_mask.sum()) < b.num_tokens  # shared
    mask = b.attention_mask[:, 0]
    assert bool(mask.diagonal(dim1=1, dim2=2).all())  # no query row fully masked (padding sees itself)
    # sample 1 (token at the prompt's end + its own) sees the 7 prompt tokens and itself, nothing else
    s1 = int(b.predict_index[b.seq_ids == 1][0])
    first = int(b.predict_index[b.seq_ids == 2][1]) - 1  # sample 2's first token's flat index
    r, q = divmod(first, 24)
    assert mask[r, q].nonzero().squeeze(1).tolist() == list(range(7)) + [q]
    assert s1 == 6  # the prompt's last position predicts every first token of the group
    with pytest.raises(ValueError, match="layout must be one of"):
        build_packed_batch(contexts, completions, pad_token_id=0, layout="rows")


@pytest.mark.parametrize("impl,prefix", [("sdpa", 0), ("eager", 0), ("sdpa", 6), ("eager", 6)])
def test_hidden_states_logprobs_and_gradients_equal_the_padded_layout(impl, prefix):
    """With ``prefix``, the contexts' common prefix is held once per row and every segment's own context
    after it: one row here, where without it each segment starts a row of its own context."""
    model, _ = build_tiny_model(seed=1)
    model.config._attn_implementation = impl
    contexts, completions = _pairs(3, prefix)
    padded = build_packed_batch(contexts, completions, pad_token_id=0)
    shared = build_shared_batch(contexts, completions, pad_token_id=0)
    if prefix:  # one row: the prefix once, the 5 tokens two contexts share next once, each context's rest once
        distinct = list(dict.fromkeys(map(tuple, contexts)))
        assert shared.input_ids.shape == (1, prefix + 5 + sum(len(c) - prefix for c in distinct) - 2 * 5
                                          + sum(map(len, completions)))
    with torch.no_grad():
        h_pad, h_sh = completion_hidden_states(model, padded), completion_hidden_states(model, shared)
        torch.testing.assert_close(h_sh, h_pad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(completion_hidden_states(model, shared, via="forward"), h_pad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(completion_logprobs(model, shared, temperature=0.7),
                                   completion_logprobs(model, padded, temperature=0.7), rtol=1e-5, atol=1e-5)
        # the tolerance sees a wrong layout: plain causal rows (completions see each other), or the row's positions
        # (each completion after the first placed further from its context; rotary positions are relative)
        leaky = dataclasses.replace(shared, attention_mask=torch.ones_like(shared.attention_mask).tril())
        assert float((completion_hidden_states(model, leaky) - h_pad).abs().max()) > 1e-2
        shifted = dataclasses.replace(shared, position_ids=torch.arange(shared.input_ids.shape[1]).expand_as(shared.input_ids))
        assert float((completion_hidden_states(model, shifted) - h_pad).abs().max()) > 1e-2
    weights = torch.randn(h_pad.shape, generator=torch.Generator().manual_seed(0))
    grads = []
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for batch in (padded, shared):
        model.zero_grad(set_to_none=True)
        (completion_hidden_states(model, batch) * weights).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 5
    for name, g in grads[0].items():  # the same sums in another order: equal up to fp32 rounding of their largest terms
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name)


def test_an_attention_without_4d_masks_is_refused_with_the_fix():
    model, _ = build_tiny_model(seed=1)
    model.config._attn_implementation = "flash_attention_2"
    contexts, completions = _pairs(1)
    with pytest.raises(ValueError, match="--packing padded"):
        completion_hidden_states(model, build_shared_batch(contexts, completions, pad_token_id=0))
    with pytest.raises(ValueError, match="--packing must be one of"):
        TrainConfig(packing="rows")


# ------------------------------------------------------------------ every objective's update


class Parity(Addition):
    """Reward 1 for an even-length reply: the random tiny model's groups vary, so advantages are not 0."""

    def check(self, completion, row):
        ok = len(completion) % 2 == 0
        return Score(float(ok), None if ok else "The reply should have an even number of characters.", None)


def _update(trainer: Trainer, rollout, batch, packing: str):
    """The pre-update log-probs, the rollout's reference log-probs, and the update's loss and gradients
    with every forward in ``packing``'s layout."""
    cfg = dataclasses.replace(trainer.cfg, packing=packing)
    signals = trainer.signals
    signals.cfg = signals.batches.cfg = cfg
    rollout = signals.pre_update_logp(rollout)
    sample = signals.per_sample(rollout, batch.rows, batch.scores)
    indices = list(range(rollout.num_samples))
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, widths = 0.0, []
    for mb in signals.batches.micro_batches(rollout, sample, indices, step=0):
        assert mb.packed.layout == packing
        widths.append(int(mb.packed.input_ids.numel()))
        teacher = signals.model_signals(rollout, mb)
        out, _ = trainer.loss_module(mb.packed, trainer.objective, mb.batch, teacher, cfg.temperature, cfg.backend,
                                     cfg.chunk_size or None)
        out.backward()
        loss += float(out.detach())
    grads = {n: p.grad.detach().clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return dict(logps=rollout.logps, ref=sample.ref_logp, loss=loss, grads=grads, tokens=sum(widths),
                teachers=None if sample.teacher_mask is None else int(sample.teacher_mask.sum()))


# the built-in objectives (other test modules register objectives of their own while they run)
CASES = {name: {} for name, _, _ in list_objectives()
         if type(get_objective(name, **({"teacher_path": "tiny"} if name == "opd" else {}))).__module__
         .startswith("denser.objectives.")}
CASES["opd"] = dict(teacher_path="tiny")
CASES.update({
    "grpo-kl": dict(kl_coef=0.1),  # the reference model's forward
    "sdpo-checkpointing": dict(run=dict(gradient_checkpointing=True)),
    "grpo-kl-lora": dict(kl_coef=0.1, run=dict(lora_r=4, lr=1e-3)),  # the reference: the adapter disabled
    "sdpo-lora-ema": dict(teacher="ema", run=dict(lora_r=4)),
})


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_objective_updates_as_with_the_padded_layout(tmp_path, case):
    args = dict(CASES[case])
    run = args.pop("run", {})
    objective = get_objective(case.split("-")[0], **args)
    # micro-batches of 3 split the groups of 4; old_logp from a forward; seed 1: varied groups, sdpo teachers
    cfg = TrainConfig(objective=objective.name, model="tiny", steps=1, max_new_tokens=8, num_generations=4,
                      prompts_per_step=2, micro_batch_size=3, eval_size=1, progress=False, cpu=True, seed=1,
                      old_logp_source="forward", output_dir=str(tmp_path / "r"), **run)
    trainer = Trainer(cfg, objective, task=Parity(), log=lambda *a: None)
    batch = trainer._rollout_batch(0, PhaseTimer())
    ref = _update(trainer, batch.rollout, batch, "padded")
    new = _update(trainer, batch.rollout, batch, "shared")
    assert new["tokens"] < ref["tokens"]  # the point: fewer positions computed
    assert ref["teachers"] is None or ref["teachers"] > 0, "no sample has a teacher context: choose another seed"
    if Signal.OLD_LOGP in objective.signals():
        torch.testing.assert_close(torch.cat(new["logps"]), torch.cat(ref["logps"]), rtol=1e-5, atol=1e-5)
    if ref["ref"] is not None:
        torch.testing.assert_close(torch.cat(new["ref"]), torch.cat(ref["ref"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(new["loss"]), torch.tensor(ref["loss"]), rtol=1e-5, atol=1e-7)
    assert ref["grads"].keys() == new["grads"].keys() and len(ref["grads"]) > 5
    assert any(float(g.abs().sum()) > 0 for g in ref["grads"].values())
    for name, g in ref["grads"].items():  # the same sums in another order: equal up to fp32 rounding
        torch.testing.assert_close(new["grads"][name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DENSER_FSDP_TESTS"), reason="two DDP processes, ~2 min: DENSER_FSDP_TESTS=1")
def test_ddp_with_the_shared_layout_equals_one_process_with_the_padded_layout(tmp_path):
    """grpo and sdpo (EMA teacher), micro-batches of 3 splitting groups of 4: two DDP processes on the shared
    layout end each update where one process on the padded layout does (loss, gradient norm, weights)."""
    from test_fsdp import OBJECTIVES, PROMPTS, _flags, assert_equal_runs, launch, single

    launch([_flags(flags, tmp_path / name / "ddp", PROMPTS, "--packing", "shared") for name, flags in OBJECTIVES.items()])
    for name, flags in OBJECTIVES.items():
        single(_flags(flags, tmp_path / name / "one", 2 * PROMPTS, "--packing", "padded"))
        assert_equal_runs(tmp_path / name / "one", tmp_path / name / "ddp", what=f"{name} ddp shared vs padded")


# ------------------------------------------------------------------ generation: one prefill per prompt


def test_shared_prefill_samples_what_separate_prefills_sample():
    """--hf-share-prefill: each distinct prompt prefilled once (its cache copied to its samples), prompts of
    different lengths (left padding inside the shared prefill), generate calls that split a group: the same
    tokens and behaviour log-probs as every sample prefilling its own copy."""
    from denser.engines import EngineSpec, HFRolloutEngine, SamplingParams
    from denser.trainers.models import render_prompt

    model, tok = build_tiny_model(seed=2)
    prompts = [render_prompt(tok, q) for q in ("What is 2 + 3?", "Reverse 'cat'.")] + [[5, 6, 7]]
    params = SamplingParams(max_new_tokens=10, num_generations=4)
    rows: list[tuple[int, ...]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape)))
    try:
        for size in (0, 6):
            rows.clear()
            plain = HFRolloutEngine(model, tok, max_batch_size=size, share_prefill=False).generate(prompts, params,
                                                                                                  seed=4)
            first_plain = rows[0]
            rows.clear()
            shared = HFRolloutEngine(model, tok, max_batch_size=size, share_prefill=True).generate(prompts, params,
                                                                                                   seed=4)
            width = max(map(len, prompts))
            assert first_plain == (size or 12, width)
            if size:  # the first call's two prompts share 6 leading tokens: those once, then the rest of each once
                assert rows[:2] == [(1, 6), (2, width - 1 - 6)]
            else:  # no common prefix ([5, 6, 7]): each distinct prompt once
                assert rows[0] == (3, width - 1)
            assert shared.completion_ids == plain.completion_ids
            for a, b in zip(shared.logps, plain.logps):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        hook.remove()
    assert len({tuple(c) for c in plain.completion_ids}) > 6  # the samples of a prompt differ: seeded per sample
    assert EngineSpec.from_args("hf", {"share_prefill": True}).options.share_prefill


@pytest.mark.parametrize("sampled", [False, True])
def test_a_prefix_common_to_every_prompt_is_prefilled_once(sampled):
    """Prompts that begin alike (a chat template's system prompt, a one-shot example) and are otherwise
    distinct, as in an evaluation: with --hf-share-prefill the common prefix runs once, each prompt's rest
    once on a copy of its cache, padding between the two; greedy (an eval) and sampled with a repetition
    penalty (which must not count that padding), the same tokens and log-probs as plain left-padded calls."""
    from denser.engines import HFRolloutEngine, SamplingParams

    model, tok = build_tiny_model(seed=3)
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, 200, (9,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 200, (n,), generator=g).tolist() for n in (5, 1, 8, 3, 8)]
    params = (SamplingParams(max_new_tokens=8, num_generations=2, repetition_penalty=1.3) if sampled
              else SamplingParams(max_new_tokens=8, num_generations=1, do_sample=False))
    rows: list[tuple[int, ...]] = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape)))
    try:
        plain = HFRolloutEngine(model, tok, share_prefill=False).generate(prompts, params, seed=5)
        rows.clear()
        shared = HFRolloutEngine(model, tok, share_prefill=True).generate(prompts, params, seed=5)
    finally:
        hook.remove()
    assert rows[:2] == [(1, 9), (5, 8 - 1)]  # the prefix once; the rest of each prompt but its last token once
    assert shared.completion_ids == plain.completion_ids
    for a, b in zip(shared.logps, plain.logps):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len({tuple(c) for c in plain.completion_ids}) > 2


def test_the_repetition_penalty_counts_prompt_tokens_not_the_padding_between():
    """The penalty reads the prompt mask, so padding inside a prompt row (after a shared prefix) is not a
    token the prompt holds: CTRL's rule on exactly the prompt's and the completion's tokens."""
    from denser.engines.hf import _prompt_layout, _RepetitionPenalty

    pad = 0
    ids, mask = _prompt_layout([[4, 5, 6, 7], [4, 5, 9]], pad, common=2)
    assert ids.tolist() == [[4, 5, 6, 7], [4, 5, pad, 9]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 1]]
    seq = torch.cat([ids, torch.tensor([[3], [8]])], dim=1)  # one generated token each
    scores = torch.randn(2, 12).abs() + 0.5  # all positive: a penalised logit is divided
    scores[:, 9] = -1.0  # negative: multiplied
    out = _RepetitionPenalty(2.0, mask.bool())(seq, scores.clone())
    expect = scores.clone()
    for b, toks in enumerate([{4, 5, 6, 7, 3}, {4, 5, 9, 8}]):
        for t in toks:
            expect[b, t] = scores[b, t] / 2.0 if scores[b, t] > 0 else scores[b, t] * 2.0
    torch.testing.assert_close(out, expect)  # row 1's padding (token 0) is not penalised


def test_the_step_benchmark_of_one_group_is_the_same_step_in_either_layout():
    """`denser bench step --group`: one prompt for every completion; denser's step on the shared layout
    (the prompt and the teacher context once) gives the padded layout's loss and gradients."""
    import copy

    from denser.bench import step_case
    from denser.trainers.models import load_model
    from denser.trainers.teacher import TeacherWeights

    policy, tok = load_model("tiny", dtype=torch.float32)
    runs = []
    for packing in ("padded", "shared"):
        spec = step_case.Spec("denser-sdpo", 40, False, model="tiny", completion_len=6, prompt_len=9, teacher_extra=4,
                              seed=5, group=True, packing=packing)
        data = step_case._synthetic(spec, policy.get_output_embeddings().weight.shape[0])
        assert len({tuple(p) for p in data[0]}) == 1 and len({tuple(t) for t in data[1]}) == 1 and len(data[2]) == 7
        torch.manual_seed(0)
        p = copy.deepcopy(policy).train()
        teacher = TeacherWeights(p, "ema", 0.05)
        with torch.no_grad():  # a teacher unlike the student: the distillation term is not 0
            for q in teacher.model.parameters():
                q.add_(0.02 * torch.randn_like(q))
        loss = step_case._denser_step(spec, p, teacher, data, int(tok.pad_token_id))
        runs.append((loss, {n: q.grad.clone() for n, q in p.named_parameters() if q.grad is not None}))
    (loss, grads), (loss_s, grads_s) = runs
    assert loss != 0 and loss_s == pytest.approx(loss, rel=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_s[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name)
