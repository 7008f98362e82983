"""denser eval: the estimators against brute-force enumeration and hand computations, then the
command on the tiny model with fixed fake generations whose pass@k and maj@k are worked out by hand."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from collections import Counter
from fractions import Fraction
from math import comb

import pytest
import torch

from denser.analysis.estimators import majority_at_k, mean_stderr, pass_at_k, vote_groups
from denser.analysis.evaluation import default_ks, vote_key
from denser.cli import main
from denser.engines import HFRolloutEngine, Rollout
from denser.tasks import get_task

# ------------------------------------------------------------------------------------ estimators


def brute_pass(success, k):
    subsets = list(itertools.combinations(success, k))
    return sum(any(s) for s in subsets) / len(subsets)


def brute_maj(answers, success, k):
    """Average over every k-subset of the voted answer's correctness (ties split, no vote -> 0)."""
    total = 0.0
    subsets = list(itertools.combinations(range(len(answers)), k))
    for sub in subsets:
        votes = Counter(answers[i] for i in sub if answers[i] is not None)
        if not votes:
            continue
        top = max(votes.values())
        tied = [a for a, v in votes.items() if v == top]
        for a in tied:
            same = [i for i in range(len(answers)) if answers[i] == a]
            total += sum(success[i] for i in same) / len(same) / len(tied)
    return total / len(subsets)


def test_pass_at_k_by_hand_and_against_enumeration():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - Fraction(3, 6))  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(4, 2, 2) == pytest.approx(Fraction(5, 6))
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c / n
    assert pass_at_k(5, 0, 5) == 0.0 and pass_at_k(5, 1, 5) == 1.0 and pass_at_k(5, 4, 2) == 1.0
    rng = random.Random(1)
    for _ in range(200):
        n = rng.randint(1, 9)
        success = [rng.random() < 0.4 for _ in range(n)]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(success), k) == pytest.approx(brute_pass(success, k), abs=1e-12)


def test_majority_at_k_by_hand():
    # answers A (right), B, B, none; k = 2: {A,B} twice ties (1/2 each), {A,none} wins, the rest lose
    votes, accuracy, n = vote_groups(["A", "B", "B", None], [True, False, False, False])
    assert (votes, accuracy, n) == ([1, 2], [1.0, 0.0], 4)
    assert majority_at_k(votes, accuracy, n, 2) == pytest.approx(2 / 6)
    assert majority_at_k(votes, accuracy, n, 1) == pytest.approx(1 / 4)
    assert majority_at_k(votes, accuracy, n, 4) == 0.0  # B has two votes, A one
    # k = 3: subsets {A,B,B} (B wins), {A,B1,none}, {A,B2,none} (ties: 1/2 each), {B,B,none}: (0 + 1/2 + 1/2 + 0) / 4
    assert majority_at_k(votes, accuracy, n, 3) == pytest.approx(0.25)
    # an answer whose completions are judged differently counts with its success fraction
    votes, accuracy, n = vote_groups(["7", "7", "8"], [True, False, False])
    assert accuracy == [0.5, 0.0] and majority_at_k(votes, accuracy, n, 3) == pytest.approx(0.5)
    assert majority_at_k([], [], 3, 2) == 0.0  # nobody answered


def test_majority_at_k_against_enumeration():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        answers = [rng.choice([None, "a", "b", "c"]) for _ in range(n)]
        success = [a == "a" or (a == "b" and rng.random() < 0.5) for a in answers]
        votes, accuracy, _ = vote_groups(answers, success)
        for k in range(1, n + 1):
            assert majority_at_k(votes, accuracy, n, k) == pytest.approx(brute_maj(answers, success, k), abs=1e-12)


