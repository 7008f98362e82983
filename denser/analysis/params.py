"""Parameter drift of a model from its initial weights.

For the flattened parameter vectors ``theta`` (now) and ``theta0`` (initial):

- **relative L2 distance** ``||theta - theta0|| / ||theta0||``, over all parameters and per module
  kind (:func:`module_kind`: attention, mlp, embeddings, norms, other);
- **cosine similarity** ``<theta, theta0> / (||theta|| ||theta0||)`` (1 = same direction);
- **spectral drift** of every weight matrix ``W`` (2-D parameter, ``[out, in]`` as stored): with
  ``U`` and ``U0`` the top-``r`` left singular vectors of ``W`` and ``W0`` (``r`` = ``rank``, at
  most ``min(out, in)``),

  * the largest principal angle between ``span(U)`` and ``span(U0)``:
    ``theta_max = arcsin ||(I - U U^T) U0||_2`` (equivalently ``arccos`` of the smallest singular
    value of ``U^T U0``; the ``arcsin`` form is exact near 0, where drift is small), in degrees;
  * the subspace overlap ``||U^T U0||_F^2 / r`` in [0, 1] (1 = same subspace, 0 = orthogonal;
    the mean of ``cos^2`` of all r principal angles).

  The subspace of a matrix whose ``r``-th and ``r+1``-th singular values are (nearly) equal is
  not well defined, so a small weight change can rotate it a lot; the per-matrix spectral gap
  ``sigma_r / sigma_{r+1}`` of the initial matrix is recorded so such matrices can be spotted.

Tied parameters (SmolLM2 ties ``lm_head`` to ``embed_tokens``) are counted once, under the name
``named_parameters()`` gives them. Everything is computed in float64 on the CPU.

Sharded models (FSDP2: parameters are DTensors) are measured one parameter at a time: each is
gathered whole (``full_tensor()``, a collective every process takes part in, in the same order),
measured and dropped, so no process ever holds a whole model; the initial weights of a sharded
initial model are not copied but gathered again at each measurement. The numbers are those of the
same weights unsharded.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor

MODULE_KINDS = ("attention", "mlp", "embeddings", "norms", "other")
DEFAULT_RANK = 16


def module_kind(name: str) -> str:
    """The module kind of a parameter name (HF Llama/Mistral/Qwen/GPT-2 style names).

    ``embeddings``: token/position embeddings and the output head (``lm_head``, which is the
    embedding matrix itself when tied); ``norms``: every LayerNorm/RMSNorm weight and bias;
    ``attention``: ``self_attn``/``attn``/``attention`` projections; ``mlp``: the feed-forward block.
    """
    n = name.lower()
    parts = n.split(".")
    if any("norm" in p or p in ("ln_1", "ln_2", "ln_f") for p in parts):
        return "norms"
    if "lm_head" in n or "embed" in n or any(p in ("wte", "wpe") for p in parts):
        return "embeddings"
    if any(p in ("self_attn", "attn", "attention", "cross_attn") for p in parts):
        return "attention"
    if any(p in ("mlp", "feed_forward", "ffn", "block_sparse_moe") for p in parts):
        return "mlp"
    return "other"


def named_tensors(model_or_state) -> dict[str, Tensor]:
    """``{name: tensor}`` of a module's (deduplicated) parameters, or of a state dict as given."""
    if isinstance(model_or_state, torch.nn.Module):
        return {n: p.detach() for n, p in model_or_state.named_parameters()}
    if isinstance(model_or_state, Mapping) and not isinstance(model_or_state, dict):
        return model_or_state  # a mapping that computes each tensor when read (LoRA's effective weights)
    if isinstance(model_or_state, Mapping):
        return {n: t.detach() for n, t in model_or_state.items()}
    raise TypeError(f"expected an nn.Module or a mapping of name -> tensor, got {type(model_or_state).__name__}")


def _is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _whole(t: Tensor) -> Tensor:
    """``t`` in float64 on the CPU, gathered whole when it is sharded (a collective)."""
    t = t.detach()
    if _is_sharded(t):
        t = t.full_tensor()
    return t.to("cpu", torch.float64)


