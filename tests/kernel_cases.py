"""Shared helpers for checking a loss-core backend against ``reference`` (used by the CPU and
Triton suites)."""

from __future__ import annotations

import torch

from denser.kernels import token_stats

IGNORE = -100


def make_inputs(gen, n, h, v, *, dtype=torch.float32, bias=True, teacher="shared", ht=None, masked=2, scale=1.0):
    """Random student/teacher inputs. ``teacher``: None | "shared" (teacher uses the student's
    head) | "separate" (its own weight of width ``ht``)."""
    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype)

    inp = {
        "hidden": rnd(n, h, s=scale).requires_grad_(),
        "weight": rnd(v, h, s=h ** -0.5 * 2).requires_grad_(),
        "bias": rnd(v, s=0.5).requires_grad_() if bias else None,
        "targets": torch.randint(0, v, (n,), generator=gen),
        "teacher_hidden": None,
        "teacher_weight": None,
    }
    if masked:
        idx = torch.randperm(n, generator=gen)[:masked]
        inp["targets"][idx] = IGNORE
    if teacher == "shared":
        inp["teacher_hidden"] = (inp["hidden"].detach().float() + 0.7 * torch.randn(n, h, generator=gen)).to(dtype)
    elif teacher == "separate":
        ht = ht or h + 3
        inp["teacher_hidden"] = rnd(n, ht, s=scale)
        inp["teacher_weight"] = rnd(v, ht, s=ht ** -0.5 * 2)
    return inp


def run(backend, inp, gen_seed=0, **opts):
    """Stats and gradients of a random linear combination of the outputs."""
    leaves = [inp["hidden"], inp["weight"]] + ([inp["bias"]] if inp["bias"] is not None else [])
    for t in leaves:
        t.grad = None
    stats = token_stats(inp["hidden"], inp["weight"], inp["targets"], bias=inp["bias"],
                        teacher_hidden=inp["teacher_hidden"], teacher_weight=inp["teacher_weight"],
                        backend=backend, **opts)
    g = torch.Generator().manual_seed(gen_seed)
    n = inp["hidden"].shape[0]
    outs = {"logp": stats.logp, "entropy": stats.entropy, "divergence": stats.divergence}
    loss = 0.0
    for t in outs.values():
        if t is not None:
            loss = loss + (t * torch.randn(n, generator=g)).sum()
    loss.backward()
    res = {k: v.detach() for k, v in outs.items() if v is not None}
    res["d_hidden"] = inp["hidden"].grad.float()
    res["d_weight"] = inp["weight"].grad.float()
    if inp["bias"] is not None:
        res["d_bias"] = inp["bias"].grad.float()
    return res


def assert_close_to_reference(got, ref, *, rtol_norm, atol):
    """Values elementwise within ``atol``; gradients within ``rtol_norm`` relative L2 error.

    The tolerances are far below what a wrong formula produces (errors of order 1)."""
    assert got.keys() == ref.keys()
    for k in ref:
        a, b = got[k].float(), ref[k].float()
        assert a.shape == b.shape, k
        assert torch.isfinite(a).all(), f"{k} has non-finite values"
        if k.startswith("d_"):
            rel = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
            assert rel < rtol_norm, f"{k}: relative L2 error {rel:.2e} >= {rtol_norm}"
        else:
            err = (a - b).abs().max().item()
            assert err < atol, f"{k}: max abs error {err:.2e} >= {atol}"
