"""The training loop's eval: greedy and sampled accuracy with standard errors, and the run settings
that default to the task (max_new_tokens, eval_size)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from denser.engines.base import Rollout, request_seed
from denser.tasks import Score, get_task
from denser.tasks.builtin import Addition
from denser.trainers.config import EVAL_SIZE_CAP, TrainConfig
from denser.trainers.evaluation import eval_metrics, format_eval
from denser.trainers.loop import Trainer
from denser.trainers.resolve import resolve_run
from denser.trainers.scoring import score_rollout


class FirstDigitTask(Addition):
    """Success iff the reply's first character is the digit the row says (set below): a scripted engine decides."""

    def check(self, completion, row):
        ok = completion.startswith("yes")
        return Score(float(ok), None, None)


class ScriptedEngine:
    """Replies 'yes' / 'no' by a fixed table per (prompt index, sample): a fake rollout engine."""

    name = "scripted"

    def __init__(self, greedy: list[bool], sampled: list[list[bool]]):
        self.greedy, self.sampled, self.seeds = greedy, sampled, []

    def generate(self, prompt_ids, params, *, seeds=None, seed=None, stop=None):
        n = params.num_generations
        table = [[g] for g in self.greedy] if not params.do_sample else self.sampled
        if params.do_sample:
            self.seeds.append(seeds)
        texts = [("yes" if table[p][j] else "no") for p in range(len(prompt_ids)) for j in range(n)]
        S = len(texts)
        return Rollout(prompt_ids=[list(p) for p in prompt_ids], completion_ids=[[1]] * S, texts=texts,
                       logps=[torch.zeros(1)] * S, truncated=torch.zeros(S, dtype=torch.bool), num_generations=n,
                       params=params, pad_token_id=0)

    def update_weights(self, model):
        pass


class ParityAddition(Addition):
    """Reward 1 for an even-length reply: the random tiny model succeeds on some samples, so some get a teacher."""

    def check(self, completion, row):
        ok = len(completion) % 2 == 0
        return Score(float(ok), None, None)


def _cfg(tmp_path, **kw):
    base = dict(model="tiny", steps=1, max_new_tokens=4, num_generations=2, prompts_per_step=1, eval_size=5,
                progress=False, output_dir=str(tmp_path / "run"), objective="grpo")
    return TrainConfig(**{**base, **kw})


def test_eval_metrics_match_a_hand_computation():
    greedy = [1.0, 0.0, 1.0, 1.0, 0.0]
    sampled = [0.75, 0.25, 1.0, 0.5, 0.0]
    m = eval_metrics(greedy, sampled)
    # mean 0.6; sample variance ((.4^2)*3 + (.6^2)*2) / 4 = 0.3; se = sqrt(0.3 / 5)
    assert m["eval_accuracy"] == pytest.approx(0.6)
    assert m["eval_accuracy_se"] == pytest.approx(math.sqrt(0.3 / 5))
    # mean 0.5; deviations .25 -.25 .5 0 -.5: squares sum 0.625; var 0.15625; se sqrt(0.15625 / 5)
    assert m["eval_mean_at_n"] == pytest.approx(0.5)
    assert m["eval_mean_at_n_se"] == pytest.approx(math.sqrt(0.15625 / 5))
    assert eval_metrics([]) == {"eval_accuracy": 0.0, "eval_accuracy_se": None}
    assert format_eval(m, 4) == f"0.600 ± {math.sqrt(0.06):.3f}; mean@4 0.500 ± {math.sqrt(0.03125):.3f}"


def test_sampled_eval_on_a_scripted_rollout(tmp_path):
    greedy = [True, False, True, True, False]
    sampled = [[True, True, True, False], [False, False, True, False], [True] * 4, [True, False, True, False],
               [False] * 4]
    trainer = Trainer(_cfg(tmp_path, eval_samples=4), task=FirstDigitTask(), log=lambda *a: None)
    engine = ScriptedEngine(greedy, sampled)
    trainer.engine = engine
    m = trainer.evaluate_all()
    per_prompt = [sum(s) / 4 for s in sampled]
    mean = sum(per_prompt) / 5
    se = math.sqrt(sum((v - mean) ** 2 for v in per_prompt) / 4 / 5)
    assert m["eval_accuracy"] == pytest.approx(0.6)
    assert m["eval_accuracy_se"] == pytest.approx(math.sqrt(0.3 / 5))
    assert m["eval_mean_at_n"] == pytest.approx(mean)
    assert m["eval_mean_at_n_se"] == pytest.approx(se)
    # sampled eval is seeded per eval row, request_seed(seed, row), as `denser eval` seeds it
    assert engine.seeds == [[request_seed(trainer.cfg.seed, i) for i in range(5)]]


def test_sampled_eval_is_deterministic_and_leaves_the_training_rng_alone(tmp_path):
    trainer = Trainer(_cfg(tmp_path, eval_samples=3, eval_size=3), task=get_task("addition"), log=lambda *a: None)
    calls = []
    real = trainer.engine.generate

    def spy(prompt_ids, params, **kw):
        out = real(prompt_ids, params, **kw)
        calls.append(out.completion_ids)
        return out

    trainer.engine.generate = spy
    state = torch.random.get_rng_state()
    first = trainer.evaluate_all()
    assert torch.equal(torch.random.get_rng_state(), state)
    second = trainer.evaluate_all()
    assert first == second
    assert calls[1] == calls[3]  # the same sampled completions, token for token
    assert set(first) == {"eval_accuracy", "eval_accuracy_se", "eval_mean_at_n", "eval_mean_at_n_se"}


