"""The retrieval pair: a user tower and an item tower trained with in-batch sampled softmax
(training: :mod:`avrec.ranker.two_tower_training`).

Training rows are the positive (user, item) labels of the fit interactions (rating >= 4),
each with the user's and the item's behaviour features as of the label time, read through
the ``behaviour_features`` service (:mod:`avrec.pit_join`). A batch's other positives are
its negatives; their logits are corrected by ``log q`` (each item's share of the training
positives, the chance it appears as an in-batch negative) and a batch's duplicates of the
positive item are masked out. The latest 10% of labels early-stop training; everything is
seeded.

:class:`TwoTowerRecommender` scores the whole catalogue by the dot product of the two unit
vectors. Both sides are read as of each user's cut: the user vector from the
``user_features`` service, the item vectors from the item tower over the ``item_features``
service, computed once per distinct cut time. Without a cut, the time just after the last
fit interaction is used. The towers run on one torch thread (``TwoTowerConfig.threads``):
faster for models this small, and robust on a shared 2-core box. On ml-latest-small (text
vectors, 2 busy cores) fitting takes ~17 s and scoring ~600 users at their own cuts ~13 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

from avrec.pit_join import join_features_duckdb
from avrec.ranker.contract import (
    ITEM_SERVICE,
    USER_SERVICE,
    ModelContract,
    item_tower_contract,
    user_tower_contract,
)
from avrec.ranker.features import FeatureEncoder, ItemVectors
from avrec.ranker.model import ItemTower, UserTower
from avrec.ranker.recommender import Recommender
from avrec.ranker.training import torch_threads
from avrec.ranker.two_tower_training import (
    TwoTowerConfig,
    TwoTowerHistory,
    encode_rows,
    fit_two_tower,
    item_dense,
    positive_rows,
)

if TYPE_CHECKING:
    from feast import FeatureStore

TIME = "label_timestamp"


def _utc(times: np.ndarray) -> pl.Series:
    return pl.Series(TIME, np.asarray(times, dtype="datetime64[us]")).dt.replace_time_zone("UTC")


class TwoTowerRecommender(Recommender):
    """Two-tower retrieval over point-in-time behaviour features and a table of item vectors."""

    def __init__(
        self,
        vectors: ItemVectors,
        store: FeatureStore,
        genres: int,
        config: TwoTowerConfig | None = None,
        seed: int = 0,
        name: str | None = None,
        embedding_version: str = "unversioned",
    ) -> None:
        super().__init__(seed)
        self.vectors, self.store = vectors, store
        self.config = config or TwoTowerConfig(seed=seed)
        self.encoder = FeatureEncoder(genres=genres)
        self.name = name or f"two-tower[{vectors.name}]"
        self.embedding_version = embedding_version
        self.user_tower: UserTower | None = None
        self.item_tower: ItemTower | None = None
        self.history = TwoTowerHistory()
        self.fit_end = np.datetime64("NaT", "us")
        self.items_per_join = 200_000

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        rows = positive_rows(interactions, items, self.store, self.config.positive_threshold)
        cut = rows[TIME].quantile(0.9, interpolation="lower")
        train, valid = rows.filter(pl.col(TIME) < cut), rows.filter(pl.col(TIME) >= cut)
        self.encoder.fit(train)
        self.user_tower, self.item_tower, self.history = fit_two_tower(
            encode_rows(self.encoder, self.vectors, train),
            encode_rows(self.encoder, self.vectors, valid),
            self.vectors.vectors,
            self.config,
        )
        last = interactions["event_timestamp"].max()
        self.fit_end = np.datetime64(last.replace(tzinfo=None), "us") + np.timedelta64(1, "us")

    def encode_users(self, user_ids: np.ndarray, as_of: np.ndarray) -> dict[str, np.ndarray]:
        """Encoded user features (``user_dense``, ``history_idx``) read strictly before each
        ``as_of`` through the ``user_features`` service."""
        labels = pl.DataFrame({"user_id": np.asarray(user_ids, np.int64)}).with_columns(_utc(as_of))
        rows = join_features_duckdb(labels, self.store, USER_SERVICE)
        return {
            "user_dense": self.encoder.user_dense(rows),
            "history_idx": self.encoder.history_rows(rows, self.vectors),
        }

    def user_vectors(self, user_ids: np.ndarray, as_of: np.ndarray) -> np.ndarray:
        """``[n, dim]`` user vectors as of each ``as_of``.

        Users go through the tower one at a time, so a user's vector does not depend on who
        else is in the request.
        """
        assert self.user_tower is not None
        data = self.encode_users(user_ids, as_of)
        out = np.empty((len(user_ids), self.config.dim), dtype=np.float32)
        with torch.no_grad():
            for i in range(len(user_ids)):
                user_in = self.user_inputs(data, np.array([i]))
                out[i] = self.user_tower(*map(torch.from_numpy, user_in)).numpy()[0]
        return out

    def user_inputs(self, data: dict[str, np.ndarray], idx: np.ndarray) -> list[np.ndarray]:
        """The user tower's three float32 inputs for rows ``idx`` of encoded user features."""
        history_idx = data["history_idx"][idx]
        mask = (history_idx >= 0).astype(np.float32)
        history = self.vectors.vectors[np.maximum(history_idx, 0)] * mask[..., None]
        return [
            np.ascontiguousarray(a, dtype=np.float32)
            for a in (data["user_dense"][idx], history, mask)
        ]

    def iter_item_vectors(self, times: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(i, [n_items, dim])``: the catalogue's vectors as of ``times[i]``, in order.

        Item features are joined for several times at once; the tower runs once per time
        over the whole catalogue, so a time's vectors do not depend on the other times.
        """
        assert self.item_tower is not None
        n_items = self.item_ids.size
        item_idx = self.vectors.rows(self.item_ids)
        present = (item_idx >= 0)[:, None]
        item_vec = torch.from_numpy(self.vectors.vectors[np.maximum(item_idx, 0)] * present)
        per_join = max(1, self.items_per_join // max(n_items, 1))
        for start in range(0, len(times), per_join):
            chunk = times[start : start + per_join]
            labels = pl.DataFrame({"item_id": np.tile(self.item_ids, len(chunk))}).with_columns(
                _utc(np.repeat(chunk, n_items))
            )
            rows = join_features_duckdb(labels, self.store, ITEM_SERVICE)
            dense = item_dense(self.encoder, rows, np.tile(item_idx, len(chunk)))
            with torch.no_grad():
                for j in range(len(chunk)):
                    part = torch.from_numpy(dense[j * n_items : (j + 1) * n_items])
                    yield start + j, self.item_tower(item_vec, part).numpy()

    def item_vectors(self, time: np.datetime64) -> np.ndarray:
        """``[n_items, dim]``: the catalogue's vectors as of ``time`` (e.g. to build an index)."""
        return next(self.iter_item_vectors(np.array([time], dtype="datetime64[us]")))[1]

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        with torch_threads(self.config.threads):
            return self._score_catalogue(user_ids, as_of)

    def _score_catalogue(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        times = (
            np.full(len(user_ids), self.fit_end)
            if as_of is None
            else np.asarray(as_of, dtype="datetime64[us]")
        )
        times = np.where(np.isnat(times), self.fit_end, times)
        users = torch.from_numpy(self.user_vectors(user_ids, times)).double()
        distinct, which = np.unique(times, return_inverse=True)
        out = np.empty((len(user_ids), self.item_ids.size), dtype=np.float64)
        # The products run in torch: numpy's BLAS threads would spin against torch's.
        for t, items in self.iter_item_vectors(distinct):
            rows = np.flatnonzero(which == t)
            out[rows] = (users[rows] @ torch.from_numpy(items).double().T).numpy()
        return out

    def contract(self) -> ModelContract:
        """The contract under which :attr:`user_tower` is exported (:mod:`avrec.ranker.export`)."""
        return user_tower_contract(
            self.encoder,
            self.vectors.dim,
            self.config.dim,
            self.vectors.name,
            self.embedding_version,
        )

    def item_contract(self) -> ModelContract:
        """The contract under which :attr:`item_tower` is exported."""
        return item_tower_contract(
            self.encoder,
            self.vectors.dim,
            self.config.dim,
            self.vectors.name,
            self.embedding_version,
        )
