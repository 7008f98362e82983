"""DAPO as DAPO: dynamic sampling and overlong reward shaping (loop options the `dapo` preset turns on)."""

from __future__ import annotations

import pytest
import torch

from denser.cli import parse_train_args
from denser.engines.base import Rollout, SamplingParams
from denser.objectives import Objective, Signal, get_objective, register_objective, unregister_objective
from denser.tasks import Score
from denser.tasks.builtin import Addition
from denser.trainers.config import TrainConfig
from denser.trainers.loop import Trainer
from denser.trainers.prompts import PromptSchedule
from denser.trainers.resolve import resolve_run
from denser.trainers.scoring import Scores, dynamic_batch, overlong_penalty, varied_groups

# ------------------------------------------------------------------------------ overlong shaping


def test_overlong_penalty_on_hand_built_lengths():
    """Budget 24, buffer 4, factor 0.5: 0 up to 20 tokens, then linearly to -0.5 at 24."""
    got = overlong_penalty(torch.tensor([1, 19, 20, 21, 22, 23, 24]), 24, 4, 0.5)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5]))
    # a buffer longer than the budget covers all of it: from 0 at length 0 to -factor at the budget
    assert torch.allclose(overlong_penalty(torch.tensor([0, 3, 6]), 6, 10, 1.0), torch.tensor([0.0, -0.5, -1.0]))
    assert torch.equal(overlong_penalty(torch.tensor([5, 6]), 6, 0, 1.0), torch.zeros(2))  # off


# ------------------------------------------------------------------------------ group selection


def test_varied_groups_on_hand_built_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, -0.2, 0.3, 0.3])
    assert varied_groups(rewards, 3).tolist() == [False, True, False, True]


def _fake_rollout(prompt_base: int, rewards: list[list[float]]):
    """A rollout of len(rewards) prompts (ids prompt_base, ...) whose groups score ``rewards``."""
    g = len(rewards[0])
    prompts = [[prompt_base + p] for p in range(len(rewards))]
    completions = [[100 * (prompt_base + p) + j + 1] for p in range(len(rewards)) for j in range(g)]
    rollout = Rollout(prompt_ids=prompts, completion_ids=completions, texts=[str(c[0]) for c in completions],
                      logps=[torch.tensor([-float(c[0])]) for c in completions],
                      truncated=torch.zeros(len(completions), dtype=torch.bool), num_generations=g,
                      params=SamplingParams(num_generations=g), pad_token_id=0)
    flat = torch.tensor([r for group in rewards for r in group])
    scores = Scores([Score(float(r), None, None) for r in flat], flat, (flat > 0.5).float())
    rows = [{"prompt": prompt_base + p} for p in range(len(rewards))]
    return rollout, rows, scores


def test_dynamic_batch_keeps_varied_groups_in_generation_order():
    rounds = {0: _fake_rollout(0, [[1, 1], [0, 1], [0, 0]]),
              1: _fake_rollout(10, [[1, 1], [1, 0], [0, 0]]),
              2: _fake_rollout(20, [[0, 1], [1, 0], [0, 1]])}
    calls = []

    def generate(j):
        calls.append(j)
        return rounds[j]

    batch = dynamic_batch(generate, prompts=3, max_rounds=5)
    assert calls == [0, 1, 2] and batch.rounds == 3
    assert [r["prompt"] for r in batch.rows] == [1, 11, 20]  # the first three varied groups; extra ones discarded
    assert batch.rollout.prompt_ids == [[1], [11], [20]]
    assert batch.rollout.completion_ids == [[101], [102], [1101], [1102], [2001], [2002]]
    assert batch.scores.rewards.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert [s.score for s in batch.scores.scores] == batch.scores.rewards.tolist()
    assert torch.equal(torch.cat(batch.rollout.logps), torch.tensor([-101.0, -102, -1101, -1102, -2001, -2002]))
    assert batch.dropped == 6 and batch.filled == 0


