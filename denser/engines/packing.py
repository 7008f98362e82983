"""Packing: completions laid out for one forward pass and for the loss core, and the hidden states.

An engine-level type: :meth:`denser.engines.base.Rollout.pack` builds it, the loop, the teacher,
the reference model and the analysis run models on it.

    batch = rollout.pack(indices)                          # PackedBatch of some samples of a rollout
    batch = build_packed_batch(contexts, completions, pad_token_id=...)
    hidden = completion_hidden_states(model, batch)        # [N, H] -> kernels.fused_loss
    weight, bias = lm_head_params(model)

Packed, a batch of ``B`` samples is ``N = sum(lengths)`` completion tokens, sample after sample:
``targets[N]`` (the token ids), ``seq_ids[N]`` (``0..B-1``, the sample's row in the batch) and
``old_logp[N]``, the core's layout (docs/design.md). For the forward pass, row ``b`` of
``input_ids[B, C + T]`` is the context (prompt, or a teacher context) left-padded to width ``C``
followed by the completion right-padded to width ``T``; so completion token ``j`` sits at column
``C + j`` and the hidden state that predicts it is at column ``C + j - 1``. ``predict_mask[B, C+T]``
marks exactly those positions, in row-major order == packed order, so
``hidden_all[predict_mask]`` is ``[N, H]`` aligned with ``targets``.

A teacher (and the reference model) runs on *other* contexts with the *same* completion tokens:
``rollout.pack(indices, contexts=teacher_contexts)`` or :func:`build_packed_batch` gives a batch
whose ``targets``/``seq_ids`` are identical to the student's, so their ``[N, H]`` hidden states
line up token for token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = [
    "PackedBatch",
    "build_packed_batch",
    "completion_hidden_states",
    "completion_logprobs",
    "lm_head_params",
    "model_device",
]


@dataclass
class PackedBatch:
    """``B`` samples ready for a forward pass and for the loss core (see the module docstring).

    Attributes:
        input_ids: ``[B, C + T]`` context left-padded to ``C`` + completion right-padded to ``T``.
        attention_mask: ``[B, C + T]`` 1 on real tokens.
        position_ids: ``[B, C + T]`` 0-based positions of real tokens (padding gets 0 on the left).
        predict_mask: ``[B, C + T]`` bool, True where the output predicts a completion token.
        targets: ``[N]`` completion token ids, packed sample after sample.
        seq_ids: ``[N]`` row in this batch (``0..B-1``) of each token.
        lengths: ``[B]`` completion lengths.
        sample_ids: ``[B]`` index of each row in the rollout it came from (or ``arange(B)``).
        old_logp: ``[N]`` behaviour log-probs, when known.
        context_width: ``C``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    predict_mask: Tensor
    targets: Tensor
    seq_ids: Tensor
    lengths: Tensor
    sample_ids: Tensor
    old_logp: Tensor | None = None
    context_width: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.targets.numel())

    @property
    def num_seqs(self) -> int:
        return int(self.lengths.numel())

    def to(self, device: torch.device | str) -> "PackedBatch":
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (v.to(device) if isinstance(v, Tensor) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }
        return PackedBatch(**moved)