def test_estimator_arguments_are_checked():
    with pytest.raises(ValueError, match=r"k must be in \[1, n=4\]"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c \\(correct samples\\)"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="votes must be positive"):
        majority_at_k([3, 2], [1.0, 0.0], 4, 2)


def test_mean_stderr_is_the_standard_error_over_prompts():
    values = [0.5, 0.25, 0.0, 1.0, 0.75]
    mean, se = mean_stderr(values)
    assert mean == pytest.approx(statistics.fmean(values))
    assert se == pytest.approx(statistics.stdev(values) / len(values) ** 0.5)
    assert mean_stderr([0.3]) == (0.3, None) and mean_stderr([]) == (None, None)


def test_vote_keys_and_default_ks():
    assert vote_key("7") == vote_key("7.0") == vote_key("x = 7") != vote_key("8")
    assert vote_key("Ann") == vote_key(" ann ") and vote_key(None) is None and vote_key("  ") is None
    assert default_ks(8) == [1, 2, 4, 8] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]


# --------------------------------------------------------------------------- the command, faked

ROWS = 3


def answers_of(task_name: str, seed: int) -> list[str]:
    return [get_task(task_name, seed=seed).eval[i]["answer"] for i in range(ROWS)]


def fake_texts(answers: list[str], greedy: bool) -> list[list[str]]:
    """Per prompt: the greedy reply, or the 4 sampled replies (x, y, z: wrong answers)."""
    out = []
    for p, a in enumerate(answers):
        x, y, z = (f"Answer: {int(a) + d}" for d in (100, 200, 300))
        right = f"Answer: {a}"
        if greedy:
            out.append([[right], [y], ["I do not know"]][p])
        else:
            out.append([[right, right, x, "no answer here"], [y, y, right, z], ["hmm"] * 4][p])
    return out


@pytest.fixture
def fake_generate(monkeypatch):
    calls = []

    def generate(self, prompt_ids, params, *, seeds=None, seed=None, stop=None):
        calls.append((params, seed, len(prompt_ids)))
        per_prompt = fake_texts(answers_of(generate.task, generate.seed), greedy=not params.do_sample)
        texts = [t for p in range(len(prompt_ids)) for t in per_prompt[p % ROWS]]
        assert len(texts) == len(prompt_ids) * params.num_generations
        ids = [[3] * max(1, len(t)) for t in texts]
        return Rollout(prompt_ids=[list(p) for p in prompt_ids], completion_ids=ids, texts=texts,
                       logps=[torch.zeros(len(i)) for i in ids], truncated=torch.zeros(len(texts), dtype=torch.bool),
                       num_generations=params.num_generations, params=params, pad_token_id=0)

    generate.task, generate.seed = "addition", 0  # what the fake's answers are right for
    monkeypatch.setattr(HFRolloutEngine, "generate", generate)
    return generate, calls


def test_eval_on_fixed_generations_matches_hand_computation(tmp_path, capsys, fake_generate):
    generate, calls = fake_generate
    generate.seed = 3  # --seed draws the task's rows too
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "tiny", "--tasks", "addition", "--eval-size", str(ROWS), "--samples", "4",
                 "--k", "1,2,4", "--temperature", "0.6", "--top-p", "0.95", "--seed", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    greedy, sampled = calls
    assert not greedy[0].do_sample and greedy[0].num_generations == 1
    assert (sampled[0].num_generations, sampled[0].temperature, sampled[0].top_p, sampled[1]) == (4, 0.6, 0.95, 3)
    # per prompt, worked out by hand from fake_texts:
    #   prompt 0: right, right, x, (no answer)   prompt 1: y, y, right, z   prompt 2: no answers
    expected = {
        "greedy": [1, 0, 0],
        "mean@4": [Fraction(2, 4), Fraction(1, 4), 0],
        "pass@1": [Fraction(2, 4), Fraction(1, 4), 0],
        "pass@2": [1 - Fraction(comb(2, 2), comb(4, 2)), 1 - Fraction(comb(3, 2), comb(4, 2)), 0],  # 5/6, 1/2
        "pass@4": [1, 1, 0],
        "maj@1": [Fraction(2, 4), Fraction(1, 4), 0],  # one sample votes alone: the right ones win
        # prompt 0 pairs: (r,r) 1, (r,x) 1/2 twice, (r,-) 1 twice, (x,-) 0 -> 4/6; prompt 1: (y,r) and (r,z)
        # ties 1/2 each, (y,y) y wins, the rest 0 -> (1/2 + 1/2 + 1/2) / 6
        "maj@2": [Fraction(4, 6), Fraction(3, 2) / 6, 0],
        "maj@4": [1, 0, 0],  # right 2 vs x 1; y 2 vs right 1
    }
    metrics = result["tasks"]["addition"]["metrics"]
    assert list(metrics) == list(expected) and result["tasks"]["addition"]["prompts"] == ROWS
    for name, values in expected.items():
        values = [float(v) for v in values]
        assert metrics[name]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12), name
        assert metrics[name]["stderr"] == pytest.approx(statistics.stdev(values) / ROWS ** 0.5, abs=1e-12), name
    assert "overall" not in result
    table = printed.splitlines()
    assert table[1].split() == ["task", "prompts", *expected]
    assert table[2].split()[:5] == ["addition", "3", "0.333", "±", "0.333"]


