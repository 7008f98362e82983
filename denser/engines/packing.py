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

The shared layout (``layout="shared"``, :func:`build_shared_batch`, the loop's default) computes each
distinct context once: the samples whose contexts are identical (a group's prompt; a group's SDPO
teacher context) become one *segment*, the context followed by each of their completions, and the
segments are packed into rows of the longest segment's width, several per row where they fit (first
fit, longest first), so little is padding. A 4D mask ``attention_mask[R, 1, W, W]`` lets a context
token see its context, and a completion token its context and its own completion's earlier tokens;
``position_ids`` restart at 0 for each segment and each completion continues at its context's
length, exactly the positions of the padded layout. Contexts that begin alike share those tokens too: a
row holds its contexts as a token trie, so the prefix every prompt begins with (a chat template's system
prompt, a task's one-shot example) is there once, and an SDPO group's teacher contexts (the prompt, then
each sample's own feedback) hold the prompt once; a token sees the tokens on its own context's path.
Where contexts share, rows are up to ``SHARED_ROW_TOKENS`` wide, so a shared prefix serves as many
segments as fit. So the forward computes the same hidden states
(up to summation order), and ``predict_index[N]`` (flat indices into ``[R * W]``) picks them in packed
order: the last context token predicts the first token of every completion after it, so its state is
picked once per completion and its gradient adds up over them, as it does over the padded layout's
copies of the context.

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
    "LAYOUTS",
    "build_packed_batch",
    "build_shared_batch",
    "common_prefix_len",
    "completion_hidden_states",
    "completion_logprobs",
    "lm_head_params",
    "model_device",
]


#: the shared layout's row width when the contexts share a prefix: rows up to this wide hold it once for as
#: many segments as fit (a wider row costs attention over the whole row: the mask is dense)
SHARED_ROW_TOKENS = 512

#: ``build_packed_batch(..., layout=...)``: ``padded`` (a row per sample) or ``shared`` (each distinct context once)
LAYOUTS = ("shared", "padded")


@dataclass
class PackedBatch:
    """``B`` samples ready for a forward pass and for the loss core (see the module docstring).

    Attributes:
        input_ids: ``[B, C + T]`` context left-padded to ``C`` + completion right-padded to ``T``
            (shared layout: ``[R, W]`` rows of segments).
        attention_mask: ``[B, C + T]`` 1 on real tokens (shared layout: ``[R, 1, W, W]`` bool, True where
            the query position, dim 2, may attend to the key position, dim 3).
        position_ids: ``[B, C + T]`` 0-based positions of real tokens (padding gets 0 on the left).
        predict_mask: ``[B, C + T]`` bool, True where the output predicts a completion token (shared
            layout: ``[R, W]``, True where it predicts at least one; use ``predict_index``).
        targets: ``[N]`` completion token ids, packed sample after sample.
        seq_ids: ``[N]`` row in this batch (``0..B-1``) of each token.
        lengths: ``[B]`` completion lengths.
        sample_ids: ``[B]`` index of each row in the rollout it came from (or ``arange(B)``).
        old_logp: ``[N]`` behaviour log-probs, when known.
        context_width: ``C`` (shared layout: the longest context).
        predict_index: ``[N]`` shared layout only: flat index into ``[R * W]`` of the position that
            predicts each completion token (None: the padded layout, ``predict_mask`` in row-major order).
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
    predict_index: Tensor | None = None

    @property
    def layout(self) -> str:
        """``"shared"`` or ``"padded"`` (see the module docstring)."""
        return "padded" if self.predict_index is None else "shared"

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
    layout: str = "padded",
) -> PackedBatch:
    """Lay out (context, completion) pairs as described in the module docstring (``layout="shared"``:
    :func:`build_shared_batch`).

    Contexts must be non-empty (the first completion token needs a position that predicts it)
    and completions non-empty. ``max_context_len`` keeps only the last that many tokens of each
    context (left truncation, e.g. for long teacher contexts). ``sample_ids`` (default
    ``0..B-1``) is stored so per-sample tensors of the rollout (rewards, advantages) can be
    gathered for the batch: ``advantages[batch.sample_ids]`` is ``[B]``, indexed by ``seq_ids``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    if layout == "shared":
        return build_shared_batch(contexts, completions, pad_token_id=pad_token_id, old_logp=old_logp,
                                  sample_ids=sample_ids, max_context_len=max_context_len)
    ctx, comp = _checked_pairs(contexts, completions, max_context_len)
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
    _check_old_logp(old_logp, targets)
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


def build_shared_batch(
    contexts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    old_logp: Tensor | None = None,
    sample_ids: Sequence[int] | None = None,
    max_context_len: int | None = None,
) -> PackedBatch:
    """The shared layout of (context, completion) pairs (module docstring): one segment per distinct
    context (after ``max_context_len``), holding the completions of its samples in sample order after
    it; segments placed longest first, each into the first row with room for the tokens it adds, where a
    row holds its contexts as a token trie (a token that begins several contexts the same way is there
    once). Rows are as wide as the longest segment, or up to ``SHARED_ROW_TOKENS`` when contexts share a
    prefix. ``targets``, ``seq_ids``, ``lengths``, ``sample_ids`` and ``old_logp`` are those of
    :func:`build_packed_batch` (sample order)."""
    ctx, comp = _checked_pairs(contexts, completions, max_context_len)
    B = len(ctx)
    segments: dict[tuple[int, ...], list[int]] = {}
    for b, c in enumerate(ctx):
        segments.setdefault(tuple(c), []).append(b)
    done = {key: sum(len(comp[b]) for b in members) for key, members in segments.items()}  # completion tokens
    W = max(len(key) + done[key] for key in segments)
    shared = _Row().add_all(segments)  # every context in one trie: what sharing can save at most
    if shared < sum(map(len, segments)):
        W = max(W, min(shared + sum(done.values()), SHARED_ROW_TOKENS))
    rows: list[_Row] = []
    for key in sorted(segments, key=lambda k: -(len(k) + done[k])):  # stable: ties keep first-appearance order
        row = next((r for r in rows if r.fill + r.new_tokens(key) + done[key] <= W), None)
        if row is None:
            rows.append(row := _Row())
        row.place(key, [comp[b] for b in segments[key]], segments[key])
    R = len(rows)
    input_ids = torch.full((R, W), int(pad_token_id), dtype=torch.long)
    position_ids = torch.zeros((R, W), dtype=torch.long)
    allowed = torch.zeros((R, W, W), dtype=torch.bool)
    predict_at = [0] * B  # flat index of the position that predicts each sample's first token
    starts = [0] * B  # flat index of each sample's first completion token
    for r, row in enumerate(rows):
        seen = allowed[r]
        input_ids[r, :row.fill] = torch.tensor(row.tokens, dtype=torch.long)
        for path, placed in row.segments:
            P = torch.tensor(path, dtype=torch.long)
            position_ids[r, P] = torch.arange(len(path))
            seen[P[:, None], P[None, :]] |= torch.ones(len(path), len(path), dtype=torch.bool).tril()
            for b, start in placed:
                L = len(comp[b])
                span = torch.arange(start, start + L)
                position_ids[r, span] = torch.arange(len(path), len(path) + L)
                seen[start:start + L, P] = True
                seen[start:start + L, start:start + L] = torch.ones(L, L, dtype=torch.bool).tril()
                predict_at[b], starts[b] = r * W + path[-1], r * W + start
        pad = torch.arange(row.fill, W)
        seen[pad, pad] = True  # padding sees itself: no query row is all masked
    lengths = torch.tensor([len(y) for y in comp], dtype=torch.long)
    targets = torch.tensor([t for y in comp for t in y], dtype=torch.long)
    seq_ids = torch.repeat_interleave(torch.arange(B), lengths)
    # token j > 0 of sample b is predicted by the state at its token j - 1
    predict_index = torch.tensor([i for b in range(B) for i in [predict_at[b]] + list(range(starts[b], starts[b] + len(comp[b]) - 1))],
                                 dtype=torch.long)
    predict_mask = torch.zeros(R * W, dtype=torch.bool)
    predict_mask[predict_index] = True
    _check_old_logp(old_logp, targets)
    return PackedBatch(
        input_ids=input_ids,
        attention_mask=allowed[:, None],
        position_ids=position_ids,
        predict_mask=predict_mask.view(R, W),
        targets=targets,
        seq_ids=seq_ids,
        lengths=lengths,
        sample_ids=torch.tensor(list(sample_ids) if sample_ids is not None else range(B), dtype=torch.long),
        old_logp=old_logp,
        context_width=max(len(c) for c in ctx),
        predict_index=predict_index,
    )


class _Row:
    """One row of the shared layout being filled: its contexts as a token trie (``(parent position,
    token) -> position``, so a token that begins several contexts alike is held once), each context's
    completions after the context's tokens."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.trie: dict[tuple[int, int], int] = {}
        self.segments: list[tuple[list[int], list[tuple[int, int]]]] = []  # (context's path, (sample, start))

    @property
    def fill(self) -> int:
        return len(self.tokens)

    def new_tokens(self, key: Sequence[int]) -> int:
        """How many of ``key``'s tokens the row does not hold yet."""
        parent = -1
        for n, t in enumerate(key):
            if (parent := self.trie.get((parent, t), -2)) == -2:
                return len(key) - n
        return 0

    def _insert(self, key: Sequence[int]) -> list[int]:
        path, parent = [], -1
        for t in key:
            pos = self.trie.get((parent, t))
            if pos is None:
                pos = self.trie[(parent, t)] = len(self.tokens)
                self.tokens.append(t)
            path.append(pos)
            parent = pos
        return path

    def place(self, key: Sequence[int], completions: list[list[int]], samples: list[int]) -> None:
        """``key``'s tokens (those not held yet), then its samples' completions; their positions noted."""
        path = self._insert(key)
        placed = []
        for b, y in zip(samples, completions):
            placed.append((b, len(self.tokens)))
            self.tokens += y
        self.segments.append((path, placed))

    def add_all(self, keys: Sequence[Sequence[int]]) -> int:
        """Insert ``keys`` (contexts only); the number of positions they take."""
        for key in keys:
            self._insert(key)
        return self.fill


def common_prefix_len(sequences: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens every sequence shares, leaving each at least one token of its own."""
    first, limit = sequences[0], min(len(q) for q in sequences) - 1
    n = 0
    while n < limit and all(q[n] == first[n] for q in sequences):
        n += 1
    return n


def _checked_pairs(contexts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                   max_context_len: int | None) -> tuple[list[list[int]], list[list[int]]]:
    """The pairs as lists of ints, contexts cut to ``max_context_len``; one clear error for bad input."""
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
    return ctx, comp


def _check_old_logp(old_logp: Tensor | None, targets: Tensor) -> None:
    if old_logp is not None and old_logp.numel() != targets.numel():
        raise ValueError(f"old_logp has {old_logp.numel()} entries for {targets.numel()} completion tokens")


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
    inputs = dict(input_ids=batch.input_ids, attention_mask=_model_mask(model, batch), position_ids=batch.position_ids,
                  use_cache=False)
    if via == "decoder":
        hidden = model.get_decoder()(**inputs).last_hidden_state
    elif via == "forward":
        out = model(**inputs, output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]
    else:
        raise ValueError(f"via must be 'decoder' or 'forward', got {via!r}")
    if batch.predict_index is not None:
        return hidden.reshape(-1, hidden.shape[-1])[batch.predict_index]
    return hidden[batch.predict_mask]


def completion_logprobs(model: Any, batch: PackedBatch, *, temperature: float = 1.0) -> Tensor:
    """``[N]`` fp32 ``log_softmax(logits / temperature)[target]`` from a full forward pass.

    Materialises ``[B, L, V]`` logits: a reference for tests and small models; the loop itself
    uses :func:`completion_hidden_states` and the loss core.
    """
    device = model_device(model)
    if batch.input_ids.device != device:
        batch = batch.to(device)
    logits = model(input_ids=batch.input_ids, attention_mask=_model_mask(model, batch),
                   position_ids=batch.position_ids, use_cache=False).logits
    if batch.predict_index is not None:
        logits = logits.reshape(-1, logits.shape[-1])[batch.predict_index]
    else:
        logits = logits[batch.predict_mask]
    logits = logits.float() / temperature
    return logits.log_softmax(-1).gather(1, batch.targets[:, None]).squeeze(1)


#: attention implementations that take the shared layout's 4D mask (bool for sdpa; eager adds it to the scores)
MASK_4D_ATTENTION = ("sdpa", "eager")


def _model_mask(model: Any, batch: PackedBatch) -> Tensor:
    """The batch's attention mask as the model's attention implementation takes it: the padded layout's
    ``[B, L]`` as is; the shared layout's ``[R, 1, W, W]`` bool for sdpa, additive (0 or the dtype's
    minimum) for eager, which adds it to the attention scores."""
    mask = batch.attention_mask
    if mask.dim() != 4:
        return mask
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(f"the shared packing layout needs a 4D attention mask, which attention implementation {impl!r} "
                     f"does not take (it works with {' or '.join(MASK_4D_ATTENTION)}); load the model with "
                     "attn_implementation='sdpa', or use --packing padded")


def lm_head_params(model: Any) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the model's output layer, for the loss core."""
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")
