"""Classical baselines behind the :class:`~avrec.ranker.recommender.Recommender` interface.

* ``RandomRecommender``: seeded uniform scores (a floor, and a check on the metrics).
* ``Popularity``: interaction counts in the fit data (all ratings or positives only).
* ``ItemKNN``: cosine similarity of item columns of the binary user-item matrix, each item
  scored from its ``k`` most similar items that the user has.
* ``BPR`` / ``ALS``: implicit's CPU matrix factorisation (threads capped, BLAS single-threaded).
* ``EASE``: Steck's closed-form item-item regression with a zero diagonal (2019).
* ``RecentPopularity``: the most consumed items in the ``days`` before each user's own cut.
* ``ContentKNN``: cosine between an item's vector and the mean vector of the user's positive
  training items, for any ``item_id -> vector`` table (text or image embeddings).

The CF models take ``min_value``: ``None`` learns from every rated item, ``4.0`` only from
positive ratings (users left without any then fall back to popularity).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking
from scipy import sparse
from scipy.linalg import lapack
from threadpoolctl import threadpool_limits

from avrec.ranker.cpu_share import usable_cpus
from avrec.ranker.history_scorers import (
    NO_VECTOR_SCORE,
    ContentProfileScorer,
    FactorFoldIn,
    HistoryScorer,
    ItemItemScorer,
)
from avrec.ranker.item_history import ItemTimeline
from avrec.ranker.recommender import InteractionMatrix, Recommender


class RandomRecommender(Recommender):
    """Uniform random scores, a function of (seed, user id) only."""

    name = "random"

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        return None

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        n = self.item_ids.size
        rows = [np.random.default_rng([self.seed, int(u)]).random(n) for u in user_ids]
        return np.stack(rows) if rows else np.empty((0, n))


class _MatrixModel(Recommender):
    """A recommender that learns from its own (optionally positive-only) user-item matrix."""

    def __init__(self, min_value: float | None = None, seed: int = 0) -> None:
        super().__init__(seed)
        self.min_value = min_value
        self.train: InteractionMatrix | None = None

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        self.train = InteractionMatrix.build(interactions, self.item_ids, self.min_value)
        self._fit_matrix(self.train.matrix)

    def _known(self, user_ids: np.ndarray) -> np.ndarray:
        assert self.train is not None
        return self.train.rows(user_ids) >= 0

    def _rows(self, user_ids: np.ndarray) -> np.ndarray:
        assert self.train is not None
        return self.train.rows(user_ids)

    @abstractmethod
    def _fit_matrix(self, matrix: sparse.csr_matrix) -> None:
        """Learn from the (filtered) user-item matrix."""


class Popularity(_MatrixModel):
    """Share of the fit data's (optionally positive) interactions on each item, for everyone."""

    name = "popularity"

    def _fit_matrix(self, matrix: sparse.csr_matrix) -> None:
        counts = np.asarray(matrix.sum(axis=0)).ravel().astype(np.float64)
        self.shares = counts / max(counts.sum(), 1.0)

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        return np.tile(self.shares, (user_ids.size, 1))


def top_k_neighbours(matrix: sparse.csr_matrix, k: int, chunk: int = 1024) -> sparse.csr_matrix:
    """``N[j, i]`` = cosine(item j, item i) for the ``k`` items most similar to j (not j)."""
    n_items = matrix.shape[1]
    cols = matrix.tocsc().astype(np.float64)
    norms = np.sqrt(np.asarray(cols.multiply(cols).sum(axis=0)).ravel())
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    normalised = (cols @ sparse.diags(inv)).tocsc()
    k = min(k, n_items - 1)
    rows, idx, vals = [], [], []
    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        sims = (normalised[:, start:stop].T @ normalised).toarray()
        sims[np.arange(stop - start), np.arange(start, stop)] = 0.0
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top_vals = np.take_along_axis(sims, top, axis=1)
        rows.append(np.repeat(np.arange(start, stop), k))
        idx.append(top.ravel())
        vals.append(top_vals.ravel())
    data = np.concatenate(vals)
    keep = data > 0
    shape = (n_items, n_items)
    coo = (data[keep], (np.concatenate(rows)[keep], np.concatenate(idx)[keep]))
    return sparse.csr_matrix(coo, shape=shape)