def test_eval_of_a_checkpoint_defaults_to_its_run_task(tmp_path, capsys, fake_generate):
    """A checkpoint directory or its model/ resolves to the model; the run's task is the default."""
    from denser.trainers.models import load_model

    generate, _ = fake_generate
    generate.task = "compare"
    run = tmp_path / "run"
    model_dir = run / "checkpoints" / "step-000002" / "model"
    model, tokenizer = load_model("tiny", seed=0)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    (run / "checkpoints" / "step-000002" / "COMPLETE").write_text("2")
    (run / "config.yaml").write_text("objective: grpo\nmodel: tiny\ntask: compare\n")
    for spec in (run, model_dir.parent, model_dir):
        out = tmp_path / "e.json"
        assert main(["eval", "--model", str(spec), "--eval-size", str(ROWS), "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["model_path"] == str(model_dir) and list(result["tasks"]) == ["compare"]
        assert result["tasks"]["compare"]["metrics"]["greedy"]["mean"] == pytest.approx(1 / 3)
    capsys.readouterr()


def test_eval_pools_several_tasks(tmp_path, capsys, fake_generate):
    out = tmp_path / "e.json"
    assert main(["eval", "--model", "tiny", "--tasks", "addition,addition?seed=0&num_eval=5", "--eval-size",
                 str(ROWS), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["overall"]["prompts"] == 2 * ROWS
    assert result["overall"]["metrics"]["greedy"]["mean"] == pytest.approx(1 / 3)
    assert result["overall"]["metrics"]["greedy"]["stderr"] == pytest.approx(statistics.stdev([1, 0, 0] * 2) / 6 ** 0.5)
    assert "all " in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["--samples", "4", "--k", "5"], "--k 5 is outside [1, --samples 4]"),
    (["--k", "2"], "--k needs --samples N"),
    (["--no-greedy"], "nothing to measure"),
    (["--samples", "2", "--temperature", "0"], "--temperature must be > 0"),
    (["--samples", "2", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--k", "two"], "argument --k: 'two' is not a comma-separated list of integers"),
    (["--tasks", "nope"], "unknown task 'nope'"),
    (["--tasks", "addition,addition"], "lists a task twice"),
    (["--model", "/nonexistent/model"], "not a model name"),
    (["--max-new-tokens", "5000"], "exceeds the model's context"),
])
def test_bad_eval_input_is_one_line_before_compute(monkeypatch, capsys, argv, needle):
    def generate(*a, **k):
        raise AssertionError("generation started: the error should have come before any compute")

    monkeypatch.setattr(HFRolloutEngine, "generate", generate)
    code = main(["eval", "--model", "tiny", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("denser eval: error: "), err
    assert needle in err[0], err
