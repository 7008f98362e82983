"""The rollout-vs-trainer correction (denser/trainers/rollout_correction.py): weights and metrics against
an independent float64 computation, what ``auto`` resolves to, and that the loop applies it to the
policy-gradient term (a GRPO loss scales by exactly the weight)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from denser.trainers.rollout_correction import correction_weights, weight_advantages


def _reference(train, rollout, mode, cap):
    """Weights and metric means with python floats, token by token."""
    level, action = mode.split("-")
    weights, over, ratios, deltas = [], 0, [], []
    for lt, lr in zip(train, rollout):
        d = [a - b for a, b in zip(lt, lr)]
        deltas += d
        if level == "token":
            raw = [math.exp(x) for x in d]
            over += sum(r > cap for r in raw)
        else:
            seq = math.exp(sum(d))
            raw = [seq] * len(d)
            over += seq > cap
        w = [min(r, cap) if action == "truncate" else (0.0 if r > cap else r) for r in raw]
        weights.append(w)
        ratios += w if level == "token" else w[:1]
    n = len(deltas)
    per = len(ratios)
    return weights, {
        "rollout_corr/kl": sum(-x for x in deltas) / n,
        "rollout_corr/k3_kl": sum(math.exp(x) - 1 - x for x in deltas) / n,
        "sampling/sampling_logp_difference/mean": sum(abs(x) for x in deltas) / n,
        "sampling/importance_sampling_ratio/mean": sum(ratios) / per,
        f"rollout_corr/{'clipped' if action == 'truncate' else 'masked'}_frac": over / per,
    }


@pytest.mark.parametrize("mode", ["token-truncate", "token-mask", "sequence-truncate", "sequence-mask"])
def test_weights_and_metrics_match_a_float64_reference(mode):
    rng = random.Random(mode)
    lengths = [5, 1, 7, 3]
    rollout = [[math.log(rng.uniform(0.05, 1.0)) for _ in range(n)] for n in lengths]
    train = [[x + rng.gauss(0, 0.6) for x in lr] for lr in rollout]
    # both sides of the cap at either level: sample 0 above it as a whole (1.5 nats), sample 2 with one
    # token above it (1 nat), samples 1 and 3 below it
    train[0] = [x + 0.3 for x in rollout[0]]
    train[1] = [rollout[1][0] - 0.1]
    train[2][0] = rollout[2][0] + 1.0
    train[3] = [x - 0.2 for x in rollout[3]]
    cap = 1.7
    weights, metrics = correction_weights([torch.tensor(t, dtype=torch.float32) for t in train],
                                          [torch.tensor(r, dtype=torch.float32) for r in rollout], mode, cap)
    want_w, want_m = _reference(train, rollout, mode, cap)
    for got, want in zip(weights, want_w):
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert sorted(metrics) == sorted(want_m)
    for k, v in want_m.items():
        assert metrics[k].value == pytest.approx(v, rel=1e-5, abs=1e-6), k
    frac = want_m[[k for k in want_m if k.endswith("_frac")][0]]
    assert 0 < frac < 1, "the case should have weights on both sides of the cap"


def test_weight_advantages_sequence_and_token():
    w = [torch.tensor([1.0, 0.5]), torch.tensor([2.0])]
    out = weight_advantages(torch.tensor([3.0, -1.0]), w)
    assert [o.tolist() for o in out] == [[3.0, 1.5], [-2.0]]
    out = weight_advantages([torch.tensor([1.0, 2.0]), torch.tensor([4.0])], w)
    assert [o.tolist() for o in out] == [[1.0, 1.0], [8.0]]


def test_auto_resolves_by_engine(monkeypatch):
    from denser.engines.vllm import VLLMRolloutEngine
    from denser.trainers.resolve import resolve_run

    run = resolve_run({"model": "tiny"}, "grpo", "addition")
    assert (run.config.rollout_correction, run.config.old_logp_source) == ("off", "engine")
    monkeypatch.setattr(VLLMRolloutEngine, "unavailable", classmethod(lambda cls: None))  # resolving builds nothing
    run = resolve_run({"model": "tiny"}, "grpo", "addition", engine="vllm")
    assert (run.config.rollout_correction, run.config.old_logp_source) == ("token-truncate", "forward")
    run = resolve_run({"model": "tiny"}, "sdpo", "addition", engine="vllm")  # no advantages to weight
    assert run.config.rollout_correction == "off"
    run = resolve_run({"model": "tiny", "rollout_correction": "off", "old_logp_source": "engine"}, "grpo",
                      "addition", engine="vllm")
    assert (run.config.rollout_correction, run.config.old_logp_source) == ("off", "engine")
    with pytest.raises(ValueError, match="rollout-correction-cap"):
        resolve_run({"model": "tiny", "rollout_correction_cap": 0.0}, "grpo", "addition")


def test_loop_applies_the_weights_to_the_policy_gradient(tmp_path, monkeypatch):
    """An engine whose log-probs are 1 nat below the trainer's on every token: with token-truncate at
    cap 2 every weight is min(e, 2) = 2, so GRPO's first-update gradient (linear in the advantages) doubles,
    and the metrics say so; sequence-mask with cap 2 masks every sample (gradient 0)."""
    from denser.tasks import Score
    from denser.tasks.builtin import Addition

    class CodeParity(Addition):  # rewards that vary between the random tiny model's completions
        def check(self, completion, row):
            return Score(float(sum(map(ord, completion)) % 2 == 0), None, None)

    from denser.engines.hf import HFRolloutEngine
    from denser.trainers.config import TrainConfig
    from denser.trainers.loop import Trainer

    real = HFRolloutEngine.generate

    def shifted(self, *a, **k):
        r = real(self, *a, **k)
        r.logps = [lp - 1.0 for lp in r.logps]
        return r

    monkeypatch.setattr(HFRolloutEngine, "generate", shifted)

    def first_step(mode):
        out = tmp_path / mode
        cfg = TrainConfig(objective="grpo", model="tiny", steps=1, max_new_tokens=6, num_generations=4,
                          prompts_per_step=2, eval_size=1, micro_batch_size=8, progress=False, lr=1e-3,
                          output_dir=str(out), rollout_correction=mode, rollout_correction_cap=2.0, temperature=1.3)
        Trainer(cfg, task=CodeParity(), log=lambda *a: None, evaluator=lambda t: 0.0).train()
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][0]

    off, trunc, mask = first_step("off"), first_step("token-truncate"), first_step("sequence-mask")
    # (the loss itself is 0 at ratio 1 when group advantages sum to 0 over equal lengths: the gradient is not)
    assert off["reward_std"] > 0 and off["grad_norm"] > 1e-6, "no advantage: the check would pass trivially"
    assert "rollout_corr/kl" not in off
    assert trunc["grad_norm"] == pytest.approx(2.0 * off["grad_norm"], rel=1e-4)
    assert trunc["rollout_corr/kl"] == pytest.approx(-1.0, abs=1e-4)  # log pi_rollout - log pi_train
    assert trunc["rollout_corr/clipped_frac"] == 1.0 and trunc["sampling/importance_sampling_ratio/mean"] == 2.0
    assert mask["grad_norm"] == 0.0 and mask["rollout_corr/masked_frac"] == 1.0
