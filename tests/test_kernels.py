"""The chunked backend against the reference, and the reference against torch's own
functions. Fresh random inputs per test; odd shapes that are not multiples of any chunk."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import IGNORE, assert_close_to_reference, make_inputs, run

from denser.kernels import TokenStats, token_stats, token_stats_from_logits
from denser.kernels.memtrack import PeakMemory

N, H, V = 37, 19, 101  # odd: no block or chunk divides them
CHUNK = 8


# ---------------------------------------------------------------------------- chunked vs reference


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("teacher", ["shared", "separate"])
def test_chunked_matches_reference_full_vocab(gen, alpha, temperature, teacher):
    inp = make_inputs(gen, N, H, V, teacher=teacher)
    opts = dict(alpha=alpha, temperature=temperature, need_entropy=True)
    ref = run("reference", inp, **opts)
    got = run("chunked", inp, chunk_size=CHUNK, **opts)
    assert_close_to_reference(got, ref, rtol_norm=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
@pytest.mark.parametrize("topk", [1, 7])
def test_chunked_matches_reference_topk(gen, alpha, add_tail, topk):
    inp = make_inputs(gen, N, H, V, teacher="shared")
    opts = dict(alpha=alpha, topk=topk, add_tail=add_tail, temperature=1.3, need_entropy=False)
    ref = run("reference", inp, **opts)
    got = run("chunked", inp, chunk_size=CHUNK, **opts)
    assert_close_to_reference(got, ref, rtol_norm=1e-5, atol=1e-5)


@pytest.mark.parametrize("need_entropy", [True, False])
def test_chunked_without_teacher_and_bias(gen, need_entropy):
    inp = make_inputs(gen, N, H, V, teacher=None, bias=False)
    ref = run("reference", inp, need_entropy=need_entropy)
    got = run("chunked", inp, chunk_size=CHUNK, need_entropy=need_entropy)
    assert ("entropy" in got) == need_entropy
    assert "divergence" not in got
    assert_close_to_reference(got, ref, rtol_norm=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_chunked_half_precision_inputs(gen, dtype, alpha):
    inp = make_inputs(gen, N, H, V, dtype=dtype, teacher="shared")
    opts = dict(alpha=alpha, need_entropy=True, temperature=0.9)
    ref = run("reference", inp, **opts)
    got = run("chunked", inp, chunk_size=CHUNK, **opts)
    assert got["logp"].dtype == torch.float32
    # bf16 logits round to ~3 significant digits; a wrong formula is off by O(1)
    assert_close_to_reference(got, ref, rtol_norm=3e-2, atol=6e-2)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_chunked_finite_on_peaked_logits(alpha):
    # large logits: p_s and p_t underflow to 0 on most of the vocabulary, so does the JSD mixture
    inp = make_inputs(torch.Generator().manual_seed(3), 37, 23, 69, teacher="shared", scale=10.0)
    ref = run("reference", inp, alpha=alpha, need_entropy=True)
    got = run("chunked", inp, chunk_size=8, alpha=alpha, need_entropy=True)
    assert_close_to_reference(got, ref, rtol_norm=1e-4, atol=1e-4)


def test_chunk_size_does_not_change_results(gen):
    inp = make_inputs(gen, N, H, V)
    a = run("chunked", inp, chunk_size=1, need_entropy=True)
    b = run("chunked", inp, chunk_size=N + 5, need_entropy=True)
    assert_close_to_reference(a, b, rtol_norm=1e-5, atol=1e-5)


def test_masked_tokens_get_zero_stats_and_no_gradient(gen):
    inp = make_inputs(gen, N, H, V, masked=0)
    inp["targets"][:] = IGNORE
    got = run("chunked", inp, chunk_size=CHUNK, need_entropy=True)
    for k in ("logp", "entropy", "divergence", "d_hidden", "d_weight", "d_bias"):
        assert got[k].abs().max().item() == 0.0, k


def test_teacher_is_stop_gradient(gen):
    inp = make_inputs(gen, N, H, V, teacher="separate")
    inp["teacher_hidden"].requires_grad_()
    inp["teacher_weight"].requires_grad_()
    run("chunked", inp, chunk_size=CHUNK)
    assert inp["teacher_hidden"].grad is None and inp["teacher_weight"].grad is None


# ----------------------------------------------------------------- the reference, independently


def _logits(gen, n=23, v=31, scale=2.0):
    return torch.randn(n, v, generator=gen, dtype=torch.float64) * scale


def test_reference_logp_and_entropy_match_torch(gen):
    z = _logits(gen)
    y = torch.randint(0, z.shape[1], (z.shape[0],), generator=gen)
    s = token_stats_from_logits(z, y, need_entropy=True, temperature=0.8)
    dist = torch.distributions.Categorical(logits=z / 0.8)
    torch.testing.assert_close(s.logp, dist.log_prob(y).float())
    torch.testing.assert_close(s.entropy, dist.entropy().float())
    torch.testing.assert_close(s.logp, -F.cross_entropy(z / 0.8, y, reduction="none").float())


def test_reference_kl_end_points_match_kl_div(gen):
    zs, zt = _logits(gen), _logits(gen)
    y = torch.zeros(zs.shape[0], dtype=torch.long)
    ls, lt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)
    fwd = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)  # KL(t || s)
    rev = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)  # KL(s || t)
    s0 = token_stats_from_logits(zs, y, teacher_logits=zt, alpha=0.0)
    s1 = token_stats_from_logits(zs, y, teacher_logits=zt, alpha=1.0)
    torch.testing.assert_close(s0.divergence, fwd.float())
    torch.testing.assert_close(s1.divergence, rev.float())
    assert (fwd - rev).abs().max() > 1e-2  # the two directions really differ on these inputs


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9])
def test_reference_jsd_matches_mixture_formula(gen, alpha):
    zs, zt = _logits(gen), _logits(gen)
    y = torch.zeros(zs.shape[0], dtype=torch.long)
    ps, pt = F.softmax(zs, -1), F.softmax(zt, -1)
    m = (1 - alpha) * ps + alpha * pt
    kl = lambda p, q: (p * (p / q).log()).sum(-1)  # noqa: E731
    expected = (1 - alpha) * kl(ps, m) + alpha * kl(pt, m)
    got = token_stats_from_logits(zs, y, teacher_logits=zt, alpha=alpha).divergence
    torch.testing.assert_close(got, expected.float())
    if alpha == 0.5:  # the symmetric JSD, bounded by log 2
        assert (got <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize("add_tail", [True, False])
def test_reference_topk_matches_hand_built_distributions(gen, add_tail):
    zs, zt = _logits(gen, n=5, v=12), _logits(gen, n=5, v=12)
    y = torch.zeros(5, dtype=torch.long)
    k = 4
    got = token_stats_from_logits(zs, y, teacher_logits=zt, alpha=0.0, topk=k, add_tail=add_tail).divergence
    ps, pt = F.softmax(zs, -1), F.softmax(zt, -1)
    for i in range(5):
        top = torch.argsort(zs[i], descending=True)[:k]
        a, b = ps[i, top], pt[i, top]
        if add_tail:
            a, b = torch.cat([a, 1 - a.sum()[None]]), torch.cat([b, 1 - b.sum()[None]])
        else:
            a, b = a / a.sum(), b / b.sum()
        expected = (b * (b / a).log()).sum()  # KL(teacher || student) on the support
        assert abs(got[i].item() - expected.item()) < 1e-5


def test_divergence_is_zero_when_teacher_equals_student(gen):
    z = _logits(gen)
    y = torch.zeros(z.shape[0], dtype=torch.long)
    for alpha in (0.0, 0.4, 1.0):
        d = token_stats_from_logits(z, y, teacher_logits=z.clone(), alpha=alpha).divergence
        assert d.abs().max() < 1e-6


# --------------------------------------------------------------------------------------- memory


def _peak(backend, n, v=2000, h=16, chunk=32):
    g = torch.Generator().manual_seed(n)
    hid = torch.randn(n, h, generator=g).requires_grad_()
    w = torch.randn(v, h, generator=g).requires_grad_()
    th = torch.randn(n, h, generator=g)
    y = torch.randint(0, v, (n,), generator=g)
    with PeakMemory() as m:
        s = token_stats(hid, w, y, teacher_hidden=th, need_entropy=True, alpha=0.5, backend=backend, chunk_size=chunk)
        (s.logp.sum() + s.entropy.sum() + s.divergence.sum()).backward()
    return m.peak_bytes


def test_chunked_peak_memory_grows_with_chunk_not_with_n():
    v, h, chunk = 2000, 16, 32
    small, large = _peak("chunked", 128), _peak("chunked", 2048)
    tile = chunk * v * 4
    per_token_bytes = (large - small) / (2048 - 128)
    # per token only O(H) floats (dH rows, a few per-token scalars), never O(V)
    assert per_token_bytes < 4 * (2 * h + 16), per_token_bytes
    assert large < 16 * tile + 2 * v * h * 4 + 2048 * (2 * h + 16) * 4
    assert _peak("chunked", 512, chunk=128) > _peak("chunked", 512, chunk=16)
    # the reference, for contrast, holds several [N, V] tensors
    assert _peak("reference", 512) > 3 * 512 * v * 4


# ------------------------------------------------------------------------------------ bad input


def _ok(gen):
    return dict(hidden=torch.randn(5, 4, generator=gen), weight=torch.randn(9, 4, generator=gen),
                targets=torch.randint(0, 9, (5,), generator=gen))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(weight=torch.randn(9, 3)), "weight must be \\[V, 4\\]"),
        (dict(hidden=torch.randn(5)), "hidden must be a 2-D"),
        (dict(targets=torch.zeros(4, dtype=torch.long)), "targets must be a 1-D tensor of 5"),
        (dict(targets=torch.tensor([0, 1, 2, 3, 9])), "outside the vocabulary \\[0, 9\\)"),
        (dict(targets=torch.tensor([0, 1, 2, 3, -1])), "outside the vocabulary"),
        (dict(targets=torch.zeros(5)), "integer token ids"),
        (dict(teacher_hidden=torch.randn(4, 4)), "teacher_hidden must be \\[N=5"),
        (dict(teacher_hidden=torch.randn(5, 4), teacher_weight=torch.randn(8, 4)), "teacher's vocabulary \\(8\\) differs"),
        (dict(teacher_hidden=torch.randn(5, 6)), "width 6"),
        (dict(teacher_weight=torch.randn(9, 4)), "teacher_weight was given without teacher_hidden"),
        (dict(alpha=1.5, teacher_hidden=torch.randn(5, 4)), "alpha=1.5 must be in \\[0, 1\\]"),
        (dict(alpha=-0.1), "alpha=-0.1"),
        (dict(topk=0, teacher_hidden=torch.randn(5, 4)), "topk=0 must be an int in \\[1, vocab size 9\\]"),
        (dict(topk=10, teacher_hidden=torch.randn(5, 4)), "topk=10"),
        (dict(topk=3), "no teacher was given"),
        (dict(temperature=float("nan")), "temperature=nan must be a finite number > 0"),
        (dict(temperature=float("inf")), "temperature=inf"),
        (dict(temperature=0.0), "temperature=0.0"),
        (dict(backend="cuda-magic"), "backend='cuda-magic' is unknown"),
        (dict(chunk_size=0), "chunk_size=0 must be a positive int"),
        (dict(bias=torch.randn(8)), "bias must be \\[V=9\\]"),
        (dict(hidden=torch.randn(5, 4, dtype=torch.float64)), "must share one floating dtype"),
    ],
)
def test_bad_input_raises_clear_error(gen, change, match):
    args = _ok(gen)
    args.update({k: v for k, v in change.items() if k in args})
    kwargs = {"backend": "chunked", **{k: v for k, v in change.items() if k not in args}}
    with pytest.raises(ValueError, match=match):
        token_stats(args["hidden"], args["weight"], args["targets"], **kwargs)


def test_triton_backend_without_gpu_says_what_to_do(gen, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = _ok(gen)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        token_stats(a["hidden"], a["weight"], a["targets"], backend="triton")


def test_from_logits_rejects_mismatched_teacher_vocab(gen):
    with pytest.raises(ValueError, match="teacher's vocabulary \\(7\\) differs"):
        token_stats_from_logits(torch.randn(3, 8), torch.zeros(3, dtype=torch.long), teacher_logits=torch.randn(3, 7))


def test_auto_is_chunked_on_cpu(gen):
    from denser.kernels import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    a = _ok(gen)
    s = token_stats(a["hidden"], a["weight"], a["targets"])
    assert isinstance(s, TokenStats) and s.entropy is None and s.divergence is None
