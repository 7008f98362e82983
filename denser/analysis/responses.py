"""Responses on fixed prompts, and how far they drift from the initial model's.

- :func:`generate_responses`: the model's own completions (greedy by default) of fixed prompts.
- :func:`token_drift`: along those completions, the mean per-token ``KL(p_current || p_initial)``
  (the reverse KL, ``token_stats(..., alpha=1)`` with the initial model as the "teacher", both
  models' final hidden states taken at the same packed completion tokens) and the current model's
  mean per-token entropy. The KL is an expectation under the current model's next-token
  distribution at every position of its own response, so it measures how differently the two
  models would continue the current model's behaviour, without sampling noise.
- :func:`response_similarity`: how much a response still reads like the initial model's response
  to the same prompt. The measure is ``difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()``
  on the decoded texts, ``2 * matched characters / (len(a) + len(b))`` in [0, 1]: it is
  tokenizer-free, sensitive to order and formatting (what the artifacts are about), and 1 only
  for identical texts. :func:`token_f1` (SQuAD-style bag-of-words F1 on whitespace words) is
  recorded next to it as an order-free check.
"""

from __future__ import annotations

import difflib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from denser.engines import DEFAULT_ENGINE, EngineSpec, HFOptions, RolloutEngine, SamplingParams


@dataclass
class Generations:
    """Completions of ``len(prompt_ids)`` prompts, one each, in prompt order."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> list[int]:
        return [len(c) for c in self.completion_ids]

    def __len__(self) -> int:
        return len(self.texts)


def build_engine(model, tokenizer, engine: EngineSpec | None = None, batch_size: int | None = None) -> RolloutEngine:
    """The rollout engine that generates ``model``'s responses: ``engine`` (a run's engine and its
    options), or without one the ``hf`` engine with at most ``batch_size`` sequences per ``generate``
    call (None: all at once)."""
    spec = engine if engine is not None else EngineSpec(DEFAULT_ENGINE, HFOptions(max_batch_size=batch_size or 0))
    return spec.build(model, tokenizer)


def generate_responses(model, tokenizer, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                       greedy: bool = True, temperature: float = 1.0, seed: int = 0,
                       batch_size: int | None = None, stop: Callable[[], bool] | None = None,
                       engine: EngineSpec | None = None) -> Generations:
    """One completion per prompt from ``model`` (greedy, or sampled with a fixed ``seed``) by ``engine``
    (:func:`build_engine`: default the ``hf`` engine at ``batch_size``); ``stop``: polled while
    generating, the completions end once it is True (a graceful stop of a run)."""
    engine = build_engine(model, tokenizer, engine, batch_size)
    params = SamplingParams(max_new_tokens=max_new_tokens, num_generations=1, do_sample=not greedy,
                            temperature=temperature)
    rollout = engine.generate([list(p) for p in prompt_ids], params, seed=None if greedy else seed, stop=stop)
    return Generations(prompt_ids=[list(p) for p in rollout.prompt_ids], completion_ids=rollout.completion_ids,
                       texts=list(rollout.texts), truncated=[bool(t) for t in rollout.truncated.tolist()])


@torch.no_grad()
def token_drift(current, initial, gens: Generations, *, batch_size: int = 16, backend: str = "auto",
                temperature: float = 1.0) -> dict:
    """Per-token ``KL(current || initial)`` and the current model's entropy along ``gens``.

    ``initial`` may be None (entropy only). Returns ``{"tokens", "mean_kl", "mean_entropy",
    "seq_kl": [per response mean KL], "seq_entropy": [...]}``; ``mean_*`` are token-weighted
    means over all responses (``mean_kl`` is None without ``initial``).
    """
    from denser.engines.packing import build_packed_batch, completion_hidden_states, lm_head_params
    from denser.kernels import token_stats

    n = len(gens)
    if n == 0:
        return {"tokens": 0, "mean_kl": None, "mean_entropy": None, "seq_kl": [], "seq_entropy": []}
    if initial is not None:
        v_cur = current.get_output_embeddings().weight.shape[0]
        v_init = initial.get_output_embeddings().weight.shape[0]
        if v_cur != v_init:
            raise ValueError(f"response drift needs one vocabulary; the current model has {v_cur} tokens, "
                             f"the initial {v_init}")
    seq_kl: list[float] = []
    seq_ent: list[float] = []
    kl_sum = ent_sum = 0.0
    tokens = 0
    modes = [(m, m.training) for m in (current, initial) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        for start in range(0, n, batch_size):
            idx = list(range(start, min(n, start + batch_size)))
            batch = build_packed_batch([gens.prompt_ids[i] for i in idx], [gens.completion_ids[i] for i in idx],
                                       pad_token_id=0)
            h = completion_hidden_states(current, batch)
            w, b = lm_head_params(current)
            kw = {}
            if initial is not None:
                h0 = completion_hidden_states(initial, batch)
                w0, b0 = lm_head_params(initial)
                kw = dict(teacher_hidden=h0.to(h.device, h.dtype), teacher_weight=w0.to(w.device, w.dtype),
                          teacher_bias=None if b0 is None else b0.to(w.device, w.dtype), alpha=1.0)
            stats = token_stats(h, w, batch.targets.to(h.device), bias=b, need_entropy=True, temperature=temperature,
                                backend=backend, **kw)
            seq = batch.seq_ids.to(h.device)
            ent = torch.zeros(len(idx), dtype=torch.float64, device=h.device).index_add_(0, seq, stats.entropy.double())
            counts = batch.lengths.to(h.device).double()
            seq_ent += (ent / counts).tolist()
            ent_sum += float(ent.sum())
            if initial is not None:
                kl = torch.zeros(len(idx), dtype=torch.float64, device=h.device).index_add_(
                    0, seq, stats.divergence.double().clamp_min(0.0))
                seq_kl += (kl / counts).tolist()
                kl_sum += float(kl.sum())
            tokens += int(counts.sum())
    finally:
        for m, was in modes:
            m.train(was)
    return {"tokens": tokens, "mean_kl": kl_sum / tokens if initial is not None else None,
            "mean_entropy": ent_sum / tokens, "seq_kl": seq_kl if initial is not None else [], "seq_entropy": seq_ent}


def response_similarity(a: str, b: str) -> float:
    """``difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()``: 1 for identical texts
    (two empty texts included), 0 for texts with no character in common."""
    if not a and not b:
        return 1.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def token_f1(a: str, b: str) -> float:
    """Bag-of-words F1 between the whitespace words of ``a`` and ``b`` (1 when both are empty)."""
    wa, wb = a.split(), b.split()
    if not wa and not wb:
        return 1.0
    common = sum((Counter(wa) & Counter(wb)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(wa), common / len(wb)
    return 2 * precision * recall / (precision + recall)


def mean_similarity(texts: Sequence[str], reference: Sequence[str]) -> dict:
    """``{"similarity", "token_f1"}``: means over aligned pairs of :func:`response_similarity` and :func:`token_f1`."""
    if len(texts) != len(reference):
        raise ValueError(f"{len(texts)} responses but {len(reference)} reference responses")
    if not texts:
        return {"similarity": None, "token_f1": None}
    return {"similarity": sum(response_similarity(a, b) for a, b in zip(texts, reference)) / len(texts),
            "token_f1": sum(token_f1(a, b) for a, b in zip(texts, reference)) / len(texts)}