def test_dynamic_batch_fills_up_with_dropped_groups_at_the_round_cap():
    rounds = [_fake_rollout(0, [[1, 1], [0, 1]]), _fake_rollout(10, [[0, 0], [1, 1]])]
    batch = dynamic_batch(lambda j: rounds[j], prompts=2, max_rounds=2)
    assert batch.rounds == 2 and batch.filled == 1 and batch.dropped == 2
    assert [r["prompt"] for r in batch.rows] == [0, 1]  # the varied one, and the first uniform one, in order
    # enough in the first round: one round only
    one = dynamic_batch(lambda j: _fake_rollout(0, [[0, 1], [1, 0]]), prompts=2, max_rounds=4)
    assert (one.rounds, one.dropped, one.filled) == (1, 0, 0)


def test_refill_rounds_draw_their_own_prompts(tmp_path):
    from denser.tasks import get_task

    task = get_task("addition")
    plain = PromptSchedule(task, None, seed=3, prompts_per_step=4, rank=0, world=1, max_new_tokens=8,
                           context_limit=None)
    dyn = PromptSchedule(task, None, seed=3, prompts_per_step=4, rank=0, world=1, max_new_tokens=8,
                         context_limit=None, rounds=3)
    assert all(plain.rows_for_step(t) == dyn.rows_for_step(t) for t in range(3))  # first rounds: as without
    refills = [dyn.rows_for_step(t, round=j) for t in range(3) for j in (1, 2)]
    assert refills == [dyn.rows_for_step(t, round=j) for t in range(3) for j in (1, 2)]  # deterministic
    assert len({str(r) for r in refills}) == len(refills)
    ranks = [PromptSchedule(task, None, seed=3, prompts_per_step=4, rank=r, world=2, max_new_tokens=8,
                            context_limit=None, rounds=3).rows_for_step(0, round=1) for r in (0, 1)]
    assert not {str(x) for x in ranks[0]} & {str(x) for x in ranks[1]}  # processes draw different refills
    with pytest.raises(ValueError, match="generation round 3"):
        dyn.rows_for_step(0, round=3)


def test_a_prompts_global_index_is_the_same_whatever_the_number_of_processes():
    """The index that seeds a prompt's request: with the same global batch (processes x prompts per
    process), a prompt drawn at (step, round) has the same global index on 1, 2 or 4 processes."""
    from denser.tasks import get_task

    task = get_task("addition")

    def by_prompt(world):
        out = {}
        for r in range(world):
            s = PromptSchedule(task, None, seed=3, prompts_per_step=8 // world, rank=r, world=world,
                               max_new_tokens=8, context_limit=None, rounds=2)
            for t in range(3):
                for j in (0, 1):
                    for row, i in zip(s.rows_for_step(t, round=j), s.request_indices(), strict=True):
                        out[(t, j, i)] = str(row)
        return out

    one = by_prompt(1)
    assert len(one) == 3 * 2 * 8 and set(one) == {(t, j, i) for t in range(3) for j in (0, 1) for i in range(8)}
    assert by_prompt(2) == one and by_prompt(4) == one


# --------------------------------------------------------------------------- the dapo preset


def test_dapo_turns_on_the_loop_options_where_the_user_sets_none(tmp_path):
    cfg, obj = parse_train_args(["--objective", "dapo"])
    assert (cfg.dynamic_sampling, cfg.overlong_buffer, cfg.overlong_penalty) == (True, 5, 1.0)
    assert obj.run_defaults() == {"dynamic_sampling": True, "overlong_buffer": 5, "overlong_penalty": 1.0}
    cfg, _ = parse_train_args(["--objective", "dapo", "--no-dynamic-sampling", "--overlong-buffer", "0"])
    assert (cfg.dynamic_sampling, cfg.overlong_buffer) == (False, 0)  # the user's flags win
    path = tmp_path / "c.yaml"
    path.write_text("objective: dapo\ndynamic_sampling: false\n")
    cfg, _ = parse_train_args(["--config", str(path)])
    assert (cfg.dynamic_sampling, cfg.overlong_buffer) == (False, 5)  # the file's value wins too
    cfg, _ = parse_train_args(["--objective", "grpo"])
    assert (cfg.dynamic_sampling, cfg.overlong_buffer) == (False, 0)
    assert get_objective("grpo").run_defaults() == {}
    # the Python API resolves the same way: None is "not set", an explicit value stays
    assert resolve_run(TrainConfig(objective="dapo", steps=3)).config.dynamic_sampling
    assert not resolve_run(TrainConfig(dynamic_sampling=False), "dapo").config.dynamic_sampling
    assert TrainConfig(objective="dapo").dynamic_sampling is None  # what the user gave: nothing


