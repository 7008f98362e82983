"""The teacher's weights: which model scores the teacher contexts, and how it follows the policy.

What the teacher is (how its contexts are built, which weights, the EMA rate) is the objective's
:class:`~denser.objectives.TeacherSpec`; this module holds the weights that spec names.
"""

from __future__ import annotations

import copy

import torch

from denser.objectives import TeacherSpec
from denser.objectives.teacher import TEACHER_MODES


class TeacherWeights:
    """Which weights score the teacher context: ``live`` (the policy itself), ``ema`` (an EMA copy
    updated once per rollout batch, after its updates, at ``rate``) or ``frozen`` (the initial weights)."""

    def __init__(self, policy: torch.nn.Module, mode: str, rate: float, shared_frozen: torch.nn.Module | None = None):
        if mode not in TEACHER_MODES:
            raise ValueError(f"teacher={mode!r} must be one of {', '.join(map(repr, TEACHER_MODES))}")
        self.mode, self.rate = mode, float(rate)
        if mode == "live":
            self.model = policy
        elif mode == "frozen" and shared_frozen is not None:
            self.model = shared_frozen
        else:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)

    @classmethod
    def from_spec(cls, spec: TeacherSpec, policy: torch.nn.Module,
                  initial: torch.nn.Module | None = None) -> "TeacherWeights":
        """The weights ``spec.mode`` names; ``initial`` (the frozen initial model, when one is
        loaded anyway) is shared by a ``frozen`` teacher instead of a copy of the policy."""
        return cls(policy, spec.mode, spec.update_rate, shared_frozen=initial)

    @torch.no_grad()
    def update(self, policy: torch.nn.Module) -> None:
        if self.mode != "ema":
            return
        for t, p in zip(self.model.parameters(), policy.parameters()):
            t.lerp_(p.detach().to(t.dtype), self.rate)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()} if self.mode == "ema" else None

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.mode == "ema" and state is not None:
            self.model.load_state_dict(state)
