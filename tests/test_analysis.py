"""denser.analysis against hand-computed cases: CL measures, parameter drift, response drift, artifacts."""

import math

import pytest
import torch

from denser.analysis import (
    ParameterDrift,
    answer_markers,
    artifact_rates,
    average_accuracy,
    average_forgetting,
    backward_transfer,
    continual_metrics,
    forgetting,
    forgetting_all_earlier_stages,
    forward_transfer,
    has_repeated_answer,
    learning_gain,
    mean_similarity,
    module_kind,
    parameter_drift,
    repeated_ngram_rate,
    response_similarity,
    subspace_angle_overlap,
    token_drift,
    token_f1,
    top_left_singular,
)
from denser.analysis.responses import Generations

# ------------------------------------------------------------------------------ accuracy matrix

# rows: initial, after task 1, after task 2, after task 3; columns: tasks 1-3, then one held-out task
R = [
    [0.2, 0.1, 0.3, 0.5],
    [0.8, 0.2, 0.3, 0.4],
    [0.6, 0.9, 0.4, 0.45],
    [0.5, 0.7, 0.7, 0.3],
]


def test_average_accuracy_by_hand():
    acc = average_accuracy(R, 3)
    assert acc[0] is None
    assert acc[1:] == pytest.approx([0.8, (0.6 + 0.9) / 2, (0.5 + 0.7 + 0.7) / 3])


def test_forgetting_is_best_earlier_minus_current():
    F = forgetting(R, 3)
    assert F[0] == [None, None, None] and F[1] == [None, None, None]
    assert F[2][0] == pytest.approx(0.8 - 0.6) and F[2][1:] == [None, None]
    assert F[3][0] == pytest.approx(max(0.8, 0.6) - 0.5)
    assert F[3][1] == pytest.approx(max(0.2, 0.9) - 0.7)
    assert F[3][2] is None  # the last task cannot have been forgotten yet
    assert average_forgetting(R, 3) == [None, None, pytest.approx(0.2), pytest.approx((0.3 + 0.2) / 2)]


def test_forgetting_ignores_the_initial_model_for_training_tasks():
    # Chaudhry et al.: l runs over 1..k-1 (after training), not over the untrained initial model
    M = [[0.9, 0.0], [0.5, 0.0], [0.4, 0.0]]
    assert forgetting(M, 2)[2][0] == pytest.approx(0.1)


# task 2 rose to 0.8 in stage 1, before it was trained, and training it (stage 2) left it at 0.6
M2 = [
    [0.5, 0.4, 0.3],
    [0.9, 0.8, 0.3],
    [0.7, 0.6, 0.5],
    [0.6, 0.5, 0.9],
]


def test_standard_forgetting_starts_at_the_stage_that_trained_the_task():
    F = forgetting(M2, 3)
    assert F[2][0] == pytest.approx(0.9 - 0.7)
    assert F[3][0] == pytest.approx(0.9 - 0.6)
    assert F[3][1] == pytest.approx(0.6 - 0.5)  # from stage 2 on: stage 1's 0.8 came before training task 2
    assert average_forgetting(M2, 3) == [None, None, pytest.approx(0.2), pytest.approx((0.3 + 0.1) / 2)]


def test_all_earlier_stages_forgetting_counts_stages_before_training():
    F = forgetting_all_earlier_stages(M2, 3)
    assert F[3][0] == pytest.approx(0.9 - 0.6)
    assert F[3][1] == pytest.approx(0.8 - 0.5)  # stage 1's 0.8 counts
    assert average_forgetting(M2, 3, "all_earlier")[3] == pytest.approx((0.3 + 0.3) / 2)
    m = continual_metrics(M2, ["a", "b", "c"])
    assert m["forgetting_definition"] == "since_trained"
    assert m["final_average_forgetting"] == pytest.approx(0.2)
    assert m["final_average_forgetting_all_earlier"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown forgetting definition"):
        average_forgetting(M2, 3, "best")


def test_matrix_measures_match_a_loop_reference_on_random_matrices():
    import numpy as np

    from denser.analysis.seeds import matrix_measures

    rng = np.random.default_rng(7)
    for T in (2, 3, 5):
        R = rng.integers(0, 49, size=(T + 1, T + 2)) / 48
        got = matrix_measures(R, T)

        def avg_f(k, first, R=R):  # plain loops, 1-based stages and tasks as in the papers
            return sum(max(R[l][j - 1] for l in range(first(j), k)) - R[k][j - 1] for j in range(1, k)) / (k - 1)

        assert float(got["forgetting"]) == pytest.approx(avg_f(T, lambda j: j), abs=1e-12)
        assert float(got["forgetting_all_earlier"]) == pytest.approx(avg_f(T, lambda j: 1), abs=1e-12)
        assert float(got["worst_forgetting"]) == pytest.approx(max(avg_f(k, lambda j: j) for k in range(2, T + 1)),
                                                               abs=1e-12)
        assert float(got["forgetting"]) == pytest.approx(average_forgetting(R.tolist(), T)[T], abs=1e-12)


def test_backward_and_forward_transfer_by_hand():
    assert backward_transfer(R, 3) == [None, None, pytest.approx(0.6 - 0.8),
                                       pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)]
    assert forward_transfer(R, 3) == pytest.approx(((0.2 - 0.1) + (0.4 - 0.3)) / 2)
    assert learning_gain(R, 3) == pytest.approx([0.8 - 0.2, 0.9 - 0.2, 0.7 - 0.4])


