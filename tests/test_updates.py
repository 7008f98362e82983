"""Several optimiser updates per rollout batch (--mini-batches K, --epochs E; docs/design.md, Contract 3).

What is proved here: K = E = 1 is the run it always was (bit for bit); with K * E > 1 every update's
gradient is the one an independent implementation computes (old_logp from the pre-update policy's
forward, loss normalisers of the update's own mini-batch, the mini-batches of the plan), the ratios
leave 1 and the clips act; the objective's old_logp switch resolves from the run; random token masks
differ between updates; the IS weight and its clip on a hand-built case.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from denser.engines.packing import completion_logprobs
from denser.kernels import TokenStats
from denser.objectives import Objective, PolicyBatch, Signal, get_objective, register_objective, unregister_objective
from denser.objectives.common import token_keep_mask
from denser.tasks import Score
from denser.tasks.builtin import Addition
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer


class Parity(Addition):
    """Reward 1 for an even-length reply: the random tiny model's groups vary, so advantages are not 0."""

    def check(self, completion, row):
        ok = len(completion) % 2 == 0
        return Score(float(ok), None if ok else "The reply should have an even number of characters.", None)


RUN = dict(model="tiny", max_new_tokens=6, num_generations=4, prompts_per_step=2, micro_batch_size=3, eval_size=1,
           progress=False, temperature=1.0, seed=3)  # seed 3: both groups of step 1 have varied rewards


def _rows(run) -> list[dict]:
    timing = ("time_generate_s", "time_signals_s", "time_update_s", "step_time_s", "tokens_per_s")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in timing} for r in rows]


def _final(run, steps):
    return load_file(str(run / "checkpoints" / f"step-{steps:06d}" / "model" / "model.safetensors"))


# ------------------------------------------------------------------------ one update: as before


@pytest.mark.slow
@pytest.mark.parametrize("objective, extra", [
    ("grpo", {}),
    ("sdpo", dict(objective_args=dict(mask_ratio=0.3, use_old_logp=True, distill_mode="full"))),
])
def test_one_update_per_rollout_batch_is_the_run_without_the_flags(tmp_path, objective, extra):
    """--mini-batches 1 --epochs 1 (and --old-logp-source auto) writes the same metrics and weights, bit for bit,
    as a run that never mentions them (main's run: compared against main by hand, see the report)."""
    args = extra.get("objective_args", {})
    runs = {}
    for name, flags in (("absent", {}), ("explicit", dict(mini_batches=1, epochs=1, shuffle_mini_batches=True))):
        out = tmp_path / name
        cfg = TrainConfig(objective=objective, steps=2, lr=3e-3, output_dir=str(out), **RUN, **flags)
        Trainer(cfg, get_objective(objective, **args), task=Parity(), log=lambda *a: None).train()
        runs[name] = out
    assert _rows(runs["absent"]) == _rows(runs["explicit"])
    assert all(r["updates"] == 1 and r["skipped"] == 0 for r in _rows(runs["absent"]) if "loss" in r)
    a, b = _final(runs["absent"], 2), _final(runs["explicit"], 2)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------- an independent reference per update


def _hand_advantages(rewards: torch.Tensor, g: int) -> torch.Tensor:
    """GRPO's group advantages written out: (r - group mean) / (unbiased group std + 1e-6), 0 for equal groups."""
    out = torch.zeros_like(rewards)
    for p in range(rewards.numel() // g):
        r = rewards[p * g:(p + 1) * g]
        if r.max() != r.min():
            out[p * g:(p + 1) * g] = (r - r.mean()) / (r.std() + 1e-6)
    return out


def _hand_grpo_loss(logp, old_logp, adv, clip=0.2, c=3.0):
    """PPO-clip with dual clip, token-mean over the given tokens (the update's mini-batch)."""
    ratio = torch.exp(logp - old_logp)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip))
    per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * c), per_token)
    return per_token.sum() / per_token.numel()