def test_train_logs_standard_errors_and_sampled_accuracy(tmp_path):
    lines = []
    Trainer(_cfg(tmp_path, eval_samples=2, eval_size=3), log=lines.append).train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in (rows[0], rows[-1]):
        assert {"eval_accuracy", "eval_accuracy_se", "eval_mean_at_n", "eval_mean_at_n_se"} <= set(r)
    before = next(x for x in lines if x.startswith("eval accuracy before training"))
    assert "±" in before and "(addition, 3 greedy prompts); mean@2" in before and "temperature 0.6, top-p 0.95" in before
    assert "±" in next(x for x in lines if x.startswith("eval accuracy after"))


def test_run_settings_default_to_the_task():
    task = get_task("addition")
    assert task.suggested_max_new_tokens == 32
    cfg = resolve_run(TrainConfig(), task=task).config
    assert cfg.max_new_tokens == 32
    assert cfg.eval_size == min(len(task.eval), EVAL_SIZE_CAP) == 50
    explicit = resolve_run(TrainConfig(max_new_tokens=24, eval_size=32), task=task).config
    assert (explicit.max_new_tokens, explicit.eval_size) == (24, 32)
    big = get_task("arithmetic")
    assert resolve_run(TrainConfig(), task=big).config.eval_size == min(len(big.eval), EVAL_SIZE_CAP)
    assert resolve_run(TrainConfig(), task=big).config.max_new_tokens == big.suggested_max_new_tokens


def test_trainer_resolves_max_new_tokens_from_the_task(tmp_path):
    trainer = Trainer(_cfg(tmp_path, max_new_tokens=0, eval_size=0), task=get_task("compare"), log=lambda *a: None)
    assert trainer.cfg.max_new_tokens == 32 and trainer.cfg.eval_size == min(100, EVAL_SIZE_CAP)  # compare: 100 eval rows
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "max_new_tokens: 32" in saved


@pytest.mark.parametrize("kw, flag", [(dict(eval_samples=-1), "--eval-samples"), (dict(eval_temperature=0.0), "--eval-temperature"),
                                      (dict(eval_top_p=1.5), "--eval-top-p"), (dict(max_new_tokens=-1), "--max-new-tokens"),
                                      (dict(eval_size=-2), "--eval-size")])
def test_bad_eval_settings_name_the_flag(kw, flag):
    with pytest.raises(ValueError, match=flag):
        TrainConfig(**kw)


def _entropy(logits):
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def test_teacher_and_student_entropy_on_tokens_with_a_teacher(tmp_path):
    from denser.engines.packing import completion_hidden_states, lm_head_params
    from denser.objectives import get_objective

    cfg = _cfg(tmp_path, objective="sdpo", num_generations=4, prompts_per_step=2, micro_batch_size=8,
               log_teacher_entropy=True, temperature=0.7)
    trainer = Trainer(cfg, get_objective("sdpo", teacher="live"), task=ParityAddition(), log=lambda *a: None)
    rows = trainer.prompts.rows_for_step(0)
    rollout = trainer._rollout(rows)
    scores = score_rollout(trainer.task, rollout, rows, trainer.cfg)
    sample = trainer.signals.per_sample(rollout, rows, scores)
    mb = trainer.batches.micro_batches(rollout, sample, list(range(rollout.num_samples)), 0)[0]
    teacher = trainer.signals.model_signals(rollout, mb)
    assert teacher.entropy is not None
    mb.batch.teacher_mask = mb.batch.teacher_mask.clone()
    mb.batch.teacher_mask[::3] = False  # samples without a teacher count nowhere
    w, _ = lm_head_params(trainer.policy)  # the tiny model's head has no bias
    with torch.no_grad():
        tpacked = rollout.pack(mb.indices, contexts=mb.teacher_contexts)
        h_t = completion_hidden_states(trainer.policy, tpacked)
        h_s = completion_hidden_states(trainer.policy, mb.packed)
        ref_t = _entropy((h_t @ w.T) / 0.7)
        ref_s = _entropy((h_s @ w.T) / 0.7)
    mask = mb.batch.teacher_mask[mb.batch.seq_ids]
    _, metrics = trainer.loss_module(mb.packed, trainer.objective, mb.batch, teacher, cfg.temperature, cfg.backend, None)
    for name, ref in (("teacher_entropy", ref_t), ("student_entropy", ref_s)):
        m = metrics[name]
        assert float(m.count) == float(mask.sum())
        assert float(m.sum / m.count) == pytest.approx(float(ref[mask].mean()), rel=1e-4), name


def test_probe_script_runs_on_the_tiny_model(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "experiments" / "probe_teacher_logp.py"
    spec = importlib.util.spec_from_file_location("probe_teacher_logp", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    assert probe.main(["--model", "tiny", "--prompts", "2"]) == 0
    out = capsys.readouterr().out
    assert "'Answer' in a correct reply" in out and "stop after a reply without 'Answer:'" in out and "±" in out
    result = probe.probe("tiny", 2)
    for case in ("Answer", "stop"):
        (s, _), (t, _), (d, _) = (result[case][k] for k in ("student", "teacher", "teacher_minus_student"))
        assert s < 0 and t < 0 and d == pytest.approx(t - s)
    # another task: one case, the first token of the one-line correct reply
    assert probe.main(["--model", "tiny", "--prompts", "2", "--task", "larger"]) == 0
    assert "first token of 'Answer: <answer>'" in capsys.readouterr().out
    result = probe.probe("tiny", 3, task_name="larger")
    assert result["task"] == "larger" and set(result) & {"Answer", "stop", "first"} == {"first"}
    (s, s_se), (t, _), (d, _) = (result["first"][k] for k in ("student", "teacher", "teacher_minus_student"))
    assert s < 0 and t < 0 and s_se is not None and d == pytest.approx(t - s)
