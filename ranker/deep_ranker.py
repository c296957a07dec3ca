"""The deep ranker as a :class:`avrec.ranker.recommender.Recommender`, for full-ranking evaluation.

``fit`` turns the fit interactions into point-in-time training rows (positives, explicit
negatives and ``negatives`` sampled per positive, uniformly or by popularity, features as of
each label through :mod:`avrec.pit_join`), holds out the latest 10% of labels for early
stopping and trains :class:`avrec.ranker.model.Ranker` (loss, negatives and their sampling,
item-feature dropout: :class:`avrec.ranker.training.TrainConfig`). ``score`` ranks the whole
catalogue for each user with the user's features as of their cut (``as_of``) and every item's
features as of the same cut.

The item representation is a constructor argument (:class:`avrec.ranker.features.ItemVectors`):
the learned mixed embedding, the weighted-sum mixed embedding, text only, image only, or
collaborative ID vectors: the same model, so the comparison isolates the representation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch

from avrec import training_set
from avrec.names import BEHAVIOUR_FEATURES, ITEM_FEATURES, USER_FEATURES
from avrec.pit_join import join_features_duckdb
from avrec.ranker.features import FeatureEncoder, ItemVectors
from avrec.ranker.recommender import Recommender
from avrec.ranker.training import TrainConfig, TrainHistory, fit_ranker, torch_threads

if TYPE_CHECKING:
    from feast import FeatureStore


# Item vectors learned from the fit interactions themselves (e.g. the fusion, trained on the
# training split only, so evaluation never sees vectors built from test-period behaviour).
VectorFactory = Callable[[pl.DataFrame, pl.DataFrame], ItemVectors]


def _as_utc(values: np.ndarray) -> list[datetime]:
    return [
        datetime.fromtimestamp(v.astype("datetime64[us]").astype(np.int64) / 1e6, UTC)
        for v in values
    ]


def sampling_log_q(
    interactions: pl.DataFrame, items: pl.DataFrame, spec: training_set.TrainingSetSpec
) -> dict[int, float]:
    """``log q`` of each catalogue item under the negative sampling of ``spec``.

    Uniform: ``1 / catalogue``; popularity: the item's share of the interactions before the
    window end (as :func:`avrec.training_set.sample_negatives` draws them).
    """
    catalogue = np.unique(items["item_id"].to_numpy())
    if spec.sampling == "uniform":
        return dict.fromkeys(catalogue.tolist(), -float(np.log(len(catalogue))))
    counts = interactions.filter(pl.col("event_timestamp") < spec.end).group_by("item_id").len()
    share = counts.with_columns((pl.col("len") / pl.col("len").sum()).log().alias("log_q"))
    return dict(zip(share["item_id"].to_list(), share["log_q"].to_list(), strict=True))


class DeepRanker(Recommender):
    """Ranker over point-in-time behaviour features and a table of item vectors."""

    def __init__(
        self,
        vectors: ItemVectors | VectorFactory,
        store: FeatureStore,
        genres: int,
        negatives: int | None = None,
        config: TrainConfig | None = None,
        seed: int = 0,
        name: str | None = None,
        sampling: training_set.Sampling | None = None,
    ) -> None:
        """``config``: the training (default: the shipped one, seeded with ``seed``);
        ``negatives`` and ``sampling``, when given, replace the config's."""
        super().__init__(seed)
        self.vector_factory = None if isinstance(vectors, ItemVectors) else vectors
        self.vectors = vectors if isinstance(vectors, ItemVectors) else None
        self.store = store
        self.log_q: dict[int, float] = {}
        given = {"negatives": negatives, "sampling": sampling}
        self.config = replace(config or TrainConfig(seed=seed),
                              **{k: v for k, v in given.items() if v is not None})
        self.encoder = FeatureEncoder(genres=genres)
        self.name = name or f"deep[{getattr(vectors, 'name', 'fitted vectors')}]"
        self.model = None
        self.history = TrainHistory()
        self.users_per_join = 64

    def labelled_rows(self, interactions: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
        """Point-in-time training rows from the fit interactions."""
        ratings = interactions.filter(pl.col("event_type") == "rating")
        spec = training_set.TrainingSetSpec(
            start=ratings["event_timestamp"].min(),
            end=ratings["event_timestamp"].max() + timedelta(microseconds=1),
            negatives=self.config.negatives,
            sampling=self.config.sampling,
            seed=self.seed,
            feature_service=BEHAVIOUR_FEATURES,
        )
        self.log_q = sampling_log_q(interactions, items, spec)
        labels = training_set.build_labels(interactions, items, spec)
        return join_features_duckdb(labels, self.store, spec.feature_service)

    def encode(self, rows: pl.DataFrame) -> dict[str, np.ndarray]:
        """Dense features and item-vector rows (and labels when present) for training rows."""
        item_idx = self.vectors.rows(rows["item_id"].to_numpy())
        data = {
            "user_dense": self.encoder.user_dense(rows),
            "history_idx": self.encoder.history_rows(rows, self.vectors),
            "item_idx": item_idx,
            "item_dense": self.item_dense(rows, item_idx),
        }
        if "label" in rows.columns:
            data["label"] = rows["label"].to_numpy().astype(np.float32)
            data["group"] = (
                rows.select(pl.struct("user_id", "label_timestamp").rank("dense"))
                .to_series()
                .to_numpy()
                .astype(np.int64)
            )
            sampled = (rows["sample_type"] == "sampled_negative").to_numpy()
            log_q = rows["item_id"].replace_strict(self.log_q, default=0.0, return_dtype=pl.Float64)
            data["log_kq"] = np.where(
                sampled, np.log(max(self.config.negatives, 1)) + log_q.to_numpy(), 0.0
            ).astype(np.float32)
            data["item_blank"] = np.append(self.encoder.blank_item(), np.nan)
        return data

    def item_dense(self, rows: pl.DataFrame, item_idx: np.ndarray) -> np.ndarray:
        """Item behaviour features plus a flag for items without a vector."""
        flag = (item_idx < 0).astype(np.float32)[:, None]
        return np.concatenate([self.encoder.item_dense(rows), flag], 1)

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        if "event_type" not in interactions.columns:  # the harness passes rating events only
            interactions = interactions.with_columns(pl.lit("rating").alias("event_type"))
        if self.vector_factory is not None:
            self.vectors = self.vector_factory(interactions, items)
        rows = self.labelled_rows(interactions, items)
        cut = rows["label_timestamp"].quantile(0.9, interpolation="lower")
        train, valid = (
            rows.filter(pl.col("label_timestamp") < cut),
            rows.filter(pl.col("label_timestamp") >= cut),
        )
        self.encoder.fit(train)
        with torch_threads(1):
            self.model, self.history = fit_ranker(
                self.encode(train),
                self.encode(valid),
                self.vectors.vectors,
                self.config,
            )

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        if as_of is None:
            raise ValueError(f"{self.name} reads point-in-time features: pass as_of per user")
        assert self.model is not None
        times = _as_utc(as_of)
        users = join_features_duckdb(
            pl.DataFrame(
                {
                    "user_id": user_ids,
                    "item_id": np.zeros(len(user_ids), np.int64),
                    "label_timestamp": times,
                },
                schema_overrides={"label_timestamp": pl.Datetime("us", "UTC")},
            ),
            self.store,
            USER_FEATURES,
        )
        user = {
            "user_dense": self.encoder.user_dense(users),
            "history_idx": self.encoder.history_rows(users, self.vectors),
        }
        n_items = len(self.item_ids)
        item_idx = self.vectors.rows(self.item_ids)
        with torch.no_grad(), torch_threads(1):
            candidates = self.model.project_items(torch.from_numpy(self._item_matrix(item_idx)))
        out = np.empty((len(user_ids), n_items), dtype=np.float32)
        for start in range(0, len(user_ids), self.users_per_join):
            chunk = range(start, min(start + self.users_per_join, len(user_ids)))
            pairs = pl.DataFrame(
                {
                    "user_id": np.repeat(user_ids[chunk.start : chunk.stop], n_items),
                    "item_id": np.tile(self.item_ids, len(chunk)),
                    "label_timestamp": np.repeat(
                        np.asarray(as_of[chunk.start : chunk.stop], dtype="datetime64[us]"),
                        n_items,
                    ),
                }
            ).with_columns(pl.col("label_timestamp").dt.replace_time_zone("UTC"))
            items = join_features_duckdb(pairs, self.store, ITEM_FEATURES)
            dense = self.item_dense(items, np.tile(item_idx, len(chunk)))
            for j, u in enumerate(chunk):
                history_idx = user["history_idx"][u : u + 1]
                mask = (history_idx >= 0).astype(np.float32)
                history = self.vectors.vectors[np.maximum(history_idx, 0)] * mask[..., None]
                one = [torch.from_numpy(a) for a in (user["user_dense"][u : u + 1], history, mask)]
                rows = torch.from_numpy(dense[j * n_items : (j + 1) * n_items])
                with torch.no_grad(), torch_threads(1):
                    out[u] = self.model.score_items(*one, candidates, rows).numpy()
        return out

    def _item_matrix(self, item_idx: np.ndarray) -> np.ndarray:
        """The item vectors of the catalogue, zeros where an item has none."""
        present = (item_idx >= 0)[:, None]
        return self.vectors.vectors[np.maximum(item_idx, 0)] * present