def test_continual_metrics_with_a_heldout_task():
    m = continual_metrics(R, ["a", "b", "c"], ["x"])
    assert m["final_average_accuracy"] == pytest.approx(1.9 / 3)
    assert m["final_average_forgetting"] == pytest.approx(0.25)
    assert m["final_backward_transfer"] == pytest.approx(-0.25)
    assert m["forgetting"]["a"] == [None, None, pytest.approx(0.2), pytest.approx(0.3)]
    assert m["max_forgetting"] == {"a": pytest.approx(0.3), "b": pytest.approx(0.2), "c": None}
    assert m["heldout"]["x"]["delta"] == pytest.approx([0.0, -0.1, -0.05, -0.2])
    # held out: the initial model counts as an earlier point (the capability existed before training)
    assert m["heldout"]["x"]["forgetting"][1:] == pytest.approx([0.1, 0.05, 0.2])
    assert m["heldout_mean_accuracy"] == pytest.approx([0.5, 0.4, 0.45, 0.3])


def test_matrix_shape_errors():
    with pytest.raises(ValueError, match="rows"):
        average_accuracy(R[:3], 3)
    with pytest.raises(ValueError, match="columns"):
        continual_metrics(R, ["a", "b", "c"], [])


# ------------------------------------------------------------------------------ parameter drift


def _rotation(n, i, j, degrees):
    t = math.radians(degrees)
    Q = torch.eye(n, dtype=torch.float64)
    Q[i, i], Q[i, j], Q[j, i], Q[j, j] = math.cos(t), -math.sin(t), math.sin(t), math.cos(t)
    return Q


def test_identical_weights_have_zero_drift():
    W = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    state = {"model.layers.0.self_attn.q_proj.weight": W, "model.norm.weight": torch.ones(5)}
    d = parameter_drift(state, {k: v.clone() for k, v in state.items()}, rank=3)
    assert d["relative_l2"] == 0.0 and d["cosine"] == pytest.approx(1.0)
    assert d["spectral"]["max_angle_deg"] == 0.0 and d["spectral"]["mean_overlap"] == pytest.approx(1.0)
    U, _ = top_left_singular(W, 3)
    angle, overlap = subspace_angle_overlap(U, U.clone())
    assert angle == pytest.approx(0.0, abs=1e-6) and overlap == pytest.approx(1.0)


@pytest.mark.parametrize("shape", [(4, 4), (6, 3), (3, 6)])
def test_rotated_subspace_gives_the_known_angle(shape):
    m, n = shape
    W0 = torch.zeros(m, n, dtype=torch.float64)
    for i, s in enumerate((5.0, 3.0, 1.0)[: min(m, n)]):
        W0[i, i] = s
    # top-2 left subspace of W0 is span(e0, e1); rotate e1 towards e2 by 30 degrees in the output space
    W = _rotation(m, 1, 2, 30.0) @ W0
    U0, _ = top_left_singular(W0, 2)
    U, _ = top_left_singular(W, 2)
    angle, overlap = subspace_angle_overlap(U, U0)
    assert angle == pytest.approx(30.0, abs=1e-6)
    assert overlap == pytest.approx((1.0 + math.cos(math.radians(30.0)) ** 2) / 2, abs=1e-9)
    # the same through the drift meter (not the unchanged-matrix shortcut)
    d = parameter_drift({"x.mlp.w": W}, {"x.mlp.w": W0}, rank=2)
    assert d["spectral"]["matrices"]["x.mlp.w"]["angle_deg"] == pytest.approx(30.0, abs=1e-6)
    assert d["spectral"]["matrices"]["x.mlp.w"]["gap"] == pytest.approx(3.0)  # sigma_2 / sigma_3