def build_packed_batch(
    contexts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    old_logp: Tensor | None = None,
    sample_ids: Sequence[int] | None = None,
    max_context_len: int | None = None,
) -> PackedBatch:
    """Lay out (context, completion) pairs as described in the module docstring.

    Contexts must be non-empty (the first completion token needs a position that predicts it)
    and completions non-empty. ``max_context_len`` keeps only the last that many tokens of each
    context (left truncation, e.g. for long teacher contexts). ``sample_ids`` (default
    ``0..B-1``) is stored so per-sample tensors of the rollout (rewards, advantages) can be
    gathered for the batch: ``advantages[batch.sample_ids]`` is ``[B]``, indexed by ``seq_ids``.
    """
    if len(contexts) != len(completions):
        raise ValueError(f"{len(contexts)} contexts but {len(completions)} completions")
    if len(contexts) == 0:
        raise ValueError("build_packed_batch needs at least one (context, completion) pair")
    ctx = [list(map(int, c)) for c in contexts]
    if max_context_len is not None:
        if max_context_len < 1:
            raise ValueError(f"max_context_len must be >= 1, got {max_context_len}")
        ctx = [c[-max_context_len:] for c in ctx]
    comp = [list(map(int, c)) for c in completions]
    for i, (c, y) in enumerate(zip(ctx, comp)):
        if not c:
            raise ValueError(f"sample {i}: empty context (a completion needs at least one context token)")
        if not y:
            raise ValueError(f"sample {i}: empty completion")
    B = len(ctx)
    C = max(len(c) for c in ctx)
    T = max(len(y) for y in comp)
    input_ids = torch.full((B, C + T), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((B, C + T), dtype=torch.long)
    predict_mask = torch.zeros((B, C + T), dtype=torch.bool)
    for b, (c, y) in enumerate(zip(ctx, comp)):
        input_ids[b, C - len(c) : C] = torch.tensor(c)
        input_ids[b, C : C + len(y)] = torch.tensor(y)
        attention_mask[b, C - len(c) : C + len(y)] = 1
        predict_mask[b, C - 1 : C - 1 + len(y)] = True
    position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    lengths = torch.tensor([len(y) for y in comp], dtype=torch.long)
    targets = torch.tensor([t for y in comp for t in y], dtype=torch.long)
    seq_ids = torch.repeat_interleave(torch.arange(B), lengths)
    if old_logp is not None and old_logp.numel() != targets.numel():
        raise ValueError(f"old_logp has {old_logp.numel()} entries for {targets.numel()} completion tokens")
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        predict_mask=predict_mask,
        targets=targets,
        seq_ids=seq_ids,
        lengths=lengths,
        sample_ids=torch.tensor(list(sample_ids) if sample_ids is not None else range(B), dtype=torch.long),
        old_logp=old_logp,
        context_width=C,
    )


def completion_hidden_states(model: Any, batch: PackedBatch, *, via: str = "decoder") -> Tensor:
    """Final hidden states ``[N, H]`` at the positions that predict the completion tokens.

    These are the states that feed ``lm_head`` (after the final norm), so
    ``lm_head(h)[i]`` are the logits of ``batch.targets[i]``. Gradients flow when called
    outside ``torch.no_grad()`` (the policy); wrap it in ``no_grad`` for the reference model and the
    teacher. ``batch`` is moved to the model's device if needed.

    Args:
        model: a Hugging Face causal LM (``...ForCausalLM``), unwrapped.
        batch: from :meth:`Rollout.pack` or :func:`build_packed_batch`.
        via: ``"decoder"`` (default) runs ``model.get_decoder()`` (the base model without lm_head)
            and reads ``last_hidden_state``, so no ``[B, L, V]`` logits are ever computed.
            ``"forward"`` calls ``model(...)`` itself with ``output_hidden_states=True`` and
            ``logits_to_keep=1`` and reads ``hidden_states[-1]`` (post-norm in transformers >= 5);
            use it when the outer module's forward must run (e.g. a wrapper that gathers
            sharded parameters in its forward).
    """
    device = model_device(model)
    if batch.input_ids.device != device:
        batch = batch.to(device)
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                  use_cache=False)
    if via == "decoder":
        hidden = model.get_decoder()(**inputs).last_hidden_state
    elif via == "forward":
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
    else:
        raise ValueError(f"via must be 'decoder' or 'forward', got {via!r}")
    return hidden[batch.predict_mask]


def completion_logprobs(model: Any, batch: PackedBatch, *, temperature: float = 1.0) -> Tensor:
    """``[N]`` fp32 ``log_softmax(logits / temperature)[target]`` from a full forward pass.

    Materialises ``[B, L, V]`` logits: a reference for tests and small models; the loop itself
    uses :func:`completion_hidden_states` and the loss core.
    """
    device = model_device(model)
    if batch.input_ids.device != device:
        batch = batch.to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits
    logits = logits[batch.predict_mask].float() / temperature
    return logits.log_softmax(-1).gather(1, batch.targets[:, None]).squeeze(1)


def lm_head_params(model: Any) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the model's output layer, for the loss core."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")
