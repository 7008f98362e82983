"""What ``fused_loss`` needs of an objective and of its batch, as structural types.

The loss core sits below ``denser.objectives`` and imports nothing from it, not even for typing.
``denser.objectives.Objective`` and ``PolicyBatch`` satisfy these Protocols by their members, and
so does any other class with the same members: the core evaluates ``objective.loss`` chunk by
chunk (docs/design.md, Contract 1b) without knowing where the objective comes from.
"""

from __future__ import annotations

from typing import Literal, Protocol, TypeVar

from torch import Tensor

from denser.kernels.options import CoreOptions
from denser.kernels.stats import LossOutput, TokenStats


class TokenBatch(Protocol):
    """A micro-batch of ``N`` packed completion tokens, the tokens of one sequence contiguous."""

    @property
    def seq_ids(self) -> Tensor:
        """``[N]`` long: the sequence each token belongs to (non-decreasing for ``separable="sequence"``)."""
        ...

    @property
    def num_tokens(self) -> int:
        """``N``; must equal the rows of ``hidden``."""
        ...

    def token_slice(self, start: int, stop: int) -> TokenBatch:
        """The tokens ``[start, stop)`` of the batch, with the normalisers of the whole batch."""
        ...


BatchT = TypeVar("BatchT", bound=TokenBatch)


class LossObjective(Protocol[BatchT]):
    """An objective as ``fused_loss`` sees it: which statistics to compute and a loss over them.

    ``separable``: ``"token"`` (a sum of per-token terms with normalisers fixed in the batch),
    ``"sequence"`` (a sum of per-sequence terms: chunks end on sequence boundaries) or ``None``
    (not separable: all statistics first, then one ``loss`` call).
    """

    @property
    def name(self) -> str: ...

    @property
    def separable(self) -> Literal["token", "sequence"] | None: ...

    def core_options(self) -> CoreOptions:
        """Which statistics the core computes (``need_entropy``, ``need_divergence``, ``alpha``,
        ``topk``, ``add_tail``); ``temperature`` and ``ignore_index`` come from the call."""
        ...

    def prepare(self, batch: BatchT) -> BatchT:
        """Called once per micro-batch before any chunking (e.g. to draw a random token mask)."""
        ...

    def loss(self, stats: TokenStats, batch: BatchT) -> LossOutput:
        """The loss and metrics of ``batch`` (or of one chunk of it) from the per-token statistics."""
        ...
