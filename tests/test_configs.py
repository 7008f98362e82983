"""The shipped run configs (configs/*.yaml) parse into what they say they follow, and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from denser.cli import main, parse_train_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = ["--model", "tiny", "--steps", "1", "--eval-size", "2", "--max-new-tokens", "6", "--no-progress"]


def test_sdpo_config_is_sdpos_published_settings():
    cfg, obj = parse_train_args(["--config", str(CONFIGS / "sdpo.yaml"), "--model", "tiny", "--steps", "1"])
    assert (cfg.model, cfg.steps) == ("tiny", 1)  # flags override the file
    assert (cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.adam_beta2, cfg.max_grad_norm) == (1e-5, 10, 0.01, 0.999, 1.0)
    assert cfg.num_generations == 8 and cfg.teacher_max_context_tokens == 10240
    assert obj.name == "sdpo"
    assert (obj.alpha, obj.distill_mode, obj.topk, obj.add_tail, obj.is_clip) == (0.5, "topk", 100, True, 2.0)
    assert (obj.teacher, obj.teacher_update_rate, obj.include_feedback) == ("ema", 0.05, False)
    assert obj.loss_agg_mode == "seq-mean-token-mean" and obj.dont_reprompt_on_self_success
    assert cfg.mini_batches == 1 and cfg.epochs == 1  # one update per rollout batch


def test_grpo_baseline_config_is_sdpos_grpo_baseline():
    cfg, obj = parse_train_args(["--config", str(CONFIGS / "grpo_sdpo_baseline.yaml"), "--model", "tiny"])
    assert (cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.adam_beta2) == (1e-5, 10, 0.01, 0.999)
    assert obj.name == "grpo" and cfg.num_generations == 8
    assert (obj.clip_low, obj.clip_high, obj.scale_rewards, obj.loss_agg_mode) == (0.2, 0.28, "none",
                                                                                  "seq-mean-token-mean")
    assert (cfg.mini_batches, cfg.epochs, cfg.shuffle_mini_batches) == (4, 1, False)  # 4 updates, groups in order
    assert cfg.updates_per_step == 4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sdpo", "grpo_sdpo_baseline"])
def test_config_runs_one_step_on_the_tiny_model(tmp_path, name):
    out = tmp_path / name
    assert main(["train", "--config", str(CONFIGS / f"{name}.yaml"), "--output-dir", str(out), *FAST]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if "loss" in r)
    assert step["skipped"] == 0 and step["lr"] == pytest.approx(1e-6)  # after one of the ten warmup steps
    assert step["updates"] == (4 if name == "grpo_sdpo_baseline" else 1)  # the schedule steps once per rollout batch
