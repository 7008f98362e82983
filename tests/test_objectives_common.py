"""Shared objective pieces against hand-computed values: aggregation, KL estimators, advantages."""

import math

import pytest
import torch

from denser.objectives import PolicyBatch, aggregate, group_advantages, kl_estimate, normaliser_counts
from denser.objectives.common import linear_or_cosine, sequence_mean, token_keep_mask


def small_batch(**kw):
    # tokens:   v = 1 2 | 3 4 5 ;  token 3 (v=4) masked;  whole step: 5 tokens, 4 sequences
    base = dict(seq_ids=torch.tensor([0, 0, 1, 1, 1]), num_seqs=2, global_tokens=5.0, global_seqs=4.0,
                token_mask=torch.tensor([True, True, True, False, True]), norm_length=10.0)
    base.update(kw)
    return PolicyBatch(**base)


VALUES = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 3 + 5) / 5),                          # sum / global tokens
    ("seq-mean-token-mean", ((1 + 2) / 2 + (3 + 5) / 2) / 4),     # per-sequence means / global seqs
    ("seq-mean-token-sum", (1 + 2 + 3 + 5) / 4),                  # per-sequence sums / global seqs
    ("seq-mean-token-sum-norm", (1 + 2 + 3 + 5) / (4 * 10)),      # ... / (global seqs * norm_length)
])
def test_aggregate_hand_computed(mode, expected):
    assert aggregate(VALUES, small_batch(), mode).item() == pytest.approx(expected, rel=1e-6)


def test_aggregate_ignores_nan_on_masked_tokens_and_overrides_normalisers():
    values = VALUES.clone().requires_grad_()
    poisoned = torch.where(torch.arange(5) == 3, torch.tensor(float("nan")), values)
    out = aggregate(poisoned, small_batch(), "token-mean", global_tokens=11.0)
    assert out.item() == pytest.approx(11 / 11)
    out.backward()
    assert torch.isfinite(values.grad).all() and values.grad[3] == 0
    assert aggregate(VALUES, small_batch(), "seq-mean-token-sum", global_seqs=2.0).item() == pytest.approx(5.5)


def test_aggregate_empty_mask_gives_exact_zero_and_unknown_mode_fails():
    values = VALUES.clone().requires_grad_()
    out = aggregate(values, small_batch(global_tokens=0.0), "token-mean", mask=torch.zeros(5, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(VALUES, small_batch(), "mean")


def test_aggregate_separable_over_chunks():
    batch = small_batch()
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        whole = aggregate(VALUES, batch, mode)
        parts = sum(aggregate(VALUES[a:b], batch.token_slice(a, b), mode) for a, b in [(0, 1), (1, 3), (3, 5)])
        assert parts.item() == pytest.approx(whole.item(), rel=1e-6), mode


@pytest.mark.parametrize("logp, ref, k1, k2, k3", [
    (-1.0, -2.0, 1.0, 0.5, math.exp(-1.0)),                 # log r = -1: e^-1 - 1 + 1
    (-2.0, -1.0, -1.0, 0.5, math.e - 2.0),                  # log r = +1: e - 1 - 1
    (-0.5, -0.5, 0.0, 0.0, 0.0),
    (-3.0, -0.5, -2.5, 3.125, math.exp(2.5) - 1.0 - 2.5),
])
def test_kl_estimators_hand_computed(logp, ref, k1, k2, k3):
    lp, rp = torch.tensor([logp]), torch.tensor([ref])
    assert kl_estimate(lp, rp, "k1").item() == pytest.approx(k1, rel=1e-6, abs=1e-7)
    assert kl_estimate(lp, rp, "k2").item() == pytest.approx(k2, rel=1e-6, abs=1e-7)
    assert kl_estimate(lp, rp, "k3").item() == pytest.approx(k3, rel=1e-6, abs=1e-7)


def test_kl_estimator_gradients_and_unknown():
    lp = torch.tensor([-1.0], requires_grad=True)
    kl_estimate(lp, torch.tensor([-2.0]), "k3").backward()
    assert lp.grad.item() == pytest.approx(1.0 - math.exp(-1.0))  # d/dlogp [e^(ref-logp) - (ref-logp) - 1]
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(lp, lp, "k4")


REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0])


def test_group_advantages_std_normalised():
    adv = group_advantages(REWARDS, 4, eps=0.0)
    s = 0.5 / math.sqrt(1 / 3)  # group 1: mean 0.5, unbiased std sqrt(1/3)
    expected = [s, -s, -s, s, 0, 0, 0, 0, -0.5, -0.5, -0.5, 1.5]  # group 3: mean .75, std 1.5
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)