class ItemKNN(_MatrixModel):
    """Item-based kNN: ``score(u, j) = sum of cosine(j, i)`` over j's k neighbours i that u has."""

    name = "itemknn"

    def __init__(self, k: int = 100, min_value: float | None = None, seed: int = 0) -> None:
        super().__init__(min_value, seed)
        self.k = k
        self.neighbours_t: sparse.csr_matrix | None = None

    def _fit_matrix(self, matrix: sparse.csr_matrix) -> None:
        self.neighbours_t = top_k_neighbours(matrix, self.k).T.tocsr()

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.train is not None and self.neighbours_t is not None
        user_rows = self.train.matrix[self._rows(user_ids)].astype(np.float64)
        return np.asarray((user_rows @ self.neighbours_t).toarray())

    def history_scorer(self) -> HistoryScorer:
        """The same scores for any history (the neighbour matrix as item-item weights)."""
        assert self.neighbours_t is not None
        return ItemItemScorer(self.item_ids, self.neighbours_t, self.popularity, self.min_value)


class _FactorModel(_MatrixModel):
    """implicit matrix factorisation; scores are user-factor . item-factor dot products."""

    def __init__(self, min_value: float | None = None, seed: int = 0, **params: Any) -> None:
        super().__init__(min_value, seed)
        self.params = params
        self.user_factors = np.empty((0, 0))
        self.item_factors = np.empty((0, 0))

    @abstractmethod
    def _model(self) -> Any:
        """A fresh ``implicit`` model with ``self.params``."""

    def _fit_matrix(self, matrix: sparse.csr_matrix) -> None:
        with threadpool_limits(1, "blas"):
            model = self._model()
            model.fit(matrix, show_progress=False)
        self.user_factors = np.asarray(model.user_factors, dtype=np.float64)
        self.item_factors = np.asarray(model.item_factors, dtype=np.float64)

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        return self.user_factors[self._rows(user_ids)] @ self.item_factors.T


class BPR(_FactorModel):
    """Bayesian personalised ranking (implicit, CPU, one thread so a seed reproduces it)."""

    name = "bpr"

    def _model(self) -> Any:
        return BayesianPersonalizedRanking(num_threads=1, random_state=self.seed, **self.params)


class ALS(_FactorModel):
    """Implicit-feedback alternating least squares (implicit, CPU, up to two threads: as many
    as the process may run on)."""

    name = "als"

    def _model(self) -> Any:
        return AlternatingLeastSquares(
            num_threads=min(2, usable_cpus()), random_state=self.seed,
            calculate_training_loss=False, **self.params
        )

    def history_scorer(self) -> HistoryScorer:
        """ALS's own user solve over the fitted item factors, for any history."""
        model = self._model()
        return FactorFoldIn(self.item_ids, self.item_factors, model.regularization, model.alpha,
                            self.popularity, self.min_value)