def test_orthogonal_subspaces_are_90_degrees_apart():
    U0 = torch.eye(4, dtype=torch.float64)[:, :2]
    U = torch.eye(4, dtype=torch.float64)[:, 2:]
    angle, overlap = subspace_angle_overlap(U, U0)
    assert angle == pytest.approx(90.0) and overlap == pytest.approx(0.0)


def test_scaling_changes_l2_but_not_direction_or_subspace():
    W0 = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    d = parameter_drift({"a.self_attn.w": 2 * W0}, {"a.self_attn.w": W0}, rank=2)
    assert d["relative_l2"] == pytest.approx(1.0)
    assert d["cosine"] == pytest.approx(1.0)
    assert d["spectral"]["max_angle_deg"] == pytest.approx(0.0, abs=1e-5)


def test_relative_l2_and_cosine_per_module_kind():
    g = torch.Generator().manual_seed(2)
    init = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g, dtype=torch.float64),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g, dtype=torch.float64),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g, dtype=torch.float64),
        "model.layers.0.input_layernorm.weight": torch.ones(4, dtype=torch.float64),
    }
    mlp0 = init["model.layers.0.mlp.up_proj.weight"]
    delta = torch.randn(8, 4, generator=g, dtype=torch.float64)
    delta *= 0.5 * mlp0.norm() / delta.norm()  # ||delta|| = 0.5 ||W0_mlp||
    cur = dict(init, **{"model.layers.0.mlp.up_proj.weight": mlp0 + delta})
    d = parameter_drift(cur, init, spectral=False)
    assert d["spectral"] is None
    assert d["by_kind"]["mlp"]["relative_l2"] == pytest.approx(0.5)
    assert d["by_kind"]["attention"]["relative_l2"] == 0.0
    assert d["by_kind"]["embeddings"]["relative_l2"] == 0.0 and d["by_kind"]["norms"]["relative_l2"] == 0.0
    flat0 = torch.cat([t.flatten() for t in init.values()])
    flat = torch.cat([t.flatten() for t in cur.values()])
    assert d["relative_l2"] == pytest.approx(float((flat - flat0).norm() / flat0.norm()))
    assert d["cosine"] == pytest.approx(float(flat @ flat0 / (flat.norm() * flat0.norm())))
    mlp = mlp0 + delta
    assert d["by_kind"]["mlp"]["cosine"] == pytest.approx(float((mlp * mlp0).sum() / (mlp.norm() * mlp0.norm())))