def top_left_singular(W: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``(U_r [m, r], sigma)`` of ``W [m, n]`` in float64: the top-r left singular vectors and the
    r + 1 largest singular values, descending.

    Computed from the smaller Gram matrix (``W^T W`` when m > n, else ``W W^T``) with ``eigh``,
    which is exact for the leading singular vectors and much cheaper than a full SVD of a tall
    embedding matrix.
    """
    W = W.detach().to("cpu", torch.float64)
    if W.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(W.shape)}")
    m, n = W.shape
    r = min(r, m, n)
    gram = W @ W.T if m <= n else W.T @ W
    evals, evecs = _top_eigh(gram, r + 1)  # descending; one more value than needed for the spectral gap
    if m <= n:
        U = evecs[:, :r]
    else:
        sigma_r = evals[:r].clamp_min(0).sqrt()
        U = (W @ evecs[:, :r]) / sigma_r.clamp_min(torch.finfo(torch.float64).tiny)
        U, _ = torch.linalg.qr(U)  # re-orthonormalise (tiny singular values lose orthogonality)
    return U, evals.clamp_min(0).sqrt()


def _top_eigh(gram: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest eigenpairs of a symmetric matrix, descending. SciPy's subset solver
    (LAPACK ``syevr``) when SciPy is installed: it skips the other eigenvectors, several times
    faster on the 576x576 Gram matrices of a 135M model; else ``torch.linalg.eigh``."""
    n = gram.shape[0]
    k = min(k, n)
    try:
        import scipy.linalg
    except ImportError:
        evals, evecs = torch.linalg.eigh(gram)
        return evals.flip(0)[:k], evecs.flip(1)[:, :k]
    w, v = scipy.linalg.eigh(gram.numpy(), subset_by_index=[n - k, n - 1], driver="evr")
    return torch.from_numpy(w.copy()).flip(0), torch.from_numpy(v.copy()).flip(1)


def subspace_angle_overlap(U: Tensor, U0: Tensor) -> tuple[float, float]:
    """``(largest principal angle in degrees, overlap ||U^T U0||_F^2 / r)`` of two orthonormal
    bases ``[m, r]`` (see the module docstring)."""
    if U.shape != U0.shape:
        raise ValueError(f"subspace bases differ in shape: {tuple(U.shape)} vs {tuple(U0.shape)}")
    U, U0 = U.to(torch.float64), U0.to(torch.float64)
    r = U.shape[1]
    cross = U.T @ U0
    residual = U0 - U @ cross  # (I - U U^T) U0
    sin_max = float(torch.linalg.matrix_norm(residual, ord=2)) if residual.numel() else 0.0
    angle = math.degrees(math.asin(min(max(sin_max, 0.0), 1.0)))
    overlap = float((cross ** 2).sum()) / r
    return angle, overlap


class ParameterDrift:
    """Drift measures of any later weights against fixed initial weights.

    The initial side (norms, singular subspaces) is computed once, so measuring a sequence of
    checkpoints costs one eigendecomposition per matrix per checkpoint::

        meter = ParameterDrift(initial_model, rank=16)
        meter(current_model)   # -> dict (see ``measure``)
    """

    def __init__(self, initial, *, rank: int = DEFAULT_RANK, spectral: bool = True):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank, self.spectral = int(rank), bool(spectral)
        tensors = named_tensors(initial)
        # a sharded initial model is kept as it is (its parameters, gathered when used), else a float64 copy
        self.lazy = any(_is_sharded(t) for t in tensors.values())  # read (gathered) when used, not copied
        self.initial = tensors if self.lazy else {n: t.to("cpu", torch.float64, copy=True)
                                                  for n, t in tensors.items()}
        self.bases: dict[str, Tensor] = {}
        self.gaps: dict[str, float | None] = {}
        if self.spectral:
            for name, t in self.initial.items():
                if t.dim() == 2 and min(t.shape) >= 2:
                    U0, s0 = top_left_singular(_whole(t), self.rank)
                    r = U0.shape[1]
                    self.bases[name] = U0
                    self.gaps[name] = float(s0[r - 1] / s0[r]) if r < s0.numel() and s0[r] > 0 else None

    def reads(self, initial) -> None:
        """Read the initial weights from ``initial`` from now on (a module or mapping that holds exactly
        them, e.g. a LoRA policy's base: ``trainers.lora.effective_weights(policy, adapters=False)``),
        dropping the copy; ``None`` drops it until the next call. The subspaces stay those computed."""
        self.initial, self.lazy = (named_tensors(initial) if initial is not None else {}), True

    def __call__(self, current) -> dict:
        return self.measure(current)

    def measure(self, current) -> dict:
        """Drift of ``current`` (a module or state dict with the initial's parameter names).

        Returns ``{"relative_l2", "cosine", "by_kind": {kind: {"relative_l2", "cosine", "numel"}},
        "spectral": {"rank", "mean_angle_deg", "max_angle_deg", "mean_overlap", "min_overlap",
        "by_kind": {kind: {"mean_angle_deg", "max_angle_deg", "mean_overlap"}},
        "matrices": {name: {"kind", "angle_deg", "overlap", "gap"}}}`` (``spectral`` is None when off).
        """
        cur = named_tensors(current)
        missing = sorted(set(self.initial) - set(cur))
        if missing:
            raise ValueError(f"the current weights lack {len(missing)} initial parameters, e.g. {missing[:3]}; "
                             "parameter drift needs the same architecture")
        sums = {k: [0.0, 0.0, 0.0, 0.0, 0] for k in (*MODULE_KINDS, "all")}  # diff^2, w0^2, w^2, <w, w0>, numel
        matrices = {}
        for name, W0 in self.initial.items():  # one parameter at a time (gathered, when sharded)
            if tuple(cur[name].shape) != tuple(W0.shape):  # (every process alike: shapes are global)
                raise ValueError(f"parameter {name}: shape {tuple(cur[name].shape)} vs initial {tuple(W0.shape)}")
            W, W0 = _whole(cur[name]), _whole(W0) if self.lazy else W0
            vals = (float(((W - W0) ** 2).sum()), float((W0 ** 2).sum()), float((W ** 2).sum()),
                    float((W * W0).sum()), W0.numel())
            for key in (module_kind(name), "all"):
                for i, v in enumerate(vals):
                    sums[key][i] += v
            if self.spectral and name in self.bases:
                matrices[name] = self._matrix(name, W, W0)
            del W, W0

        def summary(s):
            d2, n0, n1, dot, numel = s
            rel = math.sqrt(d2) / math.sqrt(n0) if n0 > 0 else (0.0 if d2 == 0 else math.inf)
            cos = dot / math.sqrt(n0 * n1) if n0 > 0 and n1 > 0 else (1.0 if d2 == 0 else 0.0)
            return {"relative_l2": rel, "cosine": cos, "numel": numel}

        overall = summary(sums["all"])
        out = {"relative_l2": overall["relative_l2"], "cosine": overall["cosine"],
               "by_kind": {k: summary(sums[k]) for k in MODULE_KINDS if sums[k][4] > 0}, "spectral": None}
        if self.spectral:
            out["spectral"] = self._spectral(matrices)
        return out

    def _matrix(self, name: str, W: Tensor, W0: Tensor) -> dict:
        """The spectral drift of one weight matrix (``W``, ``W0``: whole, float64)."""
        if torch.equal(W, W0):
            angle, overlap = 0.0, 1.0  # unchanged matrix: the same subspace, no eigendecomposition needed
        else:
            U, _ = top_left_singular(W, self.rank)
            angle, overlap = subspace_angle_overlap(U, self.bases[name])
        return {"kind": module_kind(name), "angle_deg": angle, "overlap": overlap, "gap": self.gaps[name]}

    def _spectral(self, matrices: dict[str, dict]) -> dict:
        by_kind = {}
        for kind in MODULE_KINDS:
            rows = [m for m in matrices.values() if m["kind"] == kind]
            if rows:
                by_kind[kind] = {"mean_angle_deg": sum(m["angle_deg"] for m in rows) / len(rows),
                                 "max_angle_deg": max(m["angle_deg"] for m in rows),
                                 "mean_overlap": sum(m["overlap"] for m in rows) / len(rows)}
        vals = list(matrices.values())
        return {
            "rank": self.rank,
            "num_matrices": len(vals),
            "mean_angle_deg": sum(m["angle_deg"] for m in vals) / len(vals) if vals else 0.0,
            "max_angle_deg": max((m["angle_deg"] for m in vals), default=0.0),
            "mean_overlap": sum(m["overlap"] for m in vals) / len(vals) if vals else 1.0,
            "min_overlap": min((m["overlap"] for m in vals), default=1.0),
            "by_kind": by_kind,
            "matrices": matrices,
        }


def parameter_drift(current, initial, *, rank: int = DEFAULT_RANK, spectral: bool = True) -> dict:
    """Drift of ``current`` from ``initial`` (modules or state dicts); see :class:`ParameterDrift`."""
    return ParameterDrift(initial, rank=rank, spectral=spectral).measure(current)