def spd_inverse(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a symmetric positive definite float64 ``matrix`` (overwritten) by
    Cholesky (LAPACK ``potrf`` + ``potri``): half the work of a general LU inverse.

    >>> bool(np.allclose(spd_inverse(np.array([[2.0, 1.0], [1.0, 2.0]])) @ [[2, 1], [1, 2]],
    ...                  np.eye(2)))
    True
    """
    factor, info = lapack.dpotrf(matrix, lower=False, clean=False, overwrite_a=True)
    if info == 0:
        factor, info = lapack.dpotri(factor, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"not symmetric positive definite (LAPACK info {info})")
    inverse = np.triu(factor)  # potri fills the upper triangle only
    inverse += np.triu(inverse, 1).T
    return inverse


class EASE(_MatrixModel):
    """EASE: ``B = I - P diagMat(1 / diag(P))``, ``P = (X'X + λI)^-1`` (zero diagonal).

    Items without any fit interaction have zero columns in ``X``: they are left out of the
    inversion (their weights are zero either way), which keeps the cubic cost on the items that
    matter. Scores are ``X_u B``.

    >>> import polars as pl
    >>> rows = pl.DataFrame({"user_id": [1, 1, 2], "item_id": [10, 20, 10], "value": [5.0] * 3})
    >>> model = EASE(l2=1.0).fit(rows, pl.DataFrame({"item_id": [10, 20, 30]}))
    >>> bool(model.score([2])[0, 1] > model.score([2])[0, 2])
    True
    """

    name = "ease"

    def __init__(self, l2: float = 200.0, min_value: float | None = None, seed: int = 0) -> None:
        super().__init__(min_value, seed)
        if not l2 > 0:
            raise ValueError("EASE needs l2 > 0")
        self.l2 = l2
        self.active = np.empty(0, dtype=np.int64)
        self.weights = np.empty((0, 0), dtype=np.float32)

    def _fit_matrix(self, matrix: sparse.csr_matrix) -> None:
        counts = np.asarray(matrix.sum(axis=0)).ravel()
        self.active = np.flatnonzero(counts > 0)
        x = matrix[:, self.active].astype(np.float64)
        gram = np.asarray((x.T @ x).toarray())
        gram[np.diag_indices_from(gram)] += self.l2
        precision = spd_inverse(gram)
        weights = precision / -np.diag(precision)[None, :]
        weights[np.diag_indices_from(weights)] = 0.0
        self.weights = weights.astype(np.float32)

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.train is not None
        rows = self.train.matrix[self._rows(user_ids)][:, self.active]
        out = np.zeros((user_ids.size, self.item_ids.size))
        out[:, self.active] = np.asarray(rows @ self.weights)
        return out

    def history_scorer(self, top_k: int = 256) -> HistoryScorer:
        """The same scores for any history, each item's row of ``B`` cut to its ``top_k``
        largest-magnitude weights (a sparse matrix a server can hold)."""
        n = self.item_ids.size
        small = ItemItemScorer.top_k(self.active, self.weights, top_k, np.zeros(self.active.size))
        move = sparse.csr_matrix((np.ones(self.active.size), (self.active,
                                  np.arange(self.active.size))), shape=(n, self.active.size))
        weights = (move @ small.weights @ move.T).tocsr()
        return ItemItemScorer(self.item_ids, weights, self.popularity, self.min_value)

    def query(self, columns: list[np.ndarray]) -> np.ndarray:
        """Scores of ad-hoc histories (catalogue columns per row), e.g. a user's last items."""
        position = np.full(self.item_ids.size, -1)
        position[self.active] = np.arange(self.active.size)
        out = np.zeros((len(columns), self.item_ids.size))
        for row, cols in enumerate(columns):
            inside = position[cols]
            inside = inside[inside >= 0]
            if inside.size:
                out[row, self.active] = self.weights[inside].sum(axis=0)
        return out


class RecentPopularity(Recommender):
    """Interactions per item in the ``days`` before each user's cut (point in time).

    With ``as_of`` (the harness passes every user's cut) only events strictly before the
    user's cut and within ``days`` of it count (:class:`avrec.ranker.item_history.ItemTimeline`);
    without it the window ends just after the last fit event. Ties and empty windows fall back
    to all-time popularity, scaled below one count.
    """

    name = "recent-popularity"

    def __init__(self, days: float = 30.0, seed: int = 0) -> None:
        super().__init__(seed)
        if not days > 0:
            raise ValueError("RecentPopularity needs days > 0")
        self.days = days
        self.timeline: ItemTimeline | None = None

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        self.timeline = ItemTimeline.build(interactions, self.item_ids)

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.timeline is not None
        times = self.timeline.times
        ends = (np.full(user_ids.size, times[-1] + np.timedelta64(1, "us"))
                if as_of is None or not times.size else np.asarray(as_of, "datetime64[us]"))
        tiebreak = self.popularity / max(self.popularity.max(initial=0.0), 1e-12) * 0.5
        window = f"count_{self.days:g}d"
        return np.stack([
            tiebreak if np.isnat(end) else self.timeline.at(end, (self.days,))[window] + tiebreak
            for end in ends
        ]) if user_ids.size else np.empty((0, self.item_ids.size))


def read_item_vectors(path: Path, column: str) -> pl.DataFrame:
    """``item_id, vector`` from a Parquet table with a list-of-floats ``column`` (nulls dropped)."""
    frame = pl.read_parquet(path, columns=["item_id", column])
    return frame.drop_nulls(column).select("item_id", pl.col(column).alias("vector"))


def random_item_vectors(item_ids: np.ndarray, dim: int = 16, seed: int = 0) -> pl.DataFrame:
    """Seeded Gaussian vectors for some items (tests and a content-free control)."""
    vectors = np.random.default_rng(seed).standard_normal((len(item_ids), dim))
    return pl.DataFrame({"item_id": np.asarray(item_ids, dtype=np.int64), "vector": vectors})


class ContentKNN(Recommender):
    """Cosine between each item's vector and the mean vector of the user's positive items."""

    name = "content-knn"

    def __init__(
        self, vectors: pl.DataFrame, positive_threshold: float = 4.0, seed: int = 0
    ) -> None:
        super().__init__(seed)
        self.vectors = vectors
        self.positive_threshold = positive_threshold
        self.unit = np.empty((0, 0))
        self.has_vector = np.empty(0, dtype=bool)
        self.profiles: dict[int, np.ndarray] = {}

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        ids = self.vectors["item_id"].to_numpy().astype(np.int64)
        matrix = np.asarray(self.vectors["vector"].to_list(), dtype=np.float64)
        pos = np.searchsorted(self.item_ids, ids)
        inside = (pos < self.item_ids.size) & (
            self.item_ids[np.minimum(pos, self.item_ids.size - 1)] == ids
        )
        unit = np.zeros((self.item_ids.size, matrix.shape[1]))
        norms = np.linalg.norm(matrix[inside], axis=1, keepdims=True)
        unit[pos[inside]] = np.divide(
            matrix[inside], norms, where=norms > 0, out=np.zeros_like(matrix[inside])
        )
        self.unit = unit
        self.has_vector = np.linalg.norm(unit, axis=1) > 0
        positives = InteractionMatrix.build(interactions, self.item_ids, self.positive_threshold)
        self.profiles = {}
        indptr, indices = positives.matrix.indptr, positives.matrix.indices
        for row, user in enumerate(positives.user_ids):
            cols = indices[indptr[row] : indptr[row + 1]]
            cols = cols[self.has_vector[cols]]
            mean = unit[cols].mean(axis=0) if cols.size else np.zeros(unit.shape[1])
            norm = np.linalg.norm(mean)
            if norm > 0:
                self.profiles[int(user)] = mean / norm

    def _known(self, user_ids: np.ndarray) -> np.ndarray:
        return np.array([int(u) in self.profiles for u in user_ids], dtype=bool)

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        profiles = np.stack([self.profiles[int(u)] for u in user_ids])
        return np.where(self.has_vector[None, :], profiles @ self.unit.T, NO_VECTOR_SCORE)

    def history_scorer(self) -> HistoryScorer:
        """The same scores for any history (mean unit vector of its positives)."""
        return ContentProfileScorer(self.item_ids, self.unit, self.popularity,
                                    self.positive_threshold)


def grid(**axes: list[Any]) -> list[dict[str, Any]]:
    """Every combination of the given hyperparameter values, in a fixed order."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


GRIDS: dict[str, list[dict[str, Any]]] = {
    "random": [{}],
    "popularity": grid(min_value=[None, 4.0]),
    "itemknn": grid(k=[20, 50, 100, 200, 400], min_value=[None, 4.0]),
    "bpr": grid(
        factors=[64, 128],
        learning_rate=[0.01, 0.02],
        regularization=[0.01],
        iterations=[50, 100],
        min_value=[None, 4.0],
    ),
    "ease": grid(l2=[10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0], min_value=[None, 4.0]),
    "recent-popularity": grid(days=[7.0, 30.0, 90.0, 365.0]),
    "als": grid(
        factors=[64, 128],
        regularization=[1.0, 3.0, 10.0, 30.0],
        alpha=[1.0, 5.0],
        iterations=[15],
        min_value=[None, 4.0],
    ),
}

QUICK_GRIDS: dict[str, list[dict[str, Any]]] = {
    "random": [{}],
    "popularity": [{}],
    "itemknn": grid(k=[20, 100], min_value=[4.0]),
    "bpr": grid(factors=[16], iterations=[20], min_value=[4.0]),
    "als": grid(factors=[16], regularization=[10.0], iterations=[5], min_value=[4.0]),
    "ease": grid(l2=[100.0, 1000.0], min_value=[4.0]),
    "recent-popularity": grid(days=[30.0]),
}
