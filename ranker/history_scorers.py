"""Generators that score the catalogue from a user's history alone (fold-in), torch-free.

The hybrid ranker's candidate generators are fitted per user id (EASE, ItemKNN, ALS, content
kNN). A server cannot refit them for every new event, so each fitted generator is turned into
a :class:`HistoryScorer`: weights over the catalogue plus a rule that scores *any* history:

* :class:`ItemItemScorer`: ``x_u W`` for an item-item weight matrix (EASE's ``B``, kept to the
  ``top_k`` largest weights per row; ItemKNN's neighbour matrix);
* :class:`FactorFoldIn`: implicit ALS's user solve, ``(Y'C_uY + λI) x_u = Y'C_u p_u``,
  for the fixed item factors ``Y`` (exactly the step ALS itself runs for a user);
* :class:`ContentProfileScorer`: cosine between an item's vector and the mean vector of the
  user's positive items.

A history is the user's catalogue columns and values (ratings), oldest first; each scorer keeps
the events its generator learned from (``min_value``: all, or positives only). An empty history
gets the generator's popularity fallback, as :meth:`avrec.ranker.recommender.Recommender.score`
does. The hybrid trains and serves through these scorers, so training features and served features
come from one code path. They are saved as ``.npz`` files (:func:`save_scorer`,
:func:`load_scorer`) and re-indexed onto the serving catalogue (:meth:`HistoryScorer.on`).

>>> w = sparse.csr_matrix(np.array([[0.0, 1.0], [0.5, 0.0]]))
>>> scorer = ItemItemScorer(np.array([10, 20]), w, np.array([0.5, 0.5]))
>>> scorer.score([History(np.array([0]), np.array([5.0]))]).tolist()
[[0.0, 1.0]]
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

from avrec.ranker.features import lookup_rows


@dataclass(frozen=True)
class History:
    """One user's events as catalogue columns and values (NaN: no rating), oldest first."""

    columns: np.ndarray
    values: np.ndarray
    _kept: dict[float | None, np.ndarray] = field(default_factory=dict, init=False,
                                                  repr=False, compare=False)

    def kept(self, min_value: float | None) -> np.ndarray:
        """Distinct columns of the events with ``value >= min_value`` (all when None),
        computed once per threshold (the generators of a pipeline mostly share one)."""
        found = self._kept.get(min_value)
        if found is None:
            cols = self.columns if min_value is None else self.columns[self.values >= min_value]
            found = self._kept[min_value] = np.unique(cols)
        return found


