"""The accuracy matrix of a task sequence and the continual-learning measures read from it.

``R[k, j]`` is the accuracy on task ``j`` after stage ``k``: row 0 is the model before any
training, row ``k`` (1..T) the model after training on the k-th task of the sequence. Columns are
the T training tasks in training order (task ``j`` is trained in stage ``j``), followed by any
held-out tasks that are never trained on. Indices below are 1-based as in the papers:
``R[k, j]`` with ``k`` in 0..T and ``j`` in 1..T.

Definitions (all standard; values are accuracies in [0, 1], so differences are in [-1, 1]):

- **average accuracy** after stage k over the tasks seen so far,
  ``A_k = 1/k * sum_{j<=k} R[k, j]`` (Chaudhry et al. 2018, "Riemannian Walk for Incremental
  Learning", Eq. 5); ``A_T`` is the ACC of Lopez-Paz & Ranzato 2017 ("Gradient Episodic Memory
  for Continual Learning", GEM, Eq. 2).
- **forgetting** of task j after stage k > j, ``f_j^k = max_{l in j..k-1} R[l, j] - R[k, j]``:
  the best accuracy from the stage that trained task j on, minus the current one (Chaudhry et al.
  2018, Eq. 6, as continual-learning libraries compute it: the maximum runs over the stages since
  the task was learnt), and the average ``F_k = 1/(k-1) * sum_{j<k} f_j^k`` (Eq. 7). This is the
  default (:data:`FORGETTING_DEFINITION`). The measure denser reported before, whose maximum runs
  over *every* earlier stage, the stages before task j was trained included
  (``max_{l in 1..k-1} R[l, j] - R[k, j]``, so a stage that lowered a task before it was ever trained
  counts as forgetting), is kept as :func:`forgetting_all_earlier_stages` (``definition="all_earlier"``).
- **backward transfer** ``BWT_k = 1/(k-1) * sum_{j<k} (R[k, j] - R[j, j])`` (GEM Eq. 3 at k=T;
  negative = forgetting).
- **forward transfer** ``FWT = 1/(T-1) * sum_{j=2..T} (R[j-1, j] - b_j)`` (GEM Eq. 4). GEM's
  ``b_j`` is the accuracy of a randomly initialised model; in post-training the natural baseline
  is the model before any training, so ``b_j = R[0, j]``.
- **learning gain** of stage j, ``R[j, j] - R[j-1, j]``: how much training on task j helped it
  (plasticity; the "learning accuracy" of Riemer et al. 2019 is the mean of ``R[j, j]``).
- **held-out tasks** (never trained): the change from the initial model ``R[k, x] - R[0, x]``
  and, by the same rule as above but counting the initial model as an earlier point (the
  capability existed before training), ``max_{l in 0..k-1} R[l, x] - R[k, x]``.

Undefined values (e.g. forgetting after stage 1) are ``None``.
"""

from __future__ import annotations

from typing import Callable, Sequence

SINCE_TRAINED, ALL_EARLIER = "since_trained", "all_earlier"
FORGETTING_DEFINITIONS = (SINCE_TRAINED, ALL_EARLIER)
FORGETTING_DEFINITION = ("forgetting of a trained task after stage k = its best accuracy from the stage that trained "
                         "it up to stage k-1, minus its accuracy after stage k (Chaudhry et al. 2018, Eq. 6, as "
                         "continual-learning libraries compute it); averaged over the tasks trained before stage k")