def test_group_advantages_unscaled_leave_one_out_and_batch():
    centred = group_advantages(REWARDS, 4, scale="none")
    assert torch.allclose(centred, torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0, -.75, -.75, -.75, 2.25]))
    loo = group_advantages(REWARDS, 4, scale=False, leave_one_out=True)
    # r_0 = 1 against the mean of the other three, (0 + 0 + 1) / 3
    assert loo[0].item() == pytest.approx(1 - 1 / 3) and loo[11].item() == pytest.approx(3.0)
    batch = group_advantages(REWARDS, 4, scale="batch", eps=0.0)
    assert torch.allclose(batch, centred / REWARDS.std())


def test_group_advantages_never_nan():
    assert torch.equal(group_advantages(torch.full((6,), 0.3), 3), torch.zeros(6))     # zero variance
    assert torch.equal(group_advantages(torch.tensor([0.1, 0.1, 0.1]), 3, leave_one_out=True), torch.zeros(3))
    assert torch.equal(group_advantages(torch.tensor([1.0, 5.0]), 1), torch.zeros(2))  # groups of one
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.ones(4), 2, scale="std")


def test_normaliser_counts_sum_over_micro_batches():
    a = small_batch(teacher_mask=torch.tensor([True, False]))
    assert normaliser_counts(a) == {"global_tokens": 4.0, "global_seqs": 2.0,
                                    "global_teacher_tokens": 2.0, "global_teacher_seqs": 1.0}
    # a sequence whose tokens are all masked still counts in the per-sequence normaliser (as TRL's mean)
    empty_seq = small_batch(token_mask=torch.tensor([False, False, True, True, True]))
    assert normaliser_counts(empty_seq)["global_seqs"] == 2.0 and normaliser_counts(empty_seq)["global_tokens"] == 3.0


def test_sequence_mean_uses_full_batch_lengths():
    batch = small_batch()
    means = sequence_mean(VALUES, batch)
    assert torch.allclose(means, torch.tensor([1.5, 1.5, 4.0, 4.0, 4.0]))
    chunk = batch.token_slice(2, 5)
    assert torch.allclose(sequence_mean(VALUES[2:], chunk), torch.tensor([4.0, 4.0, 4.0]))


def test_token_keep_mask_reproducible_and_distinct():
    batch = PolicyBatch(seq_ids=torch.zeros(4000, dtype=torch.long), num_seqs=1, global_tokens=1, global_seqs=1, step=3)
    m1, m2 = token_keep_mask(batch, 0.7, 5, "s"), token_keep_mask(batch, 0.7, 5, "s")
    assert torch.equal(m1, m2) and abs(m1.float().mean().item() - 0.7) < 0.03
    other_step = PolicyBatch(seq_ids=batch.seq_ids, num_seqs=1, global_tokens=1, global_seqs=1, step=4)
    other_micro = PolicyBatch(seq_ids=batch.seq_ids, num_seqs=1, global_tokens=1, global_seqs=1, step=3, micro_batch=1)
    for m in (token_keep_mask(other_step, 0.7, 5, "s"), token_keep_mask(other_micro, 0.7, 5, "s"),
              token_keep_mask(batch, 0.7, 6, "s"), token_keep_mask(batch, 0.7, 5, "t")):
        assert not torch.equal(m, m1)
    assert token_keep_mask(batch, 1.0, 0, "s").all()


def test_schedules():
    assert linear_or_cosine(1.0, None, 5, 10) == 1.0
    assert linear_or_cosine(1.0, 0.0, 0, 11) == 1.0
    assert linear_or_cosine(1.0, 0.0, 5, 11) == pytest.approx(0.5)
    assert linear_or_cosine(1.0, 0.0, 10, 11) == 0.0 and linear_or_cosine(1.0, 0.0, 50, 11) == 0.0
    assert linear_or_cosine(0.0, 1.0, 5, 11, "cosine") == pytest.approx(0.5)
    assert linear_or_cosine(0.0, 1.0, 2, 11, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi * 0.2)))


def test_policy_batch_chunk_of_per_token_advantages_is_not_read_as_sequences():
    # 8 tokens, 4 sequences, per-token advantages: a 4-token chunk must keep per-token reading
    batch = PolicyBatch(seq_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), num_seqs=4, global_tokens=8, global_seqs=4,
                        advantages=torch.arange(8.0))
    assert batch.token_level_advantages is True
    assert torch.equal(batch.token_slice(4, 8).token_advantages(), torch.arange(4.0, 8.0))
    per_seq = PolicyBatch(seq_ids=batch.seq_ids, num_seqs=4, global_tokens=8, global_seqs=4, advantages=torch.arange(4.0))
    assert torch.equal(per_seq.token_slice(3, 7).token_advantages(), torch.tensor([1.0, 2.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="one per sequence"):
        PolicyBatch(seq_ids=batch.seq_ids, num_seqs=4, global_tokens=8, global_seqs=4, advantages=torch.ones(5))


def test_seq_starts_survive_chunking():
    batch = small_batch()
    assert batch.seq_starts.tolist() == [True, False, True, False, False]
    assert batch.token_slice(1, 4).seq_starts.tolist() == [False, True, False]
