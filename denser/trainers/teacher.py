"""The teacher's weights: which model scores the teacher contexts, and how it follows the policy.

What the teacher is (how its contexts are built, which weights, the EMA or trust-region rate, the
model it starts from) is the objective's :class:`~denser.objectives.TeacherSpec`; this module
holds the weights that spec names and runs them on a packed batch (:meth:`TeacherWeights.outputs`):

- ``live``: the policy itself;
- ``ema``: a copy of the policy (or of ``spec.path``), ``teacher <- (1 - rate) * teacher + rate * policy``
  after every optimiser step (:meth:`TeacherWeights.update`);
- ``frozen``: the initial policy (or ``spec.path``), never updated;
- ``trust-region`` (SDPO's ``TrustRegionTeacher``): logits ``lerp(reference, policy, rate)``, both
  on the teacher context, the reference being what ``frozen`` would be. Written for the
  hidden-state loss core without logits: since ``z = h @ W.T + b`` is linear,
  ``(1 - rate) z_ref + rate z_pol = [(1 - rate) h_ref, rate h_pol] @ [W_ref, W_pol].T
  + (1 - rate) b_ref + rate b_pol``, a teacher whose hidden state and output weight are the two
  models' concatenated along H.

``spec.init_alpha < 1`` starts the teacher (the reference, for trust-region) at
``init_alpha * teacher + (1 - init_alpha) * policy``, parameter by parameter (SDPO-CL).

Under FSDP (:meth:`TeacherWeights.shard`) the teacher's model is sharded like the policy and runs
inside the forward of its root, which gathers the weights; the output layer it hands the loss core
is a copy taken there (the gathered weight is freed when that forward returns). An EMA teacher
updates shard by shard.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from denser.engines.packing import PackedBatch, completion_hidden_states, lm_head_params
from denser.objectives import TeacherSpec
from denser.objectives.teacher import TEACHER_MODES
from denser.trainers import checkpoint as ckpt
from denser.trainers.models import load_model
from denser.trainers.sharding import ModelCall, Sharding


@dataclass
class TeacherInputs:
    """What the loss core receives of the teacher: its hidden states at the completion tokens and
    its output layer (the core uses them when the objective's core options ask for a divergence)."""

    hidden: Tensor  # [N, H_teacher]
    weight: Tensor  # [V, H_teacher] (under FSDP a copy of the gathered weight)
    bias: Tensor | None
    entropy: Tensor | None = None  # [N] the teacher's entropy per token (--log-teacher-entropy), detached


def resolve_teacher_path(path: str) -> Path:
    """The model directory ``--teacher-path`` names: a Hugging Face model directory (``config.json``),
    a denser checkpoint (``<ckpt>/model``, or a LoRA checkpoint's merged model ``<ckpt>/merged``) or a
    denser run directory (its newest checkpoint's model). Raises ``ValueError`` naming the flag for anything else."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"--teacher-path {path}: no such directory; give a local Hugging Face model directory "
                         "(with config.json), a denser checkpoint directory or a denser run directory")
    if (p / "config.json").is_file():
        return p
    for ckpt_dir in (p, ckpt.latest_checkpoint(p)):  # a checkpoint, a run's newest; a LoRA run's merged model
        for sub in ("model", "merged"):
            if ckpt_dir is not None and (ckpt_dir / sub / "config.json").is_file():
                return ckpt_dir / sub
    raise ValueError(f"--teacher-path {path}: neither a Hugging Face model directory (no config.json), nor a "
                     "denser checkpoint (no model/config.json), nor a run directory with a complete checkpoint; a "
                     "LoRA checkpoint's model/ is an adapter: merge it (--merge-lora, or denser merge-lora) first")


def _vocab(model: nn.Module) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def _same_parameters(teacher: nn.Module, policy: nn.Module) -> str | None:
    """Why the two models cannot be mixed parameter by parameter, or None."""
    t, p = dict(teacher.named_parameters()), dict(policy.named_parameters())
    if list(t) != list(p):
        missing = sorted(set(p) ^ set(t))
        return f"their parameters differ ({missing[0] if missing else 'order'})"
    for name, value in t.items():
        if value.shape != p[name].shape:
            return f"parameter {name} has shape {tuple(value.shape)} in the teacher, {tuple(p[name].shape)} in the policy"
    return None


@torch.no_grad()
def interpolate_(teacher: nn.Module, policy: nn.Module, alpha: float) -> None:
    """``teacher <- alpha * teacher + (1 - alpha) * policy``, parameter by parameter, in place."""
    problem = _same_parameters(teacher, policy)
    if problem:
        raise ValueError(f"--teacher-init-alpha {alpha} mixes the teacher with the policy parameter by parameter, but "
                         f"{problem}; use a teacher of the policy's architecture or --teacher-init-alpha 1")
    for t, p in zip(teacher.parameters(), policy.parameters()):
        t.mul_(alpha).add_(p.detach().to(t.dtype), alpha=1.0 - alpha)


def _hidden(model: nn.Module, packed: PackedBatch) -> Tensor:
    was_training = model.training
    model.eval()
    try:
        return completion_hidden_states(model, packed)
    finally:
        model.train(was_training)


class TeacherWeights:
    """Which weights score the teacher context (see the module docstring).

    ``model`` is the teacher's own model: the policy for ``live``, the EMA copy, the frozen model,
    or the reference of ``trust-region`` (whose other half is ``policy``). ``TeacherWeights(policy,
    mode, rate)`` starts an ``ema``/``frozen``/``trust-region`` teacher from a copy of ``policy``
    (or from ``shared_frozen`` for ``frozen``/``trust-region``, or from ``weights``)."""

    def __init__(self, policy: nn.Module, mode: str, rate: float, shared_frozen: nn.Module | None = None, *,
                 weights: nn.Module | None = None):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher={mode!r} must be one of {', '.join(map(repr, TEACHER_MODES))}")
        self.mode, self.rate, self.policy = mode, float(rate), policy
        if mode == "live":
            self.model = policy
        elif weights is not None:
            self.model = weights
        elif mode in ("frozen", "trust-region") and shared_frozen is not None:
            self.model = shared_frozen
        else:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        self._joint: tuple[tuple, Tensor] | None = None  # trust-region: [W_ref, W_pol] and the versions it holds
        self.sharding: Sharding | None = None
        self._root: ModelCall | None = None  # under FSDP: the root whose forward gathers ``model``'s weights
        self._policy_root: ModelCall | None = None  # ... and the policy's (live, trust-region)

    @classmethod
    def from_spec(cls, spec: TeacherSpec, policy: nn.Module, initial: nn.Module | None = None, *,
                  start: nn.Module | None = None) -> "TeacherWeights":
        """The weights ``spec`` names.

        ``initial``: the initial model a ``frozen`` teacher and the ``trust-region`` reference share
        (not copied) when the caller has one loaded anyway; without it they start from a copy of
        ``start``. ``start``: the policy this run started from (default ``policy``), which
        ``spec.init_alpha < 1`` mixes in. ``spec.path`` replaces both as the teacher's starting point;
        its vocabulary (and, for an EMA teacher, its parameters) are checked against the policy's
        before anything is computed."""
        start = policy if start is None else start
        if spec.mode == "live":
            return cls(policy, "live", spec.update_rate)
        if spec.path:
            path = resolve_teacher_path(spec.path)
            with ckpt.quiet_transformers():
                weights, _ = load_model(str(path), dtype=next(policy.parameters()).dtype)
            if _vocab(weights) != _vocab(policy):
                raise ValueError(f"--teacher-path {spec.path}: its vocabulary ({_vocab(weights)}) differs from the "
                                 f"policy's ({_vocab(policy)}); token-level distillation needs one shared tokenizer")
            problem = _same_parameters(weights, policy) if spec.mode == "ema" else None
            if problem:
                raise ValueError(f"--teacher-path {spec.path}: an EMA teacher averages the policy into the teacher "
                                 f"parameter by parameter, but {problem}; use --teacher frozen or trust-region")
        elif spec.mode == "ema":
            weights = copy.deepcopy(policy)
        elif initial is not None:
            weights = initial
        else:
            weights = copy.deepcopy(start)
        if spec.init_alpha < 1.0:
            if weights is initial:  # shared with the reference model: mix a copy
                weights = copy.deepcopy(initial)
            interpolate_(weights, start, spec.init_alpha)
        return cls(policy, spec.mode, spec.update_rate, weights=weights.eval().requires_grad_(False))

    def shard(self, sharding: Sharding, *, policy_root: ModelCall, root_of: Callable[[nn.Module], ModelCall]) -> None:
        """Under FSDP: the teacher runs inside ``policy_root`` (``live``) or inside ``root_of(model)``,
        the root of its own model sharded like the policy (shared with the reference when it is the
        reference's model); ``trust-region``'s policy half inside ``policy_root``."""
        self.sharding, self._policy_root = sharding, policy_root
        self._root = policy_root if self.mode == "live" else root_of(self.model)

    def _forward(self, model: nn.Module, root: ModelCall | None, packed: PackedBatch) -> tuple[Tensor, Any, Any]:
        """``(hidden, lm_head weight, bias)`` of ``model`` on ``packed``; under FSDP run in ``root``."""
        if root is None:
            return (_hidden(model, packed), *lm_head_params(model))
        return Sharding.run(root, lambda m: (_hidden(m, packed), *map(Sharding.keep, lm_head_params(m))))

    # ---------------------------------------------------------------------------------- forward

    @torch.no_grad()
    def outputs(self, packed: PackedBatch) -> TeacherInputs:
        """The teacher's hidden states at the completion tokens of ``packed`` (teacher contexts) and
        its output layer; for ``trust-region`` the concatenation described in the module docstring."""
        hidden, weight, bias = self._forward(self.model, self._root, packed)
        if self.mode != "trust-region":
            return TeacherInputs(hidden, weight, bias)
        r = self.rate
        h_pol, w_pol, b_pol = self._forward(self.policy, self._policy_root, packed)
        hidden = torch.cat([(1.0 - r) * hidden, r * h_pol.to(hidden.dtype)], dim=-1)
        if bias is not None or b_pol is not None:
            bias = ((1.0 - r) * (bias if bias is not None else 0.0)
                    + r * (b_pol.detach().to(hidden.dtype) if b_pol is not None else 0.0))
        return TeacherInputs(hidden, self._joint_weight(weight, w_pol), bias)

    def _joint_weight(self, w_ref: Tensor, w_pol: Tensor) -> Tensor:
        """``[W_ref, W_pol]`` along H, rebuilt only when the policy's weight changed (an optimiser
        step bumps its version), so the micro-batches of one step share one copy."""
        key = (id(w_ref), w_ref._version, id(w_pol), w_pol._version, w_pol.device)
        if self._joint is None or self._joint[0] != key:
            self._joint = (key, torch.cat([w_ref.detach(), w_pol.detach().to(w_ref.dtype)], dim=-1))
        return self._joint[1]

    # ---------------------------------------------------------------------------------- updates

    @torch.no_grad()
    def update(self, policy: nn.Module) -> None:
        """One EMA step towards ``policy``; under FSDP on this process's shards only (the teacher's
        and the policy's shards are the same slices of the same parameters)."""
        if self.mode != "ema":
            return
        for (name, t), p in zip(self.model.named_parameters(), policy.parameters()):
            if self._root is not None:
                t, p = _local(t, name), _local(p, name)
                if t.shape != p.shape:
                    raise RuntimeError(f"EMA update under FSDP: the teacher's shard of {name} {tuple(t.shape)} is "
                                       f"not the policy's {tuple(p.shape)}; both must be sharded alike")
            t.lerp_(p.detach().to(t.dtype), self.rate)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """An EMA teacher's weights (None for other modes): the live tensors, not a copy (a 135M model's
        copy is 540 MB at every checkpoint); :meth:`update` changes them in place, so a caller that keeps
        them past the next update copies them (a checkpoint writes them at once; the continual runner
        hands them to the next run, which copies them into its own teacher). A tensor that shares memory
        with an earlier one (tied embeddings) is copied: safetensors refuses shared tensors. Under FSDP a
        collective: every process calls it, the main process gets the whole weights, the others None."""
        if self.mode != "ema":
            return None
        if self._root is not None:
            return Sharding.full_state(self.model.state_dict(), keep=_is_main())
        out, seen = {}, set()
        for k, v in self.model.state_dict().items():
            ptr = v.untyped_storage().data_ptr()
            out[k] = v.detach().clone() if ptr in seen else v.detach()
            seen.add(ptr)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.mode == "ema" and state is not None:
            if self.sharding is not None:  # whole tensors: each process keeps its shards
                self.sharding.load_model_state(self.model, state)
            else:
                self.model.load_state_dict(state)


def _local(t: Any, name: str) -> Tensor:
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        raise RuntimeError(f"EMA update under FSDP: parameter {name} is not sharded (a gathered parameter left "
                           "unsharded after a forward); reshard before the update")
    return t.to_local()


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