def test_module_kinds_of_llama_names():
    assert module_kind("model.layers.3.self_attn.k_proj.weight") == "attention"
    assert module_kind("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert module_kind("model.layers.3.post_attention_layernorm.weight") == "norms"
    assert module_kind("model.norm.weight") == "norms"
    assert module_kind("model.embed_tokens.weight") == "embeddings"
    assert module_kind("lm_head.weight") == "embeddings"
    assert module_kind("transformer.h.0.attn.c_attn.weight") == "attention"
    assert module_kind("score.weight") == "other"


def test_drift_meter_on_a_model_counts_tied_weights_once():
    from denser.trainers.models import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    meter = ParameterDrift(model, rank=4)
    same = meter(model)
    assert same["relative_l2"] == 0.0 and same["spectral"]["max_angle_deg"] == 0.0
    assert same["spectral"]["num_matrices"] == sum(1 for p in model.parameters() if p.dim() == 2)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    moved = meter(model)
    assert moved["by_kind"]["mlp"]["relative_l2"] > 0 and moved["by_kind"]["attention"]["relative_l2"] == 0.0
    with pytest.raises(ValueError, match="same architecture"):
        meter({"other.weight": torch.ones(2, 2)})


# ------------------------------------------------------------------------------ artifacts


def test_two_boxed_answers_count_once_as_repeated():
    text = "First \\boxed{3}, no wait, \\boxed{4}."
    assert answer_markers(text) == 2 and has_repeated_answer(text)
    rates = artifact_rates([text, "Answer: 5", "\\boxed{1}\\boxed{2}\\boxed{3}", "no marker"])
    assert rates["repeated_answer_rate"] == pytest.approx(2 / 4)  # each response counts once
    assert rates["mean_answer_markers"] == pytest.approx((2 + 1 + 3 + 0) / 4)
    assert rates["no_answer_rate"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("text, n", [
    ("Answer: 7", 1),
    ("Answer: \\boxed{7}", 1),  # a box inside the Answer: line is the same answer
    ("Answer:\n\\boxed{7}", 1),  # the answer on the next line (answers.py's rule)
    ("Answer: 5\nAnswer: 5", 2),
    ("3 + 4 = 7\n**Final answer:** 7", 1),
    ("\\boxed{7}\nAnswer: 7", 2),
    ("The banswer: 3", 0),  # a marker starts a word
    ("\\boxed{7", 0),  # an unclosed box is no answer
    ("", 0),
])
def test_answer_markers_follow_the_answer_format(text, n):
    assert answer_markers(text) == n


def test_repeated_ngram_rate_by_hand():
    assert repeated_ngram_rate("a b c a b c", 3) == pytest.approx(1 - 3 / 4)  # abc bca cab abc
    assert repeated_ngram_rate("a a a a", 1) == pytest.approx(1 - 1 / 4)
    assert repeated_ngram_rate("a b", 3) == 0.0
    assert repeated_ngram_rate("x y z w", 2) == 0.0


def test_artifact_rates_length_limit_and_length():
    rates = artifact_rates(["a", "b", "c", "d"], truncated=[True, False, False, True], lengths=[4, 2, 2, 4],
                           entropy=1.25)
    assert rates["length_limit_rate"] == pytest.approx(0.5)
    assert rates["mean_length"] == pytest.approx(3.0)
    assert rates["mean_entropy"] == 1.25
    assert artifact_rates(["a"])["length_limit_rate"] is None
    with pytest.raises(ValueError, match="truncation flags"):
        artifact_rates(["a"], truncated=[True, False])


# ------------------------------------------------------------------------------ response drift


def test_similarity_measures_by_hand():
    assert response_similarity("Answer: 7", "Answer: 7") == 1.0
    assert response_similarity("abc", "xyz") == 0.0
    assert response_similarity("abcd", "abce") == pytest.approx(2 * 3 / 8)
    assert response_similarity("ab", "ba") == pytest.approx(2 * 1 / 4)  # order matters (a bag of characters would say 1)
    assert response_similarity("", "") == 1.0
    assert token_f1("a b c", "a b d") == pytest.approx(2 / 3)
    assert token_f1("a a", "a") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert token_f1("x", "y") == 0.0
    m = mean_similarity(["abcd", "x"], ["abce", "x"])
    assert m["similarity"] == pytest.approx((0.75 + 1.0) / 2)


def _tiny_generations(tokenizer, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [tokenizer("hello there")["input_ids"], tokenizer("2 + 2 =")["input_ids"]]
    completions = [torch.randint(3, 259, (5,), generator=g).tolist(), torch.randint(3, 259, (3,), generator=g).tolist()]
    return Generations(prompt_ids=prompts, completion_ids=completions, texts=["", ""], truncated=[False, False])


def test_token_drift_is_zero_against_itself_and_matches_full_logits():
    from denser.engines.packing import build_packed_batch
    from denser.trainers.models import build_tiny_model

    cur, tok = build_tiny_model(seed=0)
    init, _ = build_tiny_model(seed=1)
    gens = _tiny_generations(tok)
    same = token_drift(cur, cur, gens, backend="reference")
    assert same["mean_kl"] == pytest.approx(0.0, abs=1e-6) and same["tokens"] == 8

    out = token_drift(cur, init, gens, batch_size=1)  # one sample per forward: batching must not matter
    batch = build_packed_batch(gens.prompt_ids, gens.completion_ids, pad_token_id=0)
    with torch.no_grad():
        kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
        logp = cur(**kw).logits[batch.predict_mask].log_softmax(-1)
        logq = init(**kw).logits[batch.predict_mask].log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)  # KL(current || initial) per token
    ent = -(logp.exp() * logp).sum(-1)
    assert out["mean_kl"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert out["mean_entropy"] == pytest.approx(float(ent.mean()), rel=1e-4)
    assert out["seq_kl"] == pytest.approx([float(kl[:5].mean()), float(kl[5:].mean())], rel=1e-4)
    assert out["seq_entropy"] == pytest.approx([float(ent[:5].mean()), float(ent[5:].mean())], rel=1e-4)
    only_entropy = token_drift(cur, None, gens)
    assert only_entropy["mean_kl"] is None
    assert only_entropy["mean_entropy"] == pytest.approx(out["mean_entropy"], rel=1e-5)


def test_top_eigenpairs_without_scipy_match_the_scipy_route(monkeypatch):
    import sys

    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    U_fast, s_fast = top_left_singular(W, 3)
    monkeypatch.setitem(sys.modules, "scipy.linalg", None)  # import scipy.linalg -> ImportError
    U_torch, s_torch = top_left_singular(W, 3)
    assert s_torch == pytest.approx(s_fast.tolist())
    assert s_torch[:3] == pytest.approx(torch.linalg.svdvals(W)[:3].tolist())
    angle, overlap = subspace_angle_overlap(U_torch, U_fast)
    assert angle == pytest.approx(0.0, abs=1e-5) and overlap == pytest.approx(1.0)