@pytest.mark.slow
@pytest.mark.parametrize("shuffle, source", [(False, "auto"), (True, "auto"), (False, "engine")])
def test_every_update_matches_an_independent_reference(tmp_path, shuffle, source):
    """K=2, E=2 on the tiny model: the gradient of each of the 4 updates equals the gradient of the plain
    formula (full logits, hand advantages) at that update's weights, with old_logp the initial policy's
    (forward) or the engine's sampling log-probs, normalised over the update's own mini-batch."""
    cfg = TrainConfig(objective="grpo", steps=1, lr=2e-2, max_grad_norm=0.0, mini_batches=2, epochs=2,
                      shuffle_mini_batches=shuffle, old_logp_source=source, output_dir=str(tmp_path / "r"), **RUN)
    trainer = Trainer(cfg, task=Parity(), log=lambda *a: None)
    assert trainer.objective.use_old_logp and Signal.OLD_LOGP in trainer.objective.signals()
    initial = copy.deepcopy(trainer.policy).eval()
    seen: dict = {"updates": []}
    real_rollout, real_step = trainer._rollout, trainer.optimizer.step

    def record_rollout(rows, seeds=None):  # the engine's log-probs, made clearly different from the policy's own
        rollout = real_rollout(rows, seeds)
        g = torch.Generator().manual_seed(3)
        seen["rollout"] = dataclasses.replace(rollout, logps=[lp + 0.3 * torch.randn(lp.shape, generator=g)
                                                              for lp in rollout.logps])
        return seen["rollout"]

    def record_step(*a, **k):
        seen["updates"].append(({n: p.detach().clone() for n, p in trainer.policy.named_parameters()},
                                {n: p.grad.detach().clone() for n, p in trainer.policy.named_parameters()}))
        return real_step(*a, **k)

    trainer._rollout, trainer.optimizer.step = record_rollout, record_step
    row = trainer.step(0)
    assert row["updates"] == 4 and row["skipped"] == 0 and len(seen["updates"]) == 4

    rollout = seen["rollout"]
    S = rollout.num_samples
    rewards = torch.tensor([float(len(t) % 2 == 0) for t in rollout.texts])
    adv = _hand_advantages(rewards, 4)
    assert adv.abs().sum() > 0, "every group uniform: choose another seed"
    everything = rollout.pack(list(range(S)))
    with torch.no_grad():
        forward = completion_logprobs(initial, everything)
    assert (forward - rollout.behaviour_logp()).abs().mean() > 0.1  # the two sources differ here
    old = rollout.behaviour_logp() if source == "engine" else forward
    if shuffle:
        plan = trainer.batches.update_plan(S, 0)
        for e in range(2):  # each epoch is a permutation of the rollout, cut into near-equal halves
            assert sorted(plan[2 * e] + plan[2 * e + 1]) == list(range(S)) and len(plan[2 * e]) == S // 2
        assert plan[:2] != plan[2:] and plan[0] != list(range(S // 2))
    else:
        plan = [list(range(S // 2)), list(range(S // 2, S))] * 2
    model = copy.deepcopy(initial).train()
    for u, (params, grads) in enumerate(seen["updates"]):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
        model.zero_grad()
        idx = plan[u]
        packed = rollout.pack(idx)
        logp = completion_logprobs(model, packed)
        old_u = torch.cat([old[everything.seq_ids == i] for i in idx])
        adv_u = adv[idx][packed.seq_ids]
        _hand_grpo_loss(logp, old_u, adv_u).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=2e-4, atol=2e-6, msg=f"update {u}, {n}")
    assert not torch.equal(seen["updates"][0][0]["lm_head.weight"], seen["updates"][3][0]["lm_head.weight"])


def test_one_update_matches_the_independent_reference(tmp_path):
    """The stored expectation for K = E = 1, computed by the same plain path: ratio 1, one update over all."""
    cfg = TrainConfig(objective="grpo", steps=1, lr=2e-2, max_grad_norm=0.0, output_dir=str(tmp_path / "r"), **RUN)
    trainer = Trainer(cfg, task=Parity(), log=lambda *a: None)
    assert not trainer.objective.use_old_logp
    initial = copy.deepcopy(trainer.policy).train()
    seen = {}
    real_rollout, real_step = trainer._rollout, trainer.optimizer.step
    trainer._rollout = lambda rows, seeds=None: seen.setdefault("rollout", real_rollout(rows, seeds))
    trainer.optimizer.step = lambda *a, **k: (seen.setdefault(
        "grads", {n: p.grad.clone() for n, p in trainer.policy.named_parameters()}), real_step(*a, **k))[1]
    assert trainer.step(0)["updates"] == 1
    rollout = seen["rollout"]
    rewards = torch.tensor([float(len(t) % 2 == 0) for t in rollout.texts])
    packed = rollout.pack(list(range(rollout.num_samples)))
    logp = completion_logprobs(initial, packed)
    _hand_grpo_loss(logp, logp.detach(), _hand_advantages(rewards, 4)[packed.seq_ids]).backward()
    for n, p in initial.named_parameters():
        torch.testing.assert_close(seen["grads"][n], p.grad, rtol=2e-4, atol=2e-6, msg=n)


# --------------------------------------------------------------------- ratios move, clips act


@pytest.mark.slow
@pytest.mark.parametrize("objective, metrics", [
    ("grpo", ("clip_frac_low", "clip_frac_high")),
    ("sdpo", ("is_clip_frac",)),
])
def test_several_updates_move_the_ratios_and_the_clips_act(tmp_path, objective, metrics):
    """A large learning rate and 4 updates per rollout batch: ratios leave 1 and the clip fractions are
    non-zero (with one update they are 1 and 0)."""
    args = dict(is_clip=1.05, distill_mode="full", teacher="live") if objective == "sdpo" else {}
    cfg = TrainConfig(objective=objective, steps=1, lr=5e-2, mini_batches=4, epochs=1,
                      output_dir=str(tmp_path / "r"), **RUN)
    trainer = Trainer(cfg, get_objective(objective, **args), task=Parity(), log=lambda *a: None)
    row = trainer.step(0)
    assert row["updates"] == 4 and row["skipped"] == 0
    assert sum(row[m] for m in metrics) > 0, row
    if objective == "grpo":
        assert abs(row["ratio"] - 1.0) > 1e-3 and row["approx_kl"] > 0
        assert "dual_clip_frac" in row
    else:
        assert abs(row["is_weight"] - 1.0) > 1e-3
    one = TrainConfig(objective=objective, steps=1, lr=5e-2, output_dir=str(tmp_path / "one"), **RUN)
    row1 = Trainer(one, get_objective(objective, **args), task=Parity(), log=lambda *a: None).step(0)
    assert all(row1[m] == 0.0 for m in metrics)
    assert row1.get("ratio", 1.0) == 1.0 and row1.get("is_weight", 1.0) == 1.0


# ------------------------------------------------------------------- the objective's switch


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "gspo", "sdpo", "hybrid", "hybrid_adv"])
def test_old_logp_switch_resolves_from_the_updates_per_rollout_batch(name):
    objective = get_objective(name)
    assert objective.for_run(1) is objective  # one update: as configured
    several = objective.for_run(4)
    assert type(several) is type(objective) and several.use_old_logp
    assert Signal.OLD_LOGP in several.signals()
    assert dataclasses.replace(several, use_old_logp=objective.use_old_logp) == objective  # nothing else changed
    explicit = get_objective(name, use_old_logp=True)
    assert explicit.for_run(1).use_old_logp and explicit.for_run(3) is explicit


def test_an_objective_without_the_switch_is_used_as_it_is(tmp_path):
    """The contract's default for_run returns the objective; the loop then gives old_logp only if declared."""

    @register_objective("test_plain_reinforce")
    @dataclasses.dataclass
    class Plain(Objective):
        """-A logp, token mean."""

        def signals(self):
            return frozenset({Signal.REWARDS, Signal.ADVANTAGES})

        def loss(self, stats, batch):
            from denser.objectives import LossOutput, aggregate

            assert batch.old_logp is None
            return LossOutput(aggregate(-batch.token_advantages() * stats.logp, batch, "token-mean"), {})

    try:
        plain = get_objective("test_plain_reinforce")
        assert plain.for_run(6) is plain
        cfg = TrainConfig(objective="test_plain_reinforce", steps=1, mini_batches=2, epochs=3,
                          output_dir=str(tmp_path / "r"), **RUN)
        assert Trainer(cfg, task=Parity(), log=lambda *a: None).step(0)["updates"] == 6
    finally:
        unregister_objective("test_plain_reinforce")


def test_the_run_config_records_the_resolved_objective(tmp_path):
    import yaml

    cfg = TrainConfig(objective="sdpo", steps=1, mini_batches=2, output_dir=str(tmp_path / "r"), **RUN)
    trainer = Trainer(cfg, task=Parity(), log=lambda *a: None)
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["mini_batches"] == 2 and saved["objective_args"]["use_old_logp"] is True
    assert trainer.signals.forward_old_logp


# ------------------------------------------------------------------------------ checks, plan


def test_bad_update_settings_fail_with_one_clear_message():
    with pytest.raises(ValueError, match="--mini-batches must be >= 1"):
        TrainConfig(mini_batches=0)
    with pytest.raises(ValueError, match="--epochs must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match=r"--mini-batches 9 is more than the 8 completions .*--prompts-per-step 2 x "
                                         r"--num-generations 4"):
        TrainConfig(mini_batches=9, prompts_per_step=2, num_generations=4)
    with pytest.raises(ValueError, match="--old-logp-source must be"):
        TrainConfig(old_logp_source="cache")
    assert TrainConfig(mini_batches=3, epochs=2).updates_per_step == 6


def test_update_plan_cuts_each_epoch_into_near_equal_mini_batches(tmp_path):
    from denser.trainers.batches import UpdateBatches

    def plan(**kw):
        cfg = TrainConfig(**{**dict(prompts_per_step=4, num_generations=5), **kw})
        batches = UpdateBatches(cfg, device=torch.device("cpu"), rank=0, reduce=lambda t: t, old_logp=False)
        return batches.update_plan(20, step=3)

    assert plan() == [list(range(20))]
    assert plan(epochs=3) == [list(range(20))] * 3
    assert plan(mini_batches=3, shuffle_mini_batches=False) == [list(range(7)), list(range(7, 14)), list(range(14, 20))]
    shuffled = plan(mini_batches=3, epochs=2)
    assert [len(p) for p in shuffled] == [7, 7, 6, 7, 7, 6]
    assert sorted(sum(shuffled[:3], [])) == list(range(20)) and sorted(sum(shuffled[3:], [])) == list(range(20))
    assert shuffled[:3] != shuffled[3:]  # a fresh permutation per epoch
    assert shuffled == plan(mini_batches=3, epochs=2)  # seeded: the same every time (exact resume)
    assert shuffled != plan(mini_batches=3, epochs=2, seed=1)
    state = torch.get_rng_state()
    plan(mini_batches=3)
    assert torch.equal(state, torch.get_rng_state())  # the global stream is untouched


def test_random_token_masks_differ_between_updates_and_update_0_is_unchanged():
    import hashlib

    batch = PolicyBatch(seq_ids=torch.zeros(400, dtype=torch.long), num_seqs=1, global_tokens=400.0, global_seqs=1.0,
                        step=5, micro_batch=2)
    m0 = token_keep_mask(batch, 0.5, 7, "s")
    key = b"7:5:2:s"  # the key a run of one update per rollout batch always used
    g = torch.Generator().manual_seed(int(hashlib.sha256(key).hexdigest()[:15], 16))
    assert torch.equal(m0, torch.rand(400, generator=g) < 0.5)
    m1 = token_keep_mask(dataclasses.replace(batch, update=1), 0.5, 7, "s")
    m2 = token_keep_mask(dataclasses.replace(batch, update=2), 0.5, 7, "s")
    assert not torch.equal(m0, m1) and not torch.equal(m1, m2)
    assert torch.equal(m1, token_keep_mask(dataclasses.replace(batch, update=1), 0.5, 7, "s"))


# ----------------------------------------------------------------- the IS weight, by hand


def test_sdpo_importance_weight_and_its_clip_on_a_hand_built_case():
    """One distilled sequence of three tokens: w = sg[min(exp(logp - old_logp), is_clip)]."""
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    divergence = torch.tensor([0.2, 0.4, 0.1], requires_grad=True)
    old = torch.tensor([-1.5, -1.0, -0.5])
    batch = PolicyBatch(seq_ids=torch.zeros(3, dtype=torch.long), num_seqs=1, global_tokens=3.0, global_seqs=1.0,
                        old_logp=old, teacher_mask=torch.tensor([True]), global_teacher_tokens=3.0,
                        global_teacher_seqs=1.0)
    out = get_objective("sdpo", distill_mode="full", is_clip=1.5).loss(TokenStats(logp, None, divergence), batch)
    w = [1.5, math.exp(-1.0), 1.0]  # exp(0.5) = 1.65 is clipped to 1.5
    assert out.loss.item() == pytest.approx((0.2 * w[0] + 0.4 * w[1] + 0.1 * w[2]) / 3, rel=1e-6)
    out.loss.backward()
    assert torch.allclose(divergence.grad, torch.tensor(w) / 3)
    assert logp.grad is None or torch.all(logp.grad == 0)  # the weight is detached
    m = out.metric_values()
    assert m["is_clip_frac"] == pytest.approx(1 / 3) and m["is_weight"] == pytest.approx(sum(w) / 3, rel=1e-6)
    # without old_logp (one update per rollout batch) the weight is 1
    on_policy = get_objective("sdpo", distill_mode="full", is_clip=1.5).loss(
        TokenStats(logp.detach(), None, divergence.detach()), dataclasses.replace(batch, old_logp=None))
    assert on_policy.loss.item() == pytest.approx(0.7 / 3) and on_policy.metric_values()["is_clip_frac"] == 0
