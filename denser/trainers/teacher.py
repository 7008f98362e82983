"""The teacher's weights: which model scores the teacher contexts, and how it follows the policy.

What the teacher is (how its contexts are built, which weights, the EMA rate) is the objective's
:class:`~denser.objectives.TeacherSpec`; this module holds the weights that spec names.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, TypeVar

import torch

from denser.objectives import TeacherSpec
from denser.objectives.teacher import TEACHER_MODES
from denser.trainers.sharding import ModelCall, Sharding

T = TypeVar("T")


class TeacherWeights:
    """Which weights score the teacher context: ``live`` (the policy itself), ``ema`` (an EMA copy
    updated after every optimiser step at ``rate``) or ``frozen`` (the initial weights).

    :meth:`run` calls a function of the teacher's model with its weights whole; under FSDP
    (:meth:`shard`) that is inside the forward of the root that gathers them."""

    def __init__(self, policy: torch.nn.Module, mode: str, rate: float, shared_frozen: torch.nn.Module | None = None):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher={mode!r} must be one of {', '.join(map(repr, TEACHER_MODES))}")
        self.mode, self.rate = mode, float(rate)
        self.shared = mode == "live" or (mode == "frozen" and shared_frozen is not None)
        if mode == "live":
            self.model = policy
        elif mode == "frozen" and shared_frozen is not None:
            self.model = shared_frozen
        else:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        self.sharding: Sharding | None = None
        self._root: ModelCall | None = None  # under FSDP: the root whose forward gathers the weights

    @classmethod
    def from_spec(cls, spec: TeacherSpec, policy: torch.nn.Module,
                  initial: torch.nn.Module | None = None) -> "TeacherWeights":
        """The weights ``spec.mode`` names; ``initial`` (the frozen initial model, when one is
        loaded anyway) is shared by a ``frozen`` teacher instead of a copy of the policy."""
        return cls(policy, spec.mode, spec.update_rate, shared_frozen=initial)

    def shard(self, sharding: Sharding, *, policy_root: ModelCall, shared_root: ModelCall | None = None) -> None:
        """Under FSDP: the teacher runs inside ``policy_root`` (live), the reference's
        ``shared_root`` (a frozen teacher sharing the initial weights), or its own sharded root
        (an EMA copy, or a frozen one of its own), sharded like the policy."""
        self.sharding = sharding
        if self.mode == "live":
            self._root = policy_root
        elif self.shared:
            if shared_root is None:
                raise ValueError("a frozen teacher that shares the reference's weights needs the reference's root")
            self._root = shared_root
        else:
            self._root = sharding.shard(ModelCall(self.model), frozen=True)

    def run(self, fn: Callable[[torch.nn.Module], T]) -> T:
        """``fn(model)`` with the teacher's weights whole (under FSDP: gathered for the call only)."""
        return fn(self.model) if self._root is None else Sharding.run(self._root, fn)

    def head(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The teacher's lm_head as the loss core should receive it, from inside :meth:`run`:
        ``(None, None)`` for a live teacher (it is the policy's own, which the core uses when
        given none), a copy under FSDP (the gathered weight is freed when the call ends)."""
        if self.mode == "live":
            return None, None
        if self._root is not None:
            return Sharding.keep(weight), Sharding.keep(bias)
        return weight, bias

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        """One EMA step towards ``policy``; sharded, on this process's shards only (the teacher's
        and the policy's shards are the same slices of the same parameters)."""
        if self.mode != "ema":
            return
        own = dict(self.model.named_parameters())
        for name, p in policy.named_parameters():
            t = own[name]
            if self._root is not None:
                t, p = _local(t, name), _local(p, name)
                if t.shape != p.shape:
                    raise RuntimeError(f"EMA update under FSDP: the teacher's shard of {name} {tuple(t.shape)} is not "
                                       f"the policy's {tuple(p.shape)}; both must be sharded alike")
            t.lerp_(p.detach().to(t.dtype), self.rate)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The EMA weights (None for other teachers). Under FSDP a collective: every process calls
        it, the main process gets the whole weights, the others None."""
        if self.mode != "ema":
            return None
        if self._root is not None:
            return Sharding.full_state(self.model.state_dict(), keep=_is_main())
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.mode == "ema" and state is not None:
            if self.sharding is not None:
                self.sharding.load_model_state(self.model, state)
            else:
                self.model.load_state_dict(state)


def _local(t: Any, name: str) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        raise RuntimeError(f"EMA update under FSDP: parameter {name} is not sharded (a gathered parameter left "
                           "unsharded after a forward); reshard before the update")
    return t.to_local()


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
