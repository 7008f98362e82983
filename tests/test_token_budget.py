"""Token-budget micro-batches (--max-tokens-per-micro-batch): how samples are cut, and that the update's
loss and gradients are those of the count-based micro-batches (the normalisers are the mini-batch's)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from denser.engines.base import Rollout, SamplingParams
from denser.objectives import get_objective
from denser.tasks import Score
from denser.tasks.builtin import Addition
from denser.trainers.batches import UpdateBatches, split_to_count, token_budget_groups
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer
from denser.trainers.step_metrics import PhaseTimer


class Parity(Addition):
    """Reward 1 for an even-length reply: the random tiny model's groups vary, so advantages are not 0."""

    def check(self, completion, row):
        ok = len(completion) % 2 == 0
        return Score(float(ok), None if ok else "The reply should have an even number of characters.", None)


def _forward_tokens(sizes):
    """Rows x padded width of one packed forward, written out: left-padded contexts, right-padded completions."""
    width = max(c for c, _ in sizes) + max(t for _, t in sizes)
    return sum(width for _ in sizes)


def test_token_budget_groups_keep_order_and_budget():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        indices = rng.sample(range(100), n)
        sizes = [(rng.randint(1, 30), rng.randint(1, 40)) for _ in range(n)]
        budget = rng.randint(1, 200)
        groups = token_budget_groups(indices, sizes, budget)
        assert [i for g in groups for i in g] == indices  # every sample once, in order
        size = dict(zip(indices, sizes))
        for k, g in enumerate(groups):
            assert _forward_tokens([size[i] for i in g]) <= budget or len(g) == 1  # over budget only alone
            if k + 1 < len(groups):  # greedy: the next sample did not fit
                assert _forward_tokens([size[i] for i in g + [groups[k + 1][0]]]) > budget
    assert token_budget_groups([3, 4, 5], [(5, 5), (50, 50), (5, 5)], 50) == [[3], [4], [5]]  # the long one alone
    assert token_budget_groups([3, 4, 5], [(5, 5), (5, 10), (1, 1)], 45) == [[3, 4, 5]]  # 3 x (5 + 10)
    assert token_budget_groups([3, 4, 5], [(5, 5), (5, 10), (1, 1)], 44) == [[3, 4], [5]]


def test_split_to_count_halves_the_largest_groups():
    sizes = {0: (5, 1), 1: (5, 1), 2: (30, 1), 3: (30, 1), 4: (1, 1)}
    out = split_to_count([[0, 1], [2, 3, 4]], sizes, 4)
    assert out == [[0, 1], [2], [3], [4]]  # [2, 3, 4] (93) -> [2] + [3, 4] (62) -> [3] + [4]; [0, 1] is 12
    assert split_to_count([[0, 1]], sizes, 1) == [[0, 1]]


def test_the_flag_is_checked():
    with pytest.raises(ValueError, match="--max-tokens-per-micro-batch must be >= 0"):
        TrainConfig(max_tokens_per_micro_batch=-1)


def _grads(trainer: Trainer, rollout, sample, indices, budget: int):
    """The update's loss and gradients over micro-batches cut by ``budget`` (0 = --micro-batch-size)."""
    signals = trainer.signals
    trainer.batches.cfg = dataclasses.replace(trainer.batches.cfg, max_tokens_per_micro_batch=budget)
    batches = trainer.batches.micro_batches(rollout, sample, indices, step=0)
    trainer.optimizer.zero_grad(set_to_none=True)
    cfg, total = trainer.cfg, 0.0
    for mb in batches:
        teacher = signals.model_signals(rollout, mb)
        loss, _ = trainer.loss_module(mb.packed, trainer.objective, mb.batch, teacher, cfg.temperature,
                                      cfg.backend, cfg.chunk_size or None)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.detach().clone() for n, p in trainer.policy.named_parameters() if p.grad is not None}
    trainer.optimizer.zero_grad(set_to_none=True)
    return total, grads, batches