def _mean(xs: Sequence[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def check_matrix(R: Sequence[Sequence[float]], num_train: int) -> list[list[float]]:
    """``R`` as a list of float rows; it must have ``num_train + 1`` rows of equal length >= num_train."""
    rows = [[float(v) for v in row] for row in R]
    if num_train < 1:
        raise ValueError(f"a task sequence needs at least one training task, got {num_train}")
    if len(rows) != num_train + 1:
        raise ValueError(f"the accuracy matrix needs {num_train + 1} rows (before training + one per stage), "
                         f"got {len(rows)}")
    width = {len(r) for r in rows}
    if len(width) != 1 or width.pop() < num_train:
        raise ValueError(f"every row of the accuracy matrix needs the same number (>= {num_train}) of columns")
    return rows


def average_accuracy(R, num_train: int) -> list[float | None]:
    """``[A_0, A_1, .., A_T]``: ``A_k`` = mean of ``R[k, 1..k]`` (``A_0`` is None)."""
    R = check_matrix(R, num_train)
    return [None] + [_mean(R[k][:k]) for k in range(1, num_train + 1)]


def forgetting(R, num_train: int) -> list[list[float | None]]:
    """``F[k][j-1] = f_j^k = max_{j<=l<k} R[l, j] - R[k, j]`` for ``j < k``, else None: the best
    accuracy since the stage that trained task j, minus the current one (the standard measure)."""
    return _forgetting(R, num_train, first=lambda j: j)


def forgetting_all_earlier_stages(R, num_train: int) -> list[list[float | None]]:
    """``F[k][j-1] = max_{1<=l<k} R[l, j] - R[k, j]`` for ``j < k``, else None: the best accuracy over
    every earlier stage, those before task j was trained included (denser's measure before the
    standard one became the default)."""
    return _forgetting(R, num_train, first=lambda j: 1)


def _forgetting(R, num_train: int, first: Callable[[int], int]) -> list[list[float | None]]:
    R = check_matrix(R, num_train)
    out = []
    for k in range(num_train + 1):
        row: list[float | None] = []
        for j in range(1, num_train + 1):
            if 1 <= j < k:
                row.append(max(R[l][j - 1] for l in range(first(j), k)) - R[k][j - 1])
            else:
                row.append(None)
        out.append(row)
    return out


def forgetting_matrix(R, num_train: int, definition: str = SINCE_TRAINED) -> list[list[float | None]]:
    """:func:`forgetting` (``"since_trained"``, the default) or :func:`forgetting_all_earlier_stages`
    (``"all_earlier"``)."""
    if definition not in FORGETTING_DEFINITIONS:
        raise ValueError(f"unknown forgetting definition {definition!r}; use one of {', '.join(FORGETTING_DEFINITIONS)}")
    return (forgetting if definition == SINCE_TRAINED else forgetting_all_earlier_stages)(R, num_train)


def average_forgetting(R, num_train: int, definition: str = SINCE_TRAINED) -> list[float | None]:
    """``[F_0 .. F_T]``: ``F_k`` = mean over ``j < k`` of ``f_j^k`` (None for k < 2)."""
    F = forgetting_matrix(R, num_train, definition)
    return [_mean([v for v in F[k] if v is not None]) for k in range(num_train + 1)]


def backward_transfer(R, num_train: int) -> list[float | None]:
    """``[BWT_0 .. BWT_T]``: ``BWT_k`` = mean over ``j < k`` of ``R[k, j] - R[j, j]`` (None for k < 2)."""
    R = check_matrix(R, num_train)
    return [_mean([R[k][j - 1] - R[j][j - 1] for j in range(1, k)]) for k in range(num_train + 1)]


def forward_transfer(R, num_train: int) -> float | None:
    """GEM's FWT with the initial model as baseline: mean over ``j >= 2`` of ``R[j-1, j] - R[0, j]``."""
    R = check_matrix(R, num_train)
    return _mean([R[j - 1][j - 1] - R[0][j - 1] for j in range(2, num_train + 1)])


def learning_gain(R, num_train: int) -> list[float]:
    """``[R[j, j] - R[j-1, j] for j = 1..T]``."""
    R = check_matrix(R, num_train)
    return [R[j][j - 1] - R[j - 1][j - 1] for j in range(1, num_train + 1)]


def continual_metrics(R, train_tasks: Sequence[str], heldout_tasks: Sequence[str] = ()) -> dict:
    """Every measure of the module docstring for a matrix whose columns are ``train_tasks`` then
    ``heldout_tasks``. Returns plain JSON-able values; per-task values are keyed by task name."""
    T = len(train_tasks)
    R = check_matrix(R, T)
    if len(R[0]) != T + len(heldout_tasks):
        raise ValueError(f"the accuracy matrix has {len(R[0])} columns for {T} training and "
                         f"{len(heldout_tasks)} held-out tasks")
    F = forgetting(R, T)
    heldout = {}
    for i, name in enumerate(heldout_tasks):
        col = [row[T + i] for row in R]
        heldout[name] = {
            "delta": [c - col[0] for c in col],
            "forgetting": [None] + [max(col[:k]) - col[k] for k in range(1, T + 1)],
        }
    heldout_mean = [_mean(row[T:]) for row in R] if heldout_tasks else [None] * (T + 1)
    return {
        "average_accuracy": average_accuracy(R, T),
        "final_average_accuracy": average_accuracy(R, T)[T],
        "average_forgetting": average_forgetting(R, T),
        "final_average_forgetting": average_forgetting(R, T)[T],
        "forgetting_definition": SINCE_TRAINED,
        "average_forgetting_all_earlier": average_forgetting(R, T, ALL_EARLIER),
        "final_average_forgetting_all_earlier": average_forgetting(R, T, ALL_EARLIER)[T],
        "forgetting": {name: [F[k][j] for k in range(T + 1)] for j, name in enumerate(train_tasks)},
        "max_forgetting": {name: max((F[k][j] for k in range(T + 1) if F[k][j] is not None), default=None)
                           for j, name in enumerate(train_tasks)},
        "backward_transfer": backward_transfer(R, T),
        "final_backward_transfer": backward_transfer(R, T)[T],
        "forward_transfer": forward_transfer(R, T),
        "learning_gain": dict(zip(train_tasks, learning_gain(R, T))),
        "heldout_mean_accuracy": heldout_mean,
        "heldout": heldout,
        "heldout_mean_delta": [None if m is None or heldout_mean[0] is None else m - heldout_mean[0]
                               for m in heldout_mean],
    }
