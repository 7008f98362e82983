"""The policy and its loss in one module (:class:`PolicyLoss`, what DDP/FSDP wrap), and the
``--log-teacher-entropy`` metrics computed from the same forward."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from denser.engines.packing import PackedBatch, completion_hidden_states, lm_head_params
from denser.kernels import Metric, fused_loss, token_stats
from denser.objectives import Objective, PolicyBatch
from denser.trainers.sharding import ModelCall
from denser.trainers.teacher import TeacherInputs


class PolicyLoss(ModelCall):
    """The policy and its loss in one forward, ``loss_module(packed, objective, batch, teacher,
    temperature, backend, chunk_size) -> (loss, metrics)`` (:func:`policy_loss`), so that wrappers
    (DDP, FSDP) see the lm_head weight whole where the loss core runs, and gradient sync hooks fire
    as usual. ``loss_module(fn)`` runs ``fn(policy)`` in the forward instead (:class:`ModelCall`):
    under FSDP, generation and the policy's no-grad forwards (a live teacher, pre-update
    log-probs) run so (:mod:`denser.trainers.sharding`)."""

    def forward(self, *args: Any, **kwargs: Any):
        if args and callable(args[0]):
            return super().forward(*args, **kwargs)
        return policy_loss(self.model, *args, **kwargs)


def policy_loss(model: nn.Module, packed: PackedBatch, objective: Objective, batch: PolicyBatch,
                teacher: TeacherInputs | None, temperature: float, backend: str, chunk_size: int | None):
    """``(loss, metrics)`` of one micro-batch: hidden states [N, H] -> ``fused_loss``."""
    hidden = completion_hidden_states(model, packed)
    weight, bias = lm_head_params(model)
    out = fused_loss(hidden, weight, packed.targets, objective, batch, bias=bias,
                     teacher_hidden=teacher.hidden if teacher else None,
                     teacher_weight=teacher.weight if teacher else None,
                     teacher_bias=teacher.bias if teacher else None,
                     temperature=temperature, backend=backend, chunk_size=chunk_size)
    if teacher is not None and teacher.entropy is not None:
        return out.loss, {**out.metrics, **entropy_metrics(hidden, weight, bias, packed, batch, teacher.entropy,
                                                            temperature, backend, chunk_size)}
    return out.loss, out.metrics


@torch.no_grad()
def entropy_metrics(hidden, weight, bias, packed: PackedBatch, batch: PolicyBatch, teacher_entropy: torch.Tensor,
                     temperature: float, backend: str, chunk_size: int | None) -> dict[str, Metric]:
    """``teacher_entropy`` and ``student_entropy`` (--log-teacher-entropy): mean entropies over the tokens
    of samples with a teacher context, the student's from the update's own hidden states (a chunked
    no-grad pass of the output layer)."""
    student = token_stats(hidden.detach(), weight.detach(), packed.targets,
                          bias=None if bias is None else bias.detach(), temperature=temperature, need_entropy=True,
                          backend=backend, chunk_size=chunk_size).entropy
    mask = batch.token_mask
    if batch.teacher_mask is not None:
        mask = mask & batch.teacher_mask.to(mask.device, torch.bool)[batch.seq_ids]
    return {"teacher_entropy": Metric.of(teacher_entropy, mask), "student_entropy": Metric.of(student, mask)}
