"""From point-in-time feature rows to the ranker's float32 input tensors.

The ranker reads rows shaped like a training set (:mod:`avrec.training_set`): one row per
(user, item) with ``user_behaviour__*`` and ``item_behaviour__*`` columns and the derived
ages. :class:`FeatureEncoder` turns them into the model's inputs, in a fixed order that is
written into the model's contract (:mod:`avrec.ranker.contract`) and checked by the server:

* counts and ages go through ``log1p``; a missing value becomes 0 with a ``*_missing`` flag
  (a user or item without history is a case the model must learn, not an error);
* ratings are centred on the training mean;
* the user's ``recent_items`` become rows of an item-vector table (``-1`` where an item has
  no vector: masked out, never a zero vector passed off as an item); vectors are gathered
  per batch (:func:`avrec.ranker.training.model_inputs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

USER = "user_behaviour__"
ITEM = "item_behaviour__"
HISTORY = 20

USER_COUNTS = [f"{USER}interactions_{w}" for w in ("1d", "7d", "30d", "all")]
ITEM_COUNTS = [f"{ITEM}popularity_{w}" for w in ("1d", "7d", "30d", "all")] + [
    f"{ITEM}rating_count"
]
USER_AGES = ["days_since_last_interaction"]
ITEM_AGES = ["item_age_days"]


def resolve_vectors(
    source: VectorSource, interactions: pl.DataFrame, items: pl.DataFrame
) -> ItemVectors:
    """A fixed vector table as it is, or a factory fitted on ``interactions`` (e.g. the
    fusion trained on a stage's fit data only)."""
    return source if isinstance(source, ItemVectors) else source(interactions, items)


def lookup_rows(table_ids: np.ndarray, order: np.ndarray, ids: np.ndarray,
                sorted_ids: np.ndarray | None = None) -> np.ndarray:
    """Row of each of ``ids`` in ``table_ids`` (``order`` = its argsort; ``sorted_ids``:
    ``table_ids[order]`` when the caller keeps it), -1 when absent.

    >>> lookup_rows(np.array([30, 10, 20]), np.array([1, 2, 0]), np.array([20, 99]))
    array([ 2, -1])
    """
    ids = np.asarray(ids, dtype=np.int64)
    if sorted_ids is None:
        sorted_ids = table_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(len(sorted_ids) - 1, 0))
    found = sorted_ids[pos] == ids if len(sorted_ids) else np.zeros(ids.shape, bool)
    return np.where(found, order[pos], -1)


