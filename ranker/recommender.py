"""The narrow interface every recommender implements, and the user-item matrix they share.

Like implicit's ``RecommenderBase``: ``fit`` on interactions (+ the catalogue), then ``score``
users over the FULL catalogue in a fixed item order (``item_ids``, the catalogue sorted by id).
Users without history in the fit data get the popularity of the fit data instead and are
flagged by :meth:`Recommender.fallback_mask`. Subclasses implement ``_fit`` and ``_score``
(and ``_known`` when some users with history still cannot be scored, e.g. no positives).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import numpy as np
import polars as pl
from scipy import sparse


@dataclass(frozen=True)
class InteractionMatrix:
    """Interactions as a CSR matrix ``[users with history, catalogue items]``."""

    user_ids: np.ndarray  # sorted distinct user ids with at least one interaction
    item_ids: np.ndarray  # the catalogue, sorted
    matrix: sparse.csr_matrix  # float32; the value of each (user, item) cell, see build()

    @classmethod
    def build(
        cls, interactions: pl.DataFrame, item_ids: np.ndarray, min_value: float | None = None
    ) -> InteractionMatrix:
        """One cell per distinct (user, item); 1.0 when any interaction qualifies.

        ``min_value`` keeps only interactions with ``value >= min_value`` (e.g. positives);
        users left without any are absent from ``user_ids``.
        """
        frame = interactions
        if min_value is not None:
            frame = frame.filter(pl.col("value") >= min_value)
        pairs = frame.select("user_id", "item_id").unique()
        user_ids = np.sort(pairs["user_id"].unique().to_numpy())
        items = pairs["item_id"].to_numpy()
        cols = np.searchsorted(item_ids, items)
        clipped = np.minimum(cols, max(item_ids.size - 1, 0))
        if items.size and (item_ids.size == 0 or (item_ids[clipped] != items).any()):
            raise ValueError("interactions mention items that are not in the catalogue")
        rows = np.searchsorted(user_ids, pairs["user_id"].to_numpy())
        data = np.ones(rows.size, dtype=np.float32)
        shape = (user_ids.size, item_ids.size)
        return cls(user_ids, item_ids, sparse.csr_matrix((data, (rows, cols)), shape=shape))

    def rows(self, user_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each user in ``matrix``, or -1 for users without history."""
        users = np.asarray(user_ids, dtype=np.int64)
        if self.user_ids.size == 0:
            return np.full(users.size, -1)
        idx = np.minimum(np.searchsorted(self.user_ids, users), self.user_ids.size - 1)
        return np.where(self.user_ids[idx] == users, idx, -1)


def catalogue(items: pl.DataFrame) -> np.ndarray:
    """The fixed item order: distinct catalogue ids, sorted."""
    return np.unique(items["item_id"].to_numpy().astype(np.int64))


class Recommender(ABC):
    """Fit on interactions + items, score users over the whole catalogue."""

    name: str = "recommender"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.item_ids = np.empty(0, dtype=np.int64)
        self.data: InteractionMatrix | None = None
        self.popularity = np.empty(0)

    def fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> Self:
        """Learn from ``interactions`` (user_id, item_id, value, event_timestamp)."""
        self.item_ids = catalogue(items)
        self.data = InteractionMatrix.build(interactions, self.item_ids)
        counts = np.asarray(self.data.matrix.sum(axis=0)).ravel().astype(np.float64)
        self.popularity = counts / max(counts.sum(), 1.0)
        self._fit(interactions, items)
        return self

    def score(
        self, user_ids: Sequence[int] | np.ndarray, as_of: np.ndarray | None = None
    ) -> np.ndarray:
        """``[len(user_ids), n_items]`` scores, higher is better, columns in ``item_ids`` order.

        ``as_of`` (optional, one ``datetime64`` per user) is each user's cut: a model that reads
        point-in-time features must read them strictly before it. The baselines ignore it.
        """
        if self.data is None:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        users = np.asarray(user_ids, dtype=np.int64)
        if as_of is not None and len(as_of) != users.size:
            raise ValueError("as_of needs one time per user")
        out = np.tile(self.popularity, (users.size, 1))
        known = ~self.fallback_mask(users)
        if known.any():
            out[known] = self._score(users[known], None if as_of is None else as_of[known])
        return out

    def fallback_mask(self, user_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """True for users scored by the popularity fallback (no usable history)."""
        if self.data is None:
            raise RuntimeError(f"{self.name}: call fit() before fallback_mask()")
        return ~self._known(np.asarray(user_ids, dtype=np.int64))

    def _known(self, user_ids: np.ndarray) -> np.ndarray:
        assert self.data is not None
        return self.data.rows(user_ids) >= 0

    @abstractmethod
    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        """Model-specific training (``self.data`` and ``self.item_ids`` are ready)."""

    @abstractmethod
    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        """Scores of users that ``_known`` accepts, ``[n, n_items]``."""