def test_run_defaults_naming_no_run_option_fail_clearly():
    @register_objective("test_bad_run_defaults")
    class Bad(Objective):
        """Names a run option that does not exist."""

        def signals(self):
            return frozenset({Signal.REWARDS})

        def run_defaults(self):
            return {"dynamic_sampling": True, "warp_speed": 9}

    try:
        with pytest.raises(ValueError, match="objective 'test_bad_run_defaults': run_defaults\\(\\) names warp_speed"):
            resolve_run(TrainConfig(), "test_bad_run_defaults")
    finally:
        unregister_objective("test_bad_run_defaults")


def test_bad_dapo_loop_settings_fail_with_one_clear_message():
    with pytest.raises(ValueError, match="--max-generation-rounds must be >= 1"):
        TrainConfig(max_generation_rounds=0)
    with pytest.raises(ValueError, match="--overlong-buffer must be >= 0"):
        TrainConfig(overlong_buffer=-1)
    with pytest.raises(ValueError, match="--overlong-penalty must be >= 0"):
        TrainConfig(overlong_penalty=-0.5)


# ------------------------------------------------------------------------------ in the loop


class ByPrompt(Addition):
    """Even answers: always reward 1 (a uniform group); odd ones: reward 1 for an even-length reply."""

    def check(self, completion, row):
        if int(row["answer"]) % 2 == 0:
            return Score(1.0, None, None)
        ok = len(completion) % 2 == 0
        return Score(float(ok), None if ok else "Even length, please.", None)


RUN = dict(model="tiny", max_new_tokens=6, num_generations=4, prompts_per_step=2, micro_batch_size=4, eval_size=1,
           progress=False, lr=1e-3)


@pytest.mark.slow
def test_a_dapo_step_trains_on_varied_groups_with_the_overlong_penalty(tmp_path):
    cfg = TrainConfig(objective="dapo", steps=1, max_generation_rounds=6, output_dir=str(tmp_path / "r"), **RUN)
    trainer = Trainer(cfg, task=ByPrompt(), log=lambda *a: None)
    seen = []
    real = trainer.signals.per_sample

    def spy(rollout, rows, scores):
        seen.append((rollout, rows, scores))
        return real(rollout, rows, scores)

    trainer.signals.per_sample = spy
    row = trainer.step(0)
    (rollout, rows, scores), = seen
    assert rollout.num_samples == 8 and len(rows) == 2
    assert row["generation_rounds"] >= 1 and row["groups_dropped"] == 2 * row["generation_rounds"] - 2
    raw = torch.tensor([s.score for s in scores.scores])
    expected_penalty = overlong_penalty(rollout.lengths, 6, 5, 1.0)
    assert torch.allclose(scores.overlong, expected_penalty) and torch.allclose(scores.rewards, raw + expected_penalty)
    assert row["overlong_penalty"] == pytest.approx(float(expected_penalty.mean()))
    assert row["reward_mean"] == pytest.approx(float(scores.rewards.mean()))
    if row["groups_filled"] == 0:  # every trained group has varied rewards (after shaping)
        assert varied_groups(scores.rewards, 4).all()


@pytest.mark.slow
def test_all_uniform_groups_use_every_round_and_train_on_the_fill_ins(tmp_path):
    class AlwaysRight(Addition):
        def check(self, completion, row):
            return Score(1.0, None, None)

    cfg = TrainConfig(objective="grpo", steps=1, dynamic_sampling=True, max_generation_rounds=3,
                      output_dir=str(tmp_path / "r"), **RUN)
    trainer = Trainer(cfg, task=AlwaysRight(), log=lambda *a: None)
    row = trainer.step(0)
    assert (row["generation_rounds"], row["groups_dropped"], row["groups_filled"]) == (3.0, 4.0, 2.0)
    assert row["loss"] == 0.0 and row["skipped"] == 0 and "overlong_penalty" not in row
