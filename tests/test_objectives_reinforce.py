"""rloo, reinforce_pp, reinforce_pp_baseline and cispo against float64 re-derivations of the named
implementations' formulas, written here independently of denser's code:

- advantages: verl ``verl/trainer/ppo/core_algos.py`` (compute_rloo_outcome_advantage,
  compute_reinforce_plus_plus_outcome_advantage, compute_reinforce_plus_plus_baseline_outcome_advantage)
  with ``ray_trainer.apply_kl_penalty`` and ``verl_F.masked_whiten``, on padded ``[B, T]`` matrices as
  verl holds them;
- losses: verl's vanilla PPO policy loss and ``compute_policy_loss_cispo``, from materialised float64
  logits, against ``fused_loss`` on the chunked (gradients in forward, small chunks) and reference backends.
"""

from __future__ import annotations

import threading

import pytest
import torch

from denser.kernels import fused_loss
from denser.objectives import AdvantageInputs, PolicyBatch, Signal, get_objective, list_objectives

# ------------------------------------------------------------------ verl's formulas, re-derived in float64


def padded(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r.double()
    return out


def verl_masked_whiten(values, mask):
    mask = mask.double()
    n = mask.sum()
    mean = (values * mask).sum() / (n + 1e-8)
    var = (((values - mean) ** 2) * mask).sum() / (n + 1e-8) * (n / (n - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def verl_token_level_rewards(case, beta, kl_kind):
    """apply_kl_penalty: token_level_scores (score at the last response token) - beta * kl * response_mask."""
    B, T = len(case["lens"]), max(case["lens"])
    response = torch.zeros(B, T, dtype=torch.float64)
    scores = torch.zeros(B, T, dtype=torch.float64)
    for i, L in enumerate(case["lens"]):
        response[i, :L] = 1.0
        scores[i, L - 1] = float(case["rewards"][i])
    old, ref = padded(case["old_logp"], T), padded(case["ref_logp"], T)
    d = old - ref
    kld = {"k1": d, "k2": 0.5 * d * d, "k3": torch.exp(-d) - 1 + d}[kl_kind]
    return scores - beta * kld * response, response


def verl_rloo(case, beta, kl_kind):
    rewards, _ = verl_token_level_rewards(case, beta, kl_kind)
    scores = rewards.sum(-1)
    G = case["G"]
    out = scores.clone()
    for g in range(len(scores) // G):
        group = scores[g * G:(g + 1) * G]
        mean = group.mean()
        for j in range(G):
            out[g * G + j] = group[j] * G / (G - 1) - mean * G / (G - 1)
    return out


def verl_reinforce_pp(case, beta, kl_kind, gamma):
    rewards, response = verl_token_level_rewards(case, beta, kl_kind)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=torch.float64)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * response[:, t]
    loss_mask = response * padded(case["token_mask"], rewards.shape[1])
    return verl_masked_whiten(returns, loss_mask) * loss_mask


def verl_reinforce_pp_baseline(case, beta, kl_kind):
    rewards, response = verl_token_level_rewards(case, beta, kl_kind)
    scores = rewards.sum(-1)
    G = case["G"]
    for g in range(len(scores) // G):
        scores[g * G:(g + 1) * G] -= scores[g * G:(g + 1) * G].mean() if G > 1 else 0.0
    tiled = scores.unsqueeze(-1).repeat(1, rewards.shape[1]) * response
    loss_mask = response * padded(case["token_mask"], rewards.shape[1])
    return verl_masked_whiten(tiled, loss_mask) * loss_mask


def rollout_case(gen, G=4, prompts=3, truncated=(5,)):
    """A rollout batch: random lengths (one of length 1), rewards with ties, behaviour and reference log-probs,
    the samples in ``truncated`` masked out of the loss (as --mask-truncated-completions)."""
    S = G * prompts
    lens = [int(x) for x in torch.randint(1, 9, (S,), generator=gen)]
    lens[1] = 1
    rewards = torch.randint(0, 3, (S,), generator=gen).float() + 0.1 * torch.randn(S, generator=gen)
    old = [-torch.rand(L, generator=gen) * 3 for L in lens]
    ref = [o + 0.7 * torch.randn(len(o), generator=gen) for o in old]
    mask = [torch.full((L,), s not in truncated) for s, L in enumerate(lens)]
    return {"lens": lens, "rewards": rewards, "old_logp": old, "ref_logp": ref, "token_mask": mask, "G": G}


def inputs_of(case, reduce=None, rows=None):
    rows = list(range(len(case["lens"]))) if rows is None else rows
    pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
    return AdvantageInputs(case["rewards"][rows], case["G"], token_mask=pick(case["token_mask"]),
                           old_logp=pick(case["old_logp"]), ref_logp=pick(case["ref_logp"]),
                           **({} if reduce is None else {"reduce": reduce}))


def as_padded(per_sample, lens):
    return padded(per_sample, max(lens))


# ------------------------------------------------------------------------------------- advantages

KL = [(0.0, "k1"), (0.001, "k1"), (0.3, "k1"), (0.2, "k3"), (0.1, "k2")]


@pytest.mark.parametrize("beta,kind", KL)
def test_rloo_advantages_match_verl(gen, beta, kind):
    case = rollout_case(gen)
    objective = get_objective("rloo", kl_reward_coef=beta, kl_reward_estimator=kind)
    got = objective.rollout_advantages(inputs_of(case))
    assert got.shape == (len(case["lens"]),)
    assert torch.allclose(got.double(), verl_rloo(case, beta, kind), rtol=1e-5, atol=1e-5)
    if beta:  # the KL term moved the advantages
        assert not torch.allclose(got, get_objective("rloo", kl_reward_coef=0.0).rollout_advantages(inputs_of(case)))


@pytest.mark.parametrize("beta,kind", KL)
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_advantages_match_verl(gen, beta, kind, gamma):
    case = rollout_case(gen)
    objective = get_objective("reinforce_pp", kl_reward_coef=beta, kl_reward_estimator=kind, gamma=gamma)
    got = objective.rollout_advantages(inputs_of(case))
    assert [len(a) for a in got] == case["lens"]
    expected = verl_reinforce_pp(case, beta, kind, gamma)
    assert torch.allclose(as_padded(got, case["lens"]), expected, rtol=1e-5, atol=1e-5)
    assert all((a == 0).all() for a, m in zip(got, case["token_mask"]) if not m.any())  # masked sample: 0
    if beta:  # per-token advantages differ within a sequence
        assert any(len(a) > 1 and a.std() > 1e-3 for a in got)


@pytest.mark.parametrize("beta,kind", KL)
@pytest.mark.parametrize("G", [4, 1])
def test_reinforce_pp_baseline_advantages_match_verl(gen, beta, kind, G):
    case = rollout_case(gen, G=G, prompts=12 // G)
    objective = get_objective("reinforce_pp_baseline", kl_reward_coef=beta, kl_reward_estimator=kind)
    got = objective.rollout_advantages(inputs_of(case))
    expected = verl_reinforce_pp_baseline(case, beta, kind)
    assert torch.allclose(as_padded(got, case["lens"]), expected, rtol=1e-5, atol=1e-5)


def run_two_processes(objective, case, split):
    """The advantages as two processes compute them, each holding half of the groups, with ``reduce`` a real sum
    over both (two threads meeting at a barrier)."""
    barrier, slots = threading.Barrier(2, timeout=60), [None, None]
    results = [None, None]

    def reduce_for(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return reduce

    def work(rank, rows):
        results[rank] = objective.rollout_advantages(inputs_of(case, reduce_for(rank), rows))

    threads = [threading.Thread(target=work, args=(r, rows)) for r, rows in enumerate(split)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return results[0] + results[1]


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_whitening_is_over_every_process(gen, name):
    case = rollout_case(gen, G=4, prompts=4)
    objective = get_objective(name, kl_reward_coef=0.05)
    S = len(case["lens"])
    whole = objective.rollout_advantages(inputs_of(case))
    split = [list(range(0, S // 2)), list(range(S // 2, S))]  # whole groups on each process
    distributed = run_two_processes(objective, case, split)
    for a, b in zip(whole, distributed):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # whitening each process's share alone would differ
    alone = objective.rollout_advantages(inputs_of(case, rows=split[0]))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(alone, whole[: S // 2]))


def test_kl_reward_without_reference_log_probs_fails_clearly(gen):
    case = rollout_case(gen)
    inputs = AdvantageInputs(case["rewards"], case["G"], old_logp=case["old_logp"])
    with pytest.raises(ValueError, match="ROLLOUT_REF_LOGP"):
        get_objective("reinforce_pp").rollout_advantages(inputs)


def test_rloo_is_grpo_with_leave_one_out_when_kl_is_off(gen):
    case = rollout_case(gen)
    rloo = get_objective("rloo", kl_reward_coef=0.0)
    grpo = get_objective("grpo", leave_one_out=True, scale_rewards="none")
    assert torch.equal(rloo.rollout_advantages(inputs_of(case)), grpo.rollout_advantages(inputs_of(case)))
    assert rloo.signals() == grpo.signals()


# ------------------------------------------------------------------------------------------ losses

H, V = 6, 13


def loss_case(gen, per_token_adv):
    lens = [3, 5, 1, 4, 2]
    n, s = sum(lens), len(lens)
    seq_ids = torch.repeat_interleave(torch.arange(s), torch.tensor(lens))
    token_mask = torch.ones(n, dtype=torch.bool)
    token_mask[[2, 9]] = False
    hidden = torch.randn(n, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.7
    targets = torch.randint(0, V, (n,), generator=gen)
    with torch.no_grad():
        logp0 = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(1, targets[:, None])[:, 0].float()
    old_logp = logp0 + 0.5 * torch.randn(n, generator=gen)  # ratios on both sides of every clip
    old_logp[2] = float("nan")  # garbage on a masked token must not leak
    ref_logp = logp0 + 0.5 * torch.randn(n, generator=gen)
    advantages = torch.randn(n if per_token_adv else s, generator=gen)
    batch = PolicyBatch(seq_ids=seq_ids, num_seqs=s, global_tokens=float(token_mask.sum()) + 2.0, global_seqs=s + 1.0,
                        token_mask=token_mask, advantages=advantages, old_logp=old_logp, ref_logp=ref_logp,
                        norm_length=7.0, token_level_advantages=per_token_adv)
    return hidden, weight, targets, batch


def float64_logp_entropy(hidden, weight, targets):
    logits = hidden.double() @ weight.double().T
    logq = torch.log_softmax(logits, -1)
    return logq.gather(1, targets[:, None])[:, 0], -(logq.exp() * logq).sum(-1)


def aggregate64(per_token, batch, mode):
    m = batch.token_mask
    total = 0.0
    for s in range(batch.num_seqs):
        idx = [i for i in range(batch.num_tokens) if batch.seq_ids[i] == s and m[i]]
        if not idx:
            continue
        seq = sum(per_token[i] for i in idx)
        total = total + {"token-mean": seq / batch.global_tokens, "seq-mean-token-mean": seq / len(idx) / batch.global_seqs,
                         "seq-mean-token-sum": seq / batch.global_seqs,
                         "seq-mean-token-sum-norm": seq / (batch.global_seqs * batch.norm_length)}[mode]
    return total


def kl64(logp, ref, kind):
    d = ref - logp
    return {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - 1 - d}[kind]


def verl_vanilla_loss64(logp, ent, batch, cfg):
    """verl compute_policy_loss_vanilla (dual clip) + kl loss - entropy bonus, per token, then agg_loss."""
    lo, hi, c = cfg.get("clip_low", 0.2), cfg.get("clip_high", 0.2), cfg.get("clip_ratio_c", 3.0)
    adv = batch.token_advantages().double()
    per_token = []
    for i in range(batch.num_tokens):
        if not batch.token_mask[i]:
            per_token.append(None)
            continue
        ratio = torch.exp(torch.clamp(logp[i] - batch.old_logp[i].double(), -20, 20))
        a = adv[i]
        l1 = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - lo, 1 + hi))
        if c is not None and a < 0:
            l1 = torch.minimum(l1, -a * c)
        l1 = l1 + cfg.get("kl_coef", 0.0) * kl64(logp[i], batch.ref_logp[i].double(), cfg.get("kl_estimator", "k3"))
        per_token.append(l1 - cfg.get("entropy_coef", 0.0) * ent[i])
    return aggregate64(per_token, batch, cfg.get("loss_agg_mode", "token-mean"))


def verl_cispo_loss64(logp, ent, batch, cfg):
    """verl compute_policy_loss_cispo: -sg(clamp(ratio, 1 - low, 1 + high)) * A * logp, + kl loss - entropy bonus."""
    lo, hi = cfg.get("clip_low"), cfg.get("clip_high", 0.2)
    adv = batch.token_advantages().double()
    per_token = []
    for i in range(batch.num_tokens):
        if not batch.token_mask[i]:
            per_token.append(None)
            continue
        ratio = torch.exp(torch.clamp(logp[i] - batch.old_logp[i].double(), -20, 20)).detach()
        w = torch.clamp(ratio, min=-1e30 if lo is None else 1 - lo, max=1 + hi)
        term = -w * adv[i] * logp[i]
        term = term + cfg.get("kl_coef", 0.0) * kl64(logp[i], batch.ref_logp[i].double(), cfg.get("kl_estimator", "k3"))
        per_token.append(term - cfg.get("entropy_coef", 0.0) * ent[i])
    return aggregate64(per_token, batch, cfg.get("loss_agg_mode", "token-mean"))


LOSS_CASES = [
    ("cispo", verl_cispo_loss64, dict()),
    ("cispo", verl_cispo_loss64, dict(clip_low=0.1, clip_high=0.15, loss_agg_mode="seq-mean-token-mean")),
    ("cispo", verl_cispo_loss64, dict(clip_low=0.3, clip_high=0.05, kl_coef=0.1, kl_estimator="k1",
                                      entropy_coef=0.01, leave_one_out=True, loss_agg_mode="seq-mean-token-sum")),
    ("reinforce_pp", verl_vanilla_loss64, dict()),
    ("reinforce_pp", verl_vanilla_loss64, dict(clip_low=0.1, clip_high=0.28, clip_ratio_c=1.2, kl_coef=0.05,
                                               entropy_coef=0.02, loss_agg_mode="seq-mean-token-sum-norm")),
    ("reinforce_pp_baseline", verl_vanilla_loss64, dict(clip_ratio_c=None, kl_coef=0.1, kl_estimator="k2")),
    ("rloo", verl_vanilla_loss64, dict(clip_low=0.15, loss_agg_mode="seq-mean-token-mean")),
]


@pytest.mark.parametrize("name,reference,cfg", LOSS_CASES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(LOSS_CASES)])
@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_loss_and_gradients_match_the_float64_formula(gen, name, reference, cfg, backend):
    per_token_adv = name.startswith("reinforce_pp")  # REINFORCE++ advantages are per token; rloo, cispo per sequence
    hidden, weight, targets, batch = loss_case(gen, per_token_adv)
    objective = get_objective(name, **cfg)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_loss(h, w, targets, objective, batch, backend=backend, chunk_size=4)
    out.loss.backward()

    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    logp, ent = float64_logp_entropy(h64, w64, targets)
    expected = reference(logp, ent, batch, cfg)
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)
    assert h.grad.abs().sum() > 0 and torch.isfinite(h.grad).all()
    # the clips bind in this batch (the test would not see a wrong bound otherwise)
    ratio = torch.exp(logp.detach() - batch.old_logp.double())[batch.token_mask]
    hi = 1 + cfg.get("clip_high", 0.2)
    assert (ratio > hi).any() and (ratio < 1 - (cfg.get("clip_low") or 0.2)).any()


def test_cispo_clip_frac_and_on_policy_gradient(gen):
    hidden, weight, targets, batch = loss_case(gen, per_token_adv=False)
    objective = get_objective("cispo", clip_low=0.2, clip_high=0.2)
    out = fused_loss(hidden, weight, targets, objective, batch, backend="reference")
    m = batch.token_mask
    logp = float64_logp_entropy(hidden, weight, targets)[0]
    r = torch.exp(logp - batch.old_logp.double())[m]
    expected = ((r < 0.8) | (r > 1.2)).double().mean().item()
    assert out.metric_values()["clip_frac"] == pytest.approx(expected, abs=1e-6)
    # on-policy (no old_logp): weight 1, the gradient is -A grad logp / T
    batch.old_logp = None
    h = hidden.clone().requires_grad_()
    fused_loss(h, weight, targets, objective, batch, backend="chunked", chunk_size=3).loss.backward()
    h64 = hidden.double().requires_grad_()
    lp = float64_logp_entropy(h64, weight, targets)[0]
    pg = -(batch.token_advantages().double() * lp)[m].sum() / batch.global_tokens
    pg.backward()
    assert torch.allclose(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------- registry, CLI


def test_registered_with_their_signals():
    rows = {name: signals for name, _, signals in list_objectives()}
    kl_reward = {Signal.REWARDS, Signal.ADVANTAGES, Signal.REF_LOGP, Signal.ROLLOUT_REF_LOGP}
    assert rows["rloo"] == rows["reinforce_pp"] == rows["reinforce_pp_baseline"] == kl_reward
    assert rows["cispo"] == {Signal.REWARDS, Signal.ADVANTAGES}
    for name in ("rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert Signal.ROLLOUT_REF_LOGP not in get_objective(name, kl_reward_coef=0.0).signals()
        assert Signal.OLD_LOGP in get_objective(name).for_run(4).signals()
    assert Signal.OLD_LOGP in get_objective("cispo").for_run(2).signals()


def test_verl_defaults():
    rpp = get_objective("reinforce_pp")
    assert (rpp.kl_reward_coef, rpp.kl_reward_estimator, rpp.gamma) == (0.001, "k1", 1.0)
    assert (rpp.clip_low, rpp.clip_high, rpp.clip_ratio_c, rpp.loss_agg_mode, rpp.kl_coef) == (0.2, 0.2, 3.0, "token-mean", 0.0)
    rloo = get_objective("rloo")
    assert (rloo.leave_one_out, rloo.scale_rewards, rloo.kl_reward_coef) == (True, "none", 0.001)
    cispo = get_objective("cispo")
    assert (cispo.clip_low, cispo.clip_high, cispo.scale_rewards, cispo.loss_agg_mode) == (None, 0.2, "group", "token-mean")


@pytest.mark.parametrize("name", ["rloo", "reinforce_pp", "reinforce_pp_baseline", "cispo"])
def test_every_field_is_a_flag(name, capsys):
    from denser.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--objective", name, "--help"])
    text = capsys.readouterr().out
    for field_name in get_objective(name).__dataclass_fields__:
        assert f"--{field_name.replace('_', '-')}" in text, field_name


@pytest.mark.parametrize("name,bad,match", [
    ("reinforce_pp", dict(gamma=1.5), "gamma"),
    ("reinforce_pp", dict(kl_reward_coef=-1.0), "kl_reward_coef"),
    ("reinforce_pp_baseline", dict(clip_low=1.5), "objective 'reinforce_pp_baseline': clip_low"),
    ("rloo", dict(kl_reward_estimator="k9"), "kl_reward_estimator"),
    ("cispo", dict(clip_high=-0.1), "clip_high"),
])
def test_bad_values_fail_with_one_line(name, bad, match):
    with pytest.raises(ValueError, match=match):
        get_objective(name, **bad)


# ------------------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("name", ["reinforce_pp", "rloo"])
def test_loop_passes_rollout_advantages_and_reuses_reference_log_probs(tmp_path, monkeypatch, name):
    """One step of a tiny run with two updates: the reference scores every sample once (for the advantages), each
    micro-batch carries those log-probs and its samples' advantages (per token for reinforce_pp)."""
    from test_train import SMALL, ParityAddition

    from denser.cli import parse_train_args
    from denser.trainers import signals as signals_mod
    from denser.trainers.loop import Trainer

    cfg, objective = parse_train_args(["--objective", name, "--kl-reward-coef", "0.5", "--mini-batches", "2", *SMALL,
                                       "--steps", "1", "--mask-truncated-completions",
                                       "--output-dir", str(tmp_path / "r")])
    trainer = Trainer(cfg, objective, task=ParityAddition(), log=lambda *a: None)
    seen: dict = {"inputs": [], "advantages": [], "micro_batches": [], "ref_forwards": 0}
    original = trainer.signals.objective.rollout_advantages

    def spy_advantages(inputs):
        out = original(inputs)
        seen["inputs"].append(inputs)
        seen["advantages"].append(out)
        return out

    monkeypatch.setattr(trainer.signals.objective, "rollout_advantages", spy_advantages)
    real_logp, real_mb = signals_mod._logp, trainer.batches.micro_batches

    def spy_logp(model, *a, **k):
        seen["ref_forwards"] += model is trainer.reference
        return real_logp(model, *a, **k)

    def spy_mb(*a, **k):
        out = real_mb(*a, **k)
        seen["micro_batches"] += out
        return out

    monkeypatch.setattr(signals_mod, "_logp", spy_logp)
    monkeypatch.setattr(trainer.batches, "micro_batches", spy_mb)
    trainer.step(0)

    S = cfg.prompts_per_step * cfg.num_generations
    (inputs,), (advantages,) = seen["inputs"], seen["advantages"]
    assert len(inputs.ref_logp) == S and inputs.ref_logp[0].shape == inputs.old_logp[0].shape
    assert seen["ref_forwards"] == -(-S // cfg.micro_batch_size)  # the rollout's micro-batches, once
    assert inputs.token_mask is not None  # --mask-truncated-completions reaches the advantages
    assert len(seen["micro_batches"]) >= 2  # two updates
    for mb in seen["micro_batches"]:
        b = mb.batch
        assert torch.equal(b.ref_logp.cpu(), torch.cat([inputs.ref_logp[j] for j in mb.indices]))
        if name == "reinforce_pp":
            assert b.token_level_advantages
            assert torch.equal(b.advantages.cpu(), torch.cat([advantages[j] for j in mb.indices]))
        else:
            assert not b.token_level_advantages
            assert torch.equal(b.advantages.cpu(), advantages[torch.tensor(mb.indices)])


# ------------------------------------------------------------------- SDPG's loss terms (docs/objectives.md)


def sdpg_loss64(h, w, th, targets, batch, *, beta, alpha, clip_low, clip_high, c):
    """SDPG's compute_sdpg_loss (lauyikfung/SDPG, verl/trainer/ppo/core_algos.py, kl_mode='urkl') with its
    dp_actor's full-vocabulary KL(pi(.|x) || sg pi(.|c,x)), re-derived in float64 from materialised logits."""
    logq = torch.log_softmax(h @ w.T, -1)
    logt = torch.log_softmax(th @ w.T, -1).detach()
    logp = logq.gather(1, targets[:, None])[:, 0]
    kl_distill = (logq.exp() * (logq - logt)).sum(-1)
    adv = batch.token_advantages().double()
    ratio = torch.exp(torch.clamp(logp - batch.old_logp.double(), -20, 20))
    l1 = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high))
    pg = torch.where(adv < 0, torch.minimum(-adv * c, l1), l1)
    logw = logp - batch.ref_logp.double()
    per_token = pg + beta * kl_distill + alpha / 2 * logw ** 2
    m = batch.token_mask
    return per_token[m].sum() / batch.global_tokens


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_sdpg_loss_terms_are_hybrid_when_every_sample_has_a_teacher(gen, backend):
    """The configuration docs/objectives.md names: (1 + beta) * hybrid == SDPG's loss for the same teacher."""
    hidden, weight, targets, batch = loss_case(gen, per_token_adv=False)
    batch.old_logp[2] = 0.0  # SDPG's formula is written unmasked: keep it finite on the masked token
    batch.teacher_mask = torch.ones(batch.num_seqs, dtype=torch.bool)
    batch.global_teacher_tokens, batch.global_teacher_seqs = batch.global_tokens, batch.global_seqs
    teacher_hidden = hidden + 0.7 * torch.randn(hidden.shape, generator=gen)
    beta, alpha = 0.3, 0.2  # large, so a wrong term shows
    objective = get_objective("hybrid", teacher="live", distill_mode="full", alpha=1.0, is_clip=None,
                              sdpo_loss_agg_mode="token-mean", clip_high=0.28, kl_coef=alpha, kl_estimator="k2",
                              lam=1 / (1 + beta))
    h = hidden.clone().requires_grad_()
    out = fused_loss(h, weight, targets, objective, batch, teacher_hidden=teacher_hidden, backend=backend, chunk_size=4)
    (out.loss * (1 + beta)).backward()
    h64 = hidden.double().requires_grad_()
    expected = sdpg_loss64(h64, weight.double(), teacher_hidden.double(), targets, batch, beta=beta, alpha=alpha,
                           clip_low=0.2, clip_high=0.28, c=3.0)
    expected.backward()
    assert (out.loss * (1 + beta)).item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)


def test_advantages_of_the_wrong_shape_fail_with_one_line():
    from types import SimpleNamespace

    from denser.trainers.signals import _checked_advantages

    rollout = SimpleNamespace(logps=[torch.zeros(3), torch.zeros(2)])
    objective = get_objective("reinforce_pp")
    assert _checked_advantages(objective, torch.zeros(2), rollout).shape == (2,)
    assert len(_checked_advantages(objective, [torch.zeros(3), torch.zeros(2)], rollout)) == 2
    for bad in (torch.zeros(5), [torch.zeros(2), torch.zeros(3)], [torch.zeros(3)]):
        with pytest.raises(ValueError, match="objective 'reinforce_pp': rollout_advantages"):
            _checked_advantages(objective, bad, rollout)