@pytest.mark.parametrize("objective", ["grpo", "sdpo"])
def test_token_budget_gives_the_loss_and_gradients_of_count_micro_batches(tmp_path, objective):
    cfg = TrainConfig(objective=objective, model="tiny", steps=1, max_new_tokens=8, num_generations=4,
                      prompts_per_step=2, micro_batch_size=8, eval_size=1, progress=False,
                      output_dir=str(tmp_path / "r"), cpu=True, seed=1)  # seed 1: groups vary, sdpo finds teachers
    trainer = Trainer(cfg, get_objective(objective), task=Parity(), log=lambda *a: None)
    batch = trainer._rollout_batch(0, PhaseTimer())
    rollout = trainer.signals.pre_update_logp(batch.rollout)
    sample = trainer.signals.per_sample(rollout, batch.rows, batch.scores)
    if objective == "sdpo":
        assert bool(sample.teacher_mask.any()), "no sample has a teacher: choose another seed"
    else:
        assert float(sample.advantages.abs().sum()) > 0, "every group uniform: choose another seed"
    indices = list(range(rollout.num_samples))
    loss, grads, whole = _grads(trainer, rollout, sample, indices, 0)
    assert len(whole) == 1
    widest = max(len(rollout.sample_prompt_ids(i)) + len(rollout.completion_ids[i]) for i in indices)
    budget = 2 * widest  # two samples or more per micro-batch
    loss_b, grads_b, cut = _grads(trainer, rollout, sample, indices, budget)
    assert 2 <= len(cut) <= 4 and all(int(mb.packed.input_ids.numel()) <= budget for mb in cut)
    assert [i for mb in cut for i in mb.indices] == indices
    torch.testing.assert_close(torch.tensor(loss_b), torch.tensor(loss), rtol=1e-5, atol=1e-7)
    assert grads.keys() == grads_b.keys() and len(grads) > 5
    assert any(float(g.abs().sum()) > 0 for g in grads.values())
    for name in grads:  # the same sum, in another order: equal up to fp32 rounding
        torch.testing.assert_close(grads_b[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)
    loss_1, grads_1, single = _grads(trainer, rollout, sample, indices, 1)  # every sample over the budget: alone
    assert len(single) == len(indices)
    torch.testing.assert_close(torch.tensor(loss_1), torch.tensor(loss), rtol=1e-5, atol=1e-7)
    for name in grads:
        torch.testing.assert_close(grads_1[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_processes_agree_on_the_number_of_micro_batches():
    """Every backward synchronises gradients under DDP: a process with fewer token-budget micro-batches
    than another halves its largest ones until the counts agree (the all-reduce is faked here)."""
    cfg = TrainConfig(model="tiny", prompts_per_step=2, num_generations=4, max_tokens_per_micro_batch=1000)
    lengths = [3, 5, 4, 6, 2, 7, 3, 5]
    rollout = Rollout(prompt_ids=[[1] * 4, [2] * 6], completion_ids=[[9] * n for n in lengths], texts=[""] * 8,
                      logps=[torch.zeros(n) for n in lengths], truncated=torch.zeros(8, dtype=torch.bool),
                      num_generations=4, params=SamplingParams(max_new_tokens=8), pad_token_id=0)
    seen = []

    def reduce_with_a_peer(t):  # this process: 1 micro-batch (everything fits); the peer: 5
        seen.append(t.clone())
        peer = torch.zeros_like(t)
        peer[5] = 1.0
        return t + peer

    batches = UpdateBatches(cfg, device=torch.device("cpu"), rank=0, reduce=reduce_with_a_peer, old_logp=False)
    groups = batches.groups(rollout, list(range(8)))
    assert len(seen) == 1 and seen[0].shape == (2 * 4 + 1,) and int(seen[0].argmax()) == 1
    assert len(groups) == 5 and [i for g in groups for i in g] == list(range(8))
    assert batches.groups(rollout, list(range(8)), same_count=False) == [list(range(8))]
    alone = UpdateBatches(cfg, device=torch.device("cpu"), rank=0, reduce=lambda t: t, old_logp=False)
    assert alone.groups(rollout, list(range(8))) == [list(range(8))]