@dataclass
class ItemVectors:
    """A fixed table of item vectors: ``vectors[index[item_id]]``."""

    item_ids: np.ndarray
    vectors: np.ndarray  # float32 [n_items, dim]
    name: str = "item_vectors"
    _order: np.ndarray = field(init=False, repr=False)
    _sorted_ids: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.item_ids = np.asarray(self.item_ids, dtype=np.int64)
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        self._order = np.argsort(self.item_ids)
        self._sorted_ids = self.item_ids[self._order]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each id in ``vectors``, -1 where the id has no vector."""
        return lookup_rows(self.item_ids, self._order, item_ids, self._sorted_ids)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, column: str, name: str | None = None) -> ItemVectors:
        """From a table with ``item_id`` and a list column; rows with a null vector are left out."""
        present = frame.filter(pl.col(column).is_not_null())
        vectors = np.asarray(present[column].to_list(), dtype=np.float32)
        return cls(present["item_id"].to_numpy(), vectors, name or column)


@dataclass
class FeatureEncoder:
    """Fixed feature order and normalisation, fitted on training rows only."""

    genres: int
    rating_mean: float = 3.5
    user_dense_names: list[str] = field(default_factory=list)
    item_dense_names: list[str] = field(default_factory=list)

    def fit(self, rows: pl.DataFrame) -> FeatureEncoder:
        """Learn the rating centre from training rows; fix the column order."""
        ratings = pl.concat([rows[f"{USER}mean_rating"], rows[f"{ITEM}mean_rating"]]).drop_nulls()
        self.rating_mean = float(ratings.mean()) if len(ratings) else 3.5
        self.user_dense_names = (
            [f"log1p({c})" for c in USER_COUNTS + USER_AGES]
            + ["mean_rating_centred", "positive_share", "user_missing"]
            + [f"genre_affinity[{i}]" for i in range(self.genres)]
        )
        self.item_dense_names = [f"log1p({c})" for c in ITEM_COUNTS + ITEM_AGES] + [
            "item_mean_rating_centred",
            "item_missing",
        ]
        return self

    def _log_counts(self, rows: pl.DataFrame, columns: list[str]) -> np.ndarray:
        values = rows.select(
            [pl.col(c).cast(pl.Float64).fill_null(0.0).clip(0.0, None).log1p() for c in columns]
        )
        return values.to_numpy().astype(np.float32)

    def user_dense(self, rows: pl.DataFrame) -> np.ndarray:
        """``[n, len(user_dense_names)]`` float32."""
        missing = rows[f"{USER}interactions_all"].is_null().to_numpy()
        affinity = rows[f"{USER}genre_affinity"].to_list()
        genre = np.zeros((rows.height, self.genres), dtype=np.float32)
        for i, vec in enumerate(affinity):
            if vec is not None:
                genre[i, : len(vec)] = vec
        rating = rows[f"{USER}mean_rating"].fill_null(self.rating_mean).to_numpy()
        share = rows[f"{USER}positive_share"].fill_null(0.0).to_numpy()
        extra = np.stack([rating - self.rating_mean, share, missing], axis=1).astype(np.float32)
        return np.concatenate([self._log_counts(rows, USER_COUNTS + USER_AGES), extra, genre], 1)

    def user_dense_record(self, record: Mapping[str, Any]) -> np.ndarray:
        """:meth:`user_dense` of one row given as ``{column: value}``, as ``[1, n]``, without
        building a frame (the server's per-request path; equal to the frame path, tested)."""
        logs = [
            0.0 if record.get(c) is None else math.log1p(max(float(record[c]), 0.0))
            for c in USER_COUNTS + USER_AGES
        ]
        rating = record.get(f"{USER}mean_rating")
        share = record.get(f"{USER}positive_share")
        extra = [
            (self.rating_mean if rating is None else rating) - self.rating_mean,
            0.0 if share is None else share,
            float(record.get(f"{USER}interactions_all") is None),
        ]
        genre = np.zeros(self.genres, dtype=np.float32)
        affinity = record.get(f"{USER}genre_affinity")
        if affinity is not None:
            genre[: len(affinity)] = affinity
        head = np.asarray(logs, dtype=np.float64).astype(np.float32)
        tail = np.asarray(extra, dtype=np.float64).astype(np.float32)
        return np.concatenate([head, tail, genre])[None, :]

    @staticmethod
    def history_row(recent: Sequence[int] | None, vectors: ItemVectors) -> np.ndarray:
        """:meth:`history_rows` of one user's ``recent_items``, as ``[1, HISTORY]``."""
        ids = np.full(HISTORY, -1, dtype=np.int64)
        if recent:
            ids[: min(len(recent), HISTORY)] = list(recent)[:HISTORY]
        return np.where(ids >= 0, vectors.rows(ids), -1)[None, :]

    def item_dense(self, rows: pl.DataFrame) -> np.ndarray:
        """``[n, len(item_dense_names)]`` float32."""
        missing = rows[f"{ITEM}popularity_all"].is_null().to_numpy()
        rating = rows[f"{ITEM}mean_rating"].fill_null(self.rating_mean).to_numpy()
        extra = np.stack([rating - self.rating_mean, missing], axis=1).astype(np.float32)
        return np.concatenate([self._log_counts(rows, ITEM_COUNTS + ITEM_AGES), extra], 1)

    def blank_item(self) -> np.ndarray:
        """``item_dense`` of an item without any history (what a cold item looks like)."""
        out = np.zeros(len(self.item_dense_names), dtype=np.float32)
        out[self.item_dense_names.index("item_missing")] = 1.0
        return out

    @staticmethod
    def history_rows(rows: pl.DataFrame, vectors: ItemVectors) -> np.ndarray:
        """``[n, HISTORY]`` rows of ``vectors`` for the user's recent items (-1: none/padding)."""
        recent = rows[f"{USER}recent_items"].to_list()
        ids = np.full((rows.height, HISTORY), -1, dtype=np.int64)
        for i, items in enumerate(recent):
            if items:
                ids[i, : min(len(items), HISTORY)] = items[:HISTORY]
        return np.where(ids >= 0, vectors.rows(ids.ravel()).reshape(ids.shape), -1)


# A fixed item-vector table, or a factory that fits one on interactions (+ the catalogue).
VectorSource = ItemVectors | Callable[[pl.DataFrame, pl.DataFrame], ItemVectors]
