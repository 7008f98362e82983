"""The Triton backends against ``reference``: values and gradients (hidden, weight, bias).

Without CUDA the kernels run under the Triton interpreter on CPU (``TRITON_INTERPRET=1``) at small
odd shapes; with CUDA the same tests run natively, plus the real-shape tests at the end (marked
``gpu``; skipped with the reason printed otherwise). Fresh random inputs per test (``gen``).

Interpreter mode is read when ``@triton.jit`` runs, i.e. when the Triton modules are imported:
``_import_triton_modules`` sets it for that import only (and re-imports the modules if another
test imported them in the other mode), and the ``_interpreter`` fixture sets it while each test of
this file runs, so other test files still see the environment they started with.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
_MODULES = ("triton_common", "triton_chunk_math", "triton_onchip", "triton_ops")


def _interpreted(triton) -> bool:
    return type(triton.language.zeros).__name__ == "InterpretedFunction"


def _import_triton_modules():
    """Import triton and the Triton backends in the mode this run needs (interpreter without CUDA).

    Returns the modules, or None when triton itself was already imported in the other mode by
    an earlier test module: its standard library (tl.zeros, tl.sum...) cannot be rebuilt in
    process, so the suite then runs in a subprocess (``test_interpreter_suite_in_subprocess``).
    """
    prev = os.environ.get("TRITON_INTERPRET")
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip("triton")
        if _interpreted(triton) != (not CUDA):
            return None
        mods = [importlib.import_module(f"denser.kernels.{m}") for m in _MODULES]
        if mods[0].INTERPRETED != (not CUDA):  # imported earlier in the other mode: rebuild the kernels
            mods = [importlib.reload(m) for m in mods]
        return mods
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev


_mods = _import_triton_modules()
IN_PROCESS = _mods is not None
triton_common, triton_chunk_math, triton_onchip, triton_ops = _mods or (None,) * 4
_SUBPROCESS_REASON = ("triton was imported without TRITON_INTERPRET by an earlier test module; this file's "
                      "tests run in a subprocess instead (test_interpreter_suite_in_subprocess)")

from kernel_cases import IGNORE, assert_close_to_reference, make_inputs, run  # noqa: E402

from denser.kernels import (
    chunk_math,  # noqa: E402
    token_stats,  # noqa: E402
)
from denser.kernels.options import CoreOptions  # noqa: E402

N, H, V = 37, 23, 69  # odd: no tile divides them (tiles are 16 wide under the interpreter)
CHUNK = 16
BACKENDS = ["triton_chunked", "triton_onchip"]
FP32 = dict(rtol_norm=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def _interpreter(request, monkeypatch):
    if not IN_PROCESS and request.node.originalname != "test_interpreter_suite_in_subprocess":
        pytest.skip(_SUBPROCESS_REASON)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.skipif(IN_PROCESS, reason="the Triton suite runs in this process")
def test_interpreter_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.abspath(__file__)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", here],
                         env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(here)))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]


def inputs(gen, n=N, h=H, v=V, **kw):
    """``make_inputs`` on the test device (leaves stay leaves)."""
    inp = make_inputs(gen, n, h, v, **kw)
    if CUDA:
        for k, t in inp.items():
            if isinstance(t, torch.Tensor):
                inp[k] = t.detach().to(DEVICE).requires_grad_(t.requires_grad)
    return inp


def run_backend(backend, inp, **opts):
    if backend.startswith("triton_chunked") or backend == "chunked":
        opts.setdefault("chunk_size", CHUNK)
    return run(backend, inp, **opts)


# ------------------------------------------------------------ Triton chunk math vs the PyTorch one


def _sweep_inputs(gen, c=11, v=67):
    zs = (torch.randn(c, v, generator=gen) * 3).to(DEVICE)
    zt = (torch.randn(c, v, generator=gen) * 3).to(DEVICE)
    y = torch.randint(0, v, (c,), generator=gen).to(DEVICE)
    y[4] = IGNORE
    g = [torch.randn(c, generator=gen).to(DEVICE) for _ in range(4)]
    return zs, zt, y, g


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sweeps_match_torch_sweeps(gen, alpha, temperature):
    zs, zt, y, (g_logp, g_ent, g_div, g_lse) = _sweep_inputs(gen)
    opts = CoreOptions(temperature, alpha, None, True, True, True, IGNORE)
    want = chunk_math.forward_sweep(zs.clone(), zt.clone(), y, opts, True)
    zs0, zt0 = zs.clone(), zt.clone()
    got = triton_chunk_math.forward_sweep(zs, zt, y, opts, True)
    assert torch.equal(zs, zs0) and torch.equal(zt, zt0), "the forward sweep must not modify the logits"
    for name in ("logp", "lse_s", "entropy", "lse_t", "divergence", "aux"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    dz_want = chunk_math.backward_sweep(zs.clone(), zt.clone(), y, want, g_logp, g_ent, g_div, g_lse, opts)
    buf = zs.clone()
    dz = triton_chunk_math.backward_sweep(buf, zt, y, got, g_logp, g_ent, g_div, g_lse, opts)
    assert dz.data_ptr() == buf.data_ptr(), "the backward sweep writes d logits over the fp32 logits"
    torch.testing.assert_close(dz, dz_want, rtol=1e-5, atol=1e-6)
    assert dz[4].abs().max().item() == 0.0, "ignored rows get no gradient"


@pytest.mark.parametrize("variant", ["student_only", "teacher_lse_only", "no_entropy_grad"])
def test_sweeps_partial_outputs(gen, variant):
    zs, zt, y, (g_logp, g_ent, g_div, g_lse) = _sweep_inputs(gen)
    teacher = variant != "student_only"
    opts = CoreOptions(1.2, 0.5, None, True, variant != "student_only", teacher, IGNORE)
    full = variant == "no_entropy_grad"
    t_in = zt if teacher else None
    want = chunk_math.forward_sweep(zs.clone(), None if t_in is None else t_in.clone(), y, opts, full)
    got = triton_chunk_math.forward_sweep(zs, t_in, y, opts, full)
    for name in ("logp", "lse_s", "entropy", "lse_t", "divergence", "aux"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    use_div = g_div if full else None
    dz_want = chunk_math.backward_sweep(zs.clone(), None if t_in is None else t_in.clone(), y, want, g_logp, None,
                                          use_div, g_lse, opts)
    dz = triton_chunk_math.backward_sweep(zs.clone(), t_in, y, got, g_logp, None, use_div, g_lse, opts)
    torch.testing.assert_close(dz, dz_want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- backends vs reference

# (alpha, temperature, need_entropy, teacher, bias): every alpha with entropy on and off, shared
# and separate teacher heads, with and without bias, T != 1
CASES = [
    (0.0, 1.0, True, "shared", True),
    (0.3, 0.7, True, "separate", False),
    (1.0, 1.3, False, "shared", False),
    (0.3, 1.0, False, "shared", True),
    (1.0, 0.7, True, "separate", True),
    (0.0, 1.3, False, "separate", False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "a{}-T{}-ent{}-{}-bias{}".format(*c))
def test_fp32_matches_reference(gen, backend, case):
    alpha, temperature, need_entropy, teacher, bias = case
    inp = inputs(gen, teacher=teacher, bias=bias, masked=3)
    opts = dict(alpha=alpha, temperature=temperature, need_entropy=need_entropy)
    ref = run("reference", inp, **opts)
    got = run_backend(backend, inp, **opts)
    assert ("entropy" in got) == need_entropy and "divergence" in got
    assert_close_to_reference(got, ref, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("need_entropy", [True, False])
def test_student_only(gen, backend, need_entropy):
    inp = inputs(gen, teacher=None, bias=need_entropy)
    ref = run("reference", inp, need_entropy=need_entropy, temperature=0.8)
    got = run_backend(backend, inp, need_entropy=need_entropy, temperature=0.8)
    assert "divergence" not in got and ("entropy" in got) == need_entropy
    assert_close_to_reference(got, ref, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_fused_half_precision(gen, dtype, alpha):
    # logits stay fp32 on chip: values are as exact as fp32; dz is rounded to the input dtype
    # before the dH/dW products (like the chunked path), ~3 significant digits
    inp = inputs(gen, dtype=dtype, teacher="separate" if alpha == 1.0 else "shared")
    opts = dict(alpha=alpha, need_entropy=True, temperature=0.9)
    ref = run("reference", inp, **opts)
    got = run_backend("triton_onchip", inp, **opts)
    assert got["logp"].dtype == torch.float32
    assert_close_to_reference(got, ref, rtol_norm=1e-2, atol=2e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_chunked_half_precision(gen, alpha):
    # the chunk's logits are rounded to bf16 by the matmul: compare with the reference loosely and
    # with the PyTorch chunked backend (same rounded logits) tightly
    inp = inputs(gen, dtype=torch.bfloat16, teacher="shared")
    opts = dict(alpha=alpha, need_entropy=True, temperature=0.9)
    ref = run("reference", inp, **opts)
    torch_chunked = run_backend("chunked", inp, **opts)
    got = run_backend("triton_chunked", inp, **opts)
    assert_close_to_reference(got, ref, rtol_norm=3e-2, atol=6e-2)
    assert_close_to_reference(got, torch_chunked, rtol_norm=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.3, 1.0])
@pytest.mark.parametrize("add_tail", [True, False])
def test_chunked_topk(gen, alpha, add_tail):
    inp = inputs(gen, teacher="shared")
    opts = dict(alpha=alpha, topk=5, add_tail=add_tail, temperature=1.3, need_entropy=True)
    ref = run("reference", inp, **opts)
    got = run_backend("triton_chunked", inp, **opts)
    assert_close_to_reference(got, ref, **FP32)


def test_fused_topk_falls_back_to_chunked(gen):
    inp = inputs(gen, teacher="separate")
    opts = dict(alpha=0.0, topk=4, add_tail=True)
    ref = run("reference", inp, **opts)
    triton_onchip._warn_topk.cache_clear()
    with pytest.warns(UserWarning, match="triton_chunked"):
        got = run("triton_onchip", inp, chunk_size=CHUNK, **opts)
    assert_close_to_reference(got, ref, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_tokens_get_zero_stats_and_no_gradient(gen, backend):
    inp = inputs(gen, masked=0)
    inp["targets"][:] = IGNORE
    got = run_backend(backend, inp, need_entropy=True, alpha=0.3)
    for k in ("logp", "entropy", "divergence", "d_hidden", "d_weight", "d_bias"):
        assert got[k].abs().max().item() == 0.0, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 7, 17), (3, 40, 5)], ids=["one-token", "vocab-below-one-tile"])
def test_tiny_edge_shapes(gen, backend, shape):
    n, h, v = shape  # fewer tokens, columns and features than one tile (masks on every axis)
    inp = inputs(gen, n, h, v, teacher="separate", masked=0)
    ref = run("reference", inp, alpha=0.5, need_entropy=True, temperature=0.8)
    got = run_backend(backend, inp, alpha=0.5, need_entropy=True, temperature=0.8)
    assert_close_to_reference(got, ref, **FP32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_peaked_distributions_stay_finite_and_exact(gen, backend, alpha):
    """Logits up to ~80: most probabilities underflow to 0 in fp32 (p log p, log m must not NaN)."""
    inp = inputs(gen, teacher="shared", scale=10.0)
    ref = run("reference", inp, alpha=alpha, need_entropy=True)
    got = run_backend(backend, inp, alpha=alpha, need_entropy=True)
    assert_close_to_reference(got, ref, rtol_norm=1e-4, atol=3e-5 * 80)


# ------------------------------------------------------------------------ the fused path's own knobs


def _fused(inp, blocks, loss_of, **opts):
    hidden, weight, bias = inp["hidden"], inp["weight"], inp["bias"]
    teacher = inp["teacher_hidden"]
    tw = inp["teacher_weight"] if inp["teacher_weight"] is not None else (weight.detach() if teacher is not None else None)
    tb = bias.detach() if (bias is not None and inp["teacher_weight"] is None and teacher is not None) else None
    core = CoreOptions(opts.get("temperature", 1.0), opts.get("alpha", 0.5), None, True,
                       opts.get("need_entropy", False), teacher is not None, IGNORE)
    stats = triton_onchip.token_stats(hidden, weight, inp["targets"], bias, teacher, tw, tb, core, blocks=blocks)
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss_of(stats), leaves)
    return stats, grads


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_fused_vocab_splits_and_waves(gen, alpha):
    """Several vocabulary ranges per token block (merged partial statistics) and fp32 accumulators
    in several waves give the reference's values and gradients, and the same bits every run."""
    inp = inputs(gen, teacher="shared", bias=True)
    k = inp["hidden"].shape[1]
    tiny = replace(triton_common.INTERPRETER_BLOCKS, target_programs=12, scratch_bytes=2 * 16 * k * 4)
    weights = torch.randn(3, N, generator=gen).to(DEVICE)
    loss_of = lambda s: (s.logp * weights[0] + s.entropy * weights[1] + s.divergence * weights[2]).sum()  # noqa: E731
    opts = dict(alpha=alpha, need_entropy=True, temperature=0.9)
    n_blocks = -(-N // tiny.block_n)
    splits, _ = triton_onchip._vocab_splits(n_blocks, V, tiny.fwd_block_v, tiny.target_programs)
    assert splits > 1
    stats, grads = _fused(inp, tiny, loss_of, **opts)
    stats2, grads2 = _fused(inp, tiny, loss_of, **opts)
    ref = run("reference", inp, gen_seed=0, **opts)  # only its values are used below
    torch.testing.assert_close(stats.logp, ref["logp"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.divergence, ref["divergence"], rtol=1e-4, atol=1e-4)
    for a, b in zip(grads, grads2):
        assert torch.equal(a, b), "the fused backward must be deterministic"
    # gradients against plain autograd through the reference with the same loss
    from denser.kernels import reference

    inp_ref = {k2: v for k2, v in inp.items()}
    leaves = [inp_ref["hidden"], inp_ref["weight"], inp_ref["bias"]]
    core = CoreOptions(0.9, alpha, None, True, True, True, IGNORE)
    rs = reference.token_stats(leaves[0], leaves[1], inp["targets"], leaves[2], inp["teacher_hidden"],
                               leaves[1].detach(), leaves[2].detach(), core)
    want = torch.autograd.grad(loss_of(rs), leaves)
    for a, b in zip(grads, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


@pytest.mark.parametrize("used", ["logp", "divergence", "entropy"])
def test_fused_unused_outputs_get_no_work(gen, used):
    """Only one output reaches the loss: the others' gradients are None in backward (no teacher
    recompute without a divergence gradient); the result still matches the reference."""
    inp = inputs(gen, teacher="separate", bias=True)
    opts = dict(alpha=1.0, need_entropy=True, temperature=1.1)
    loss_of = lambda s: (getattr(s, used) ** 2).sum()  # noqa: E731
    _, grads = _fused(inp, None, loss_of, **opts)
    from denser.kernels import reference

    core = CoreOptions(1.1, 1.0, None, True, True, True, IGNORE)
    rs = reference.token_stats(inp["hidden"], inp["weight"], inp["targets"], inp["bias"], inp["teacher_hidden"],
                               inp["teacher_weight"], None, core)
    want = torch.autograd.grad(loss_of(rs), [inp["hidden"], inp["weight"], inp["bias"]])
    for a, b in zip(grads, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_fused_rejects_blocks_too_small_for_tl_dot(gen):
    inp = inputs(gen, teacher=None)
    bad = replace(triton_common.INTERPRETER_BLOCKS, block_k=8)
    with pytest.raises(ValueError, match="block_k"):
        _fused(inp, bad, lambda s: s.logp.sum())


# ------------------------------------------------------------------ through fused_loss (Contract 1b)

FUSED_OBJECTIVES = [
    ("grpo", {"entropy_coef": 0.01, "kl_coef": 0.1}),
    ("sdpo", {"distill_mode": "full", "alpha": 0.3}),
    ("sdpo", {"distill_mode": "topk", "topk": 5, "alpha": 1.0}),
    ("hybrid", {"lam": 0.4, "distill_mode": "full", "alpha": 0.0}),
]


@pytest.mark.filterwarnings("ignore:backend='triton_onchip' computes the full-vocabulary")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, fields", FUSED_OBJECTIVES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(FUSED_OBJECTIVES)])
def test_fused_loss_matches_plain_reference_route(gen, backend, name, fields):
    """``fused_loss`` on a Triton backend: same loss and gradients as objective.loss on the reference."""
    from denser.kernels import fused_loss
    from denser.objectives import PolicyBatch, get_objective

    inp = inputs(gen, teacher="shared", bias=True, masked=3)
    lens = torch.tensor([5, 9, 1, 8, 14])  # sums to N
    seqs = len(lens)
    batch = PolicyBatch(
        seq_ids=torch.repeat_interleave(torch.arange(seqs), lens).to(DEVICE), num_seqs=seqs,
        global_tokens=float(N), global_seqs=float(seqs), token_mask=(inp["targets"] != IGNORE),
        rewards=torch.rand(seqs, generator=gen).to(DEVICE), advantages=torch.randn(seqs, generator=gen).to(DEVICE),
        old_logp=(-torch.rand(N, generator=gen) * 4 - 2).to(DEVICE), ref_logp=(-torch.rand(N, generator=gen) * 4 - 2).to(DEVICE),
        teacher_mask=torch.tensor([True, False, True, True, True]).to(DEVICE), norm_length=16.0,
    )
    objective = get_objective(name, **fields)
    teacher = inp["teacher_hidden"] if objective.core_options().need_divergence else None
    results = []
    for route in ("reference", backend):
        leaves = [inp["hidden"], inp["weight"], inp["bias"]]
        for t in leaves:
            t.grad = None
        out = fused_loss(*leaves[:2], inp["targets"], objective, batch, bias=leaves[2], teacher_hidden=teacher,
                         temperature=0.9, backend=route, chunk_size=CHUNK)
        out.loss.backward()
        results.append((out.loss.detach(), [t.grad.clone() for t in leaves]))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert ((a - b).norm() / b.norm().clamp_min(1e-12)).item() < 1e-4


# ---------------------------------------------------------------------------- backend "triton"


def test_triton_backend_through_public_api(gen):
    inp = inputs(gen, teacher="shared")
    ref = run("reference", inp, alpha=0.5, need_entropy=True)
    got = run("triton", inp, alpha=0.5, need_entropy=True, chunk_size=CHUNK)
    assert_close_to_reference(got, ref, **FP32)


def test_choose_triton_path_by_free_memory():
    cuda = torch.device("cuda")
    # 152k vocabulary, H=4096: the chunked path needs ~2.5 GB of fp32 dW plus its chunk tiles
    est = triton_ops.memory_estimates(16384, 4096, 151936, device=cuda if CUDA else torch.device("cpu"),
                                      chunk_size=512)
    assert est["chunked_bytes"] > 151936 * 4096 * 4
    kw = dict(chunk_size=512)
    if CUDA:
        assert triton_ops.choose_triton_path(16384, 4096, 151936, cuda, free_bytes=80 << 30, **kw) == "triton_chunked"
        assert triton_ops.choose_triton_path(16384, 4096, 151936, cuda, free_bytes=2 << 30, **kw) == "triton_onchip"
        why = triton_ops.explain_triton_path(16384, 4096, 151936, cuda, free_bytes=2 << 30, **kw)
        assert why.path == "triton_onchip" and why.chunked_bytes > why.free_bytes * triton_ops.FREE_MEMORY_SHARE
    else:  # no memory signal off CUDA: the faster path
        assert triton_ops.choose_triton_path(N, H, V, "cpu") == "triton_chunked"
    with pytest.raises(ValueError, match="not a Triton backend"):
        triton_ops.token_stats_impl("chunked")


# ----------------------------------------------------------------- compiles for a GPU, without one

_COMPILE_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from denser.kernels import triton_chunk_math as sw, triton_onchip as fl
    from denser.kernels.triton_common import Blocks

    FLOATS = ("inv_t", "alpha", "one_m_a", "log1m_a", "log_a")
    INPUTS = ("h_ptr", "w_ptr", "b_ptr", "th_ptr", "tw_ptr", "tb_ptr")

    def build(fn, consts, warps, inputs="*bf16"):
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name == "y_ptr":
                sig[name] = "*i64"
            elif name.endswith("_ptr"):
                sig[name] = inputs if name in INPUTS else "*fp32"
            else:
                sig[name] = "fp32" if name in FLOATS else "i32"
        # what the launcher specialises at real shapes: 16-aligned pointers, sizes and strides
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if name not in consts and name != "ignore_index" and sig[name] != "fp32"}
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3))
        assert "cubin" in k.asm, fn
        print(fn.__name__, consts.get("DIV_MODE", consts.get("KL_MODE")), "ok", flush=True)

    b = Blocks()
    for mode in (1, 3):
        build(sw._sweep_forward_kernel, dict(NEED_ENT=True, HAS_T=True, DIV_MODE=mode, ROWS=b.sweep_rows,
                                             BLOCK_V=b.sweep_block_v), b.sweep_warps)
    build(sw._sweep_backward_kernel, dict(NEED_ENT=True, DIV_MODE=3, ROWS=b.sweep_rows, BLOCK_V=b.sweep_block_v),
          b.sweep_warps)
    lin = lambda bv: dict(HAS_BIAS=True, T_HAS_BIAS=True, PRECISION="tf32", UPCAST=False, BLOCK_N=b.block_n,
                          BLOCK_V=bv, BLOCK_K=b.block_k)
    build(fl._forward_kernel, dict(NEED_ENT=True, HAS_T=True, KL_MODE=1, **lin(b.fwd_block_v)), b.warps)
    build(fl._jsd_kernel, lin(b.fwd_block_v), b.warps)
    build(fl._dhidden_kernel, dict(NEED_ENT=True, DIV_MODE=3, **lin(b.block_v)), b.warps)
    build(fl._dweight_kernel, dict(NEED_DW=True, NEED_DB=True, NEED_ENT=True, DIV_MODE=2, **lin(b.block_v)), b.warps)
    fp32 = dict(lin(b.block_v), PRECISION="ieee")  # fp32 inputs: exact fp32 dot, as torch matmul by default
    build(fl._dhidden_kernel, dict(NEED_ENT=False, DIV_MODE=1, **fp32), b.warps, inputs="*fp32")
    """
)


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not check what the GPU compiler rejects (loop-carried types, dot
    shapes, layouts): compile the heaviest variant of every kernel, at the CUDA block sizes, to an
    sm_90 cubin. (``PTXAS_OPTIONS=-v TRITON_DUMP_PTXAS_LOG=1`` on the script shows registers/spills.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]


# ----------------------------------------------------------------------------- real shapes on a GPU

needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: the real-shape Triton tests run natively only")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_gpu_real_shapes_match_reference(gen, backend, dtype, alpha):
    n, h, v = 2053, 1024, 32003
    inp = inputs(gen, n, h, v, dtype=dtype, teacher="separate" if alpha == 0.5 else "shared", masked=40)
    opts = dict(alpha=alpha, need_entropy=True, temperature=0.9)
    ref = run("reference", inp, **opts)
    got = run(backend, inp, chunk_size=512 if backend == "triton_chunked" else None, **opts)
    if dtype == torch.float32:
        assert_close_to_reference(got, ref, rtol_norm=2e-4, atol=2e-3)
    elif backend == "triton_onchip":
        assert_close_to_reference(got, ref, rtol_norm=1.5e-2, atol=2e-3)
    else:
        assert_close_to_reference(got, ref, rtol_norm=3e-2, atol=8e-2)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("add_tail", [True, False])
def test_gpu_topk_real_shapes(gen, add_tail):
    inp = inputs(gen, 1031, 1024, 32003, teacher="shared")
    opts = dict(alpha=0.5, topk=100, add_tail=add_tail)
    ref = run("reference", inp, **opts)
    got = run("triton_chunked", inp, chunk_size=256, **opts)
    assert_close_to_reference(got, ref, rtol_norm=2e-4, atol=2e-3)


@pytest.mark.gpu
@needs_gpu
def test_gpu_fused_memory_is_bounded(gen):
    """The fused path's working memory does not grow with N x V (the reference's logits alone
    would be N x V x 4 bytes = 2 GiB here)."""
    n, h, v = 8192, 2048, 65536
    inp = inputs(gen, n, h, v, dtype=torch.bfloat16, teacher="shared", bias=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    stats = token_stats(inp["hidden"], inp["weight"], inp["targets"], teacher_hidden=inp["teacher_hidden"],
                        alpha=0.5, need_entropy=True, backend="triton_onchip")
    (stats.logp.sum() + stats.divergence.sum() + stats.entropy.sum()).backward()
    torch.cuda.synchronize()
    grads = inp["hidden"].grad.nbytes + inp["weight"].grad.nbytes
    extra = torch.cuda.max_memory_allocated() - base - grads
    assert extra < 600 * 2**20, f"fused path used {extra / 2**20:.0f} MiB beyond inputs and gradients"