def _remap(item_ids: np.ndarray, catalogue: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in ``catalogue`` of this scorer's items kept there, their old positions)."""
    rows = lookup_rows(catalogue, np.argsort(catalogue, kind="stable"), item_ids)
    keep = np.flatnonzero(rows >= 0)
    return rows[keep], keep


class HistoryScorer(ABC):
    """Scores every catalogue item for histories (``[users, items]``, higher is better)."""

    kind: str

    def __init__(self, item_ids: np.ndarray, fallback: np.ndarray,
                 min_value: float | None = None) -> None:
        self.item_ids = np.asarray(item_ids, dtype=np.int64)
        self.fallback = np.asarray(fallback, dtype=np.float64)
        self.min_value = min_value

    def score(self, histories: Sequence[History]) -> np.ndarray:
        """``[users, items]`` scores; a history with nothing kept gets :attr:`fallback`."""
        rows = []
        for history in histories:
            cols = history.kept(self.min_value)
            scores = self._score(cols) if cols.size else None
            rows.append(self.fallback if scores is None else scores)
        if len(rows) == 1 and rows[0] is not self.fallback:
            return rows[0][None, :]  # a fresh array: no copy needed
        return np.stack(rows) if rows else np.empty((0, self.fallback.size))

    @abstractmethod
    def _score(self, columns: np.ndarray) -> np.ndarray | None:
        """Scores for one non-empty history (None: fall back to popularity)."""

    @abstractmethod
    def arrays(self) -> dict[str, np.ndarray]:
        """What :func:`save_scorer` writes (besides item ids, fallback and min_value)."""

    @abstractmethod
    def on(self, catalogue: np.ndarray, vectors: np.ndarray) -> HistoryScorer:
        """The same scorer over ``catalogue`` (sorted ids) whose served item vectors are
        ``vectors``; items it was not fitted on score 0 (and 0 in the fallback)."""

    def _moved_fallback(self, new: np.ndarray, old: np.ndarray, size: int) -> np.ndarray:
        fallback = np.zeros(size)
        fallback[new] = self.fallback[old]
        return fallback


class ItemItemScorer(HistoryScorer):
    """``score = sum of W[i]`` over the history's items ``i`` (rows: source, columns: target)."""

    kind = "item_item"

    def __init__(self, item_ids: np.ndarray, weights: sparse.csr_matrix, fallback: np.ndarray,
                 min_value: float | None = None) -> None:
        super().__init__(item_ids, fallback, min_value)
        self.weights = sparse.csr_matrix(weights, dtype=np.float32)

    @classmethod
    def top_k(cls, item_ids: np.ndarray, dense: np.ndarray, k: int, fallback: np.ndarray,
              min_value: float | None = None) -> ItemItemScorer:
        """From a dense weight matrix, keeping each row's ``k`` largest-magnitude weights."""
        k = min(k, dense.shape[1])
        top = np.argpartition(-np.abs(dense), k - 1, axis=1)[:, :k]
        values = np.take_along_axis(dense, top, axis=1)
        rows = np.repeat(np.arange(dense.shape[0]), k)
        keep = values.ravel() != 0
        matrix = sparse.csr_matrix((values.ravel()[keep], (rows[keep], top.ravel()[keep])),
                                   shape=dense.shape)
        return cls(item_ids, matrix, fallback, min_value)

    GATHER_LIMIT = 16_384  # stored entries up to which the rows are summed by bincount

    def _score(self, columns: np.ndarray) -> np.ndarray:
        """The history's rows of ``W`` summed in float64. Up to :attr:`GATHER_LIMIT` stored
        entries they are gathered straight from the CSR arrays and added up by target column
        (``np.bincount``), without the fixed ~0.3 ms of scipy's row slicing; above it
        (long histories of a dense ``W``, where the gather measured several times slower)
        scipy slices and sums (README, session 12)."""
        w = self.weights
        starts = w.indptr[columns]
        lengths = w.indptr[columns + 1] - starts
        filled = lengths > 0
        starts, lengths = starts[filled].astype(np.int64), lengths[filled].astype(np.int64)
        if not starts.size:
            return np.zeros(w.shape[1])
        total = int(lengths.sum())
        if total > self.GATHER_LIMIT:
            return np.asarray(w[columns].sum(axis=0, dtype=np.float64)).ravel()
        # positions of the rows' entries: +1 within a row, a jump to the next row's start
        steps = np.ones(total, dtype=np.int64)
        steps[0] = starts[0]
        steps[np.cumsum(lengths)[:-1]] = starts[1:] - (starts[:-1] + lengths[:-1]) + 1
        entries = np.cumsum(steps)
        return np.bincount(w.indices[entries], weights=w.data[entries], minlength=w.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        w = self.weights
        return {"data": w.data, "indices": w.indices, "indptr": w.indptr,
                "shape": np.asarray(w.shape)}

    def on(self, catalogue: np.ndarray, vectors: np.ndarray) -> ItemItemScorer:
        new, old = _remap(self.item_ids, catalogue)
        move = sparse.csr_matrix((np.ones(new.size), (new, old)),
                                 shape=(catalogue.size, self.item_ids.size))
        weights = (move @ self.weights @ move.T).tocsr()
        fallback = self._moved_fallback(new, old, catalogue.size)
        return ItemItemScorer(catalogue, weights, fallback, self.min_value)


class FactorFoldIn(HistoryScorer):
    """implicit ALS's user step for a new history: ``x = (Y'Y + (α-1) Y_u'Y_u + λI)^-1 α Y_u'1``.

    Interaction cells are 1 (see :class:`avrec.ranker.recommender.InteractionMatrix`), so each of
    the user's items has confidence ``α``; scores are ``x . Y``.
    """

    kind = "factor_fold_in"

    def __init__(self, item_ids: np.ndarray, factors: np.ndarray, regularization: float,
                 alpha: float, fallback: np.ndarray, min_value: float | None = None) -> None:
        super().__init__(item_ids, fallback, min_value)
        self.factors = np.asarray(factors, dtype=np.float64)
        self.regularization, self.alpha = float(regularization), float(alpha)
        self.gram = self.factors.T @ self.factors

    def _score(self, columns: np.ndarray) -> np.ndarray:
        y = self.factors[columns]
        a = self.gram + (self.alpha - 1.0) * (y.T @ y)
        a.flat[:: a.shape[0] + 1] += self.regularization  # the diagonal
        user = np.linalg.solve(a, self.alpha * y.sum(axis=0))
        return self.factors @ user

    def arrays(self) -> dict[str, np.ndarray]:
        return {"factors": self.factors,
                "params": np.asarray([self.regularization, self.alpha])}

    def on(self, catalogue: np.ndarray, vectors: np.ndarray) -> FactorFoldIn:
        new, old = _remap(self.item_ids, catalogue)
        factors = np.zeros((catalogue.size, self.factors.shape[1]))
        factors[new] = self.factors[old]
        return FactorFoldIn(catalogue, factors, self.regularization, self.alpha,
                            self._moved_fallback(new, old, catalogue.size), self.min_value)


NO_VECTOR_SCORE = -2.0  # below any cosine: items without a vector rank last


class ContentProfileScorer(HistoryScorer):
    """Cosine between each item's vector and the mean vector of the history's items.

    ``min_value`` is the positive threshold; items without a vector never count and score
    ``NO_VECTOR_SCORE``. Vectors are not saved (they are the served item embeddings): a loaded
    content scorer has none until :meth:`on` binds it to the served ones.
    """

    kind = "content_profile"

    def __init__(self, item_ids: np.ndarray, vectors: np.ndarray, fallback: np.ndarray,
                 min_value: float | None = 4.0) -> None:
        super().__init__(item_ids, fallback, min_value)
        vectors = np.asarray(vectors, dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
        self.unit = unit.astype(np.float32)  # float32 products: 4x faster, ample for ranking
        self.has_vector = norms[:, 0] > 0

    def _score(self, columns: np.ndarray) -> np.ndarray | None:
        columns = columns[self.has_vector[columns]]
        if not columns.size:
            return None
        mean = self.unit[columns].mean(axis=0, dtype=np.float64)
        norm = np.linalg.norm(mean)
        if not norm > 0:
            return None
        cosine = (self.unit @ (mean / norm).astype(np.float32)).astype(np.float64)
        return np.where(self.has_vector, cosine, NO_VECTOR_SCORE)

    def arrays(self) -> dict[str, np.ndarray]:
        return {}

    def on(self, catalogue: np.ndarray, vectors: np.ndarray) -> ContentProfileScorer:
        new, old = _remap(self.item_ids, catalogue)
        return ContentProfileScorer(catalogue, vectors,
                                    self._moved_fallback(new, old, catalogue.size),
                                    self.min_value)


def save_scorer(scorer: HistoryScorer, path: Path) -> None:
    """Write ``scorer`` to ``path`` (``.npz``)."""
    min_value = np.nan if scorer.min_value is None else scorer.min_value
    np.savez_compressed(path, kind=np.asarray(scorer.kind), item_ids=scorer.item_ids,
                        fallback=scorer.fallback, min_value=np.asarray(min_value),
                        **scorer.arrays())


def load_scorer(path: Path) -> HistoryScorer:
    """Read a scorer written by :func:`save_scorer` (bind a content scorer with ``on``)."""
    with np.load(path, allow_pickle=False) as data:
        kind = str(data["kind"])
        ids, fallback = data["item_ids"], data["fallback"]
        raw = float(data["min_value"])
        min_value = None if np.isnan(raw) else raw
        if kind == ItemItemScorer.kind:
            shape = tuple(int(x) for x in data["shape"])
            weights = sparse.csr_matrix((data["data"], data["indices"], data["indptr"]), shape)
            return ItemItemScorer(ids, weights, fallback, min_value)
        if kind == FactorFoldIn.kind:
            reg, alpha = (float(x) for x in data["params"])
            return FactorFoldIn(ids, data["factors"], reg, alpha, fallback, min_value)
        if kind == ContentProfileScorer.kind:
            return ContentProfileScorer(ids, np.zeros((ids.size, 0)), fallback, min_value)
    raise ValueError(f"{path}: unknown scorer kind {kind!r}")
