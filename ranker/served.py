"""``avrec evaluate --models served``: what ``Recommend`` serves, run offline at each user's cut.

:class:`ServedRecommender` fits the hybrid as ``avrec train`` does (default configuration,
generators with their validation-tuned settings), exports it, reads it back through
:class:`~avrec.ranker.hybrid_pipeline.SavedPipeline` (the ONNX scorer, the saved history scorers)
and asks :meth:`~avrec.ranker.hybrid_pipeline.HybridPipeline.recommend`, the method the server
calls, for every user with the features the online store would have held at their cut:

* ``user_history``: rebuilt by :func:`avrec.behaviour_features.user_history` (the function
  that writes the feature table) from the user's ratings strictly before the cut;
* ``item_behaviour``: each item's newest row of the offline feature table strictly before
  the cut (:class:`ItemRowsAsOf`), laid out as the server's snapshot lays it out.

Items the served answer does not hold (outside the pool) score below it, all equal: the
server never shows them.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from avrec import behaviour_features
from avrec.names import DAY_US
from avrec.ranker.hybrid import HybridRecommender
from avrec.ranker.hybrid_pipeline import (
    AGE_COLUMN,
    ITEM_PREFIX,
    HybridPipeline,
    Recommendation,
    SavedPipeline,
    ServedUser,
    item_stats,
    served_order,
)
from avrec.ranker.item_history import naive_utc
from avrec.ranker.recommender import Recommender

ITEM_FIELDS = ("popularity_7d", "popularity_30d", "popularity_all", "mean_rating")


class ItemRowsAsOf:
    """The ``item_behaviour`` offline table, read as of any instant (newest row strictly
    before it, per item) in a fixed catalogue order."""

    def __init__(self, table: pl.DataFrame, item_ids: np.ndarray) -> None:
        frame = table.sort("event_timestamp", "item_id")
        self.times = naive_utc(frame["event_timestamp"])
        self.frame = frame.select("item_id", *ITEM_FIELDS, "first_interaction_at")
        self.catalogue = pl.DataFrame({"item_id": np.asarray(item_ids, np.int64)})

    def at(self, when: np.datetime64) -> pl.DataFrame:
        """``item_behaviour__*`` and ``item_age_days`` of every catalogue item at ``when``."""
        end = int(np.searchsorted(self.times, when, side="left"))
        latest = self.frame.head(end).group_by("item_id").last()
        rows = self.catalogue.join(latest, on="item_id", how="left", maintain_order="left")
        first = naive_utc(rows["first_interaction_at"])
        age = (when - first).astype("timedelta64[us]").astype(np.float64) / DAY_US
        return rows.select(
            *[pl.col(f).alias(f"{ITEM_PREFIX}{f}") for f in ITEM_FIELDS],
            pl.Series(AGE_COLUMN, np.where(np.isnat(first), np.nan, age)),
        )


class ServedRecommender(Recommender):
    """The served hybrid pipeline behind the offline :class:`Recommender` interface."""

    name = "served"

    def __init__(self, hybrid: HybridRecommender, item_table: pl.DataFrame, seed: int = 0
                 ) -> None:
        super().__init__(seed)
        self.hybrid, self.item_table = hybrid, item_table
        self.pipeline: HybridPipeline | None = None
        self.events = pl.DataFrame()
        self.rows: ItemRowsAsOf | None = None
        self.last: list[Recommendation] = []
        self.last_lengths = np.empty(0, dtype=np.int64)  # history events per answered user
        self._directory: tempfile.TemporaryDirectory | None = None

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        self.hybrid.fit(interactions, items)
        self._directory = tempfile.TemporaryDirectory(prefix="avrec-served-")
        directory = Path(self._directory.name) / "hybrid"
        self.hybrid.export(directory)
        vectors = self.hybrid._vectors(interactions, items)
        self.pipeline = SavedPipeline.read(directory).bind(self.item_ids, vectors, items)
        events = interactions
        if "event_type" not in events.columns:  # the harness passes rating events only
            events = events.with_columns(pl.lit("rating").alias("event_type"))
        ts = events["event_timestamp"]
        if isinstance(ts.dtype, pl.Datetime) and ts.dtype.time_zone is None:
            events = events.with_columns(pl.col("event_timestamp").dt.replace_time_zone("UTC"))
        self.events = events.sort("user_id")
        self.rows = ItemRowsAsOf(self.item_table, self.item_ids)

    def _user(self, user_id: int, cut: np.datetime64) -> ServedUser:
        events = self.events.filter(pl.col("user_id") == user_id)
        instant = cut.astype("datetime64[us]").item().replace(tzinfo=UTC)
        before = instant - timedelta(microseconds=1)
        row = behaviour_features.user_history(events, before, before)
        if row.is_empty():
            return ServedUser(np.empty(0, np.int64), np.empty(0), None)
        record = row.row(0, named=True)
        stamp = record["event_timestamp"].astimezone(UTC).replace(tzinfo=None)
        return ServedUser(np.asarray(record["history_items"], np.int64),
                          np.asarray(record["history_ratings"], np.float64),
                          np.datetime64(stamp, "us"))

    def _known(self, user_ids: np.ndarray) -> np.ndarray:
        return np.ones(user_ids.size, dtype=bool)  # the pipeline serves everyone

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.pipeline is not None and self.rows is not None
        if as_of is None:
            last = naive_utc(self.events["event_timestamp"]).max()
            as_of = np.full(user_ids.size, last + np.timedelta64(1, "us"))
        self.last, lengths = [], []
        for user, cut in zip(user_ids, np.asarray(as_of, "datetime64[us]"), strict=True):
            stats = item_stats(self.rows.at(cut))
            served = self._user(int(user), cut)
            self.last.append(self.pipeline.recommend(served, stats, cut, 0))
            lengths.append(served.history_items.size)
        self.last_lengths = np.asarray(lengths, dtype=np.int64)
        return self._catalogue_scores(self.last)

    def _catalogue_scores(self, answers: list[Recommendation]) -> np.ndarray:
        out = np.zeros((len(answers), self.item_ids.size))
        for row, answer in enumerate(answers):
            out[row, answer.columns] = 1.0 + np.arange(answer.columns.size, 0, -1)
        return out

    @property
    def can_explore(self) -> bool:
        return self.hybrid.can_explore

    def set_exploration(self, slots: int, depth: int, min_history: int = 0) -> None:
        """Serve ``slots`` new items in the last places of the top ``depth`` to users with at
        least ``min_history`` events from now on."""
        if self.pipeline is None:
            raise RuntimeError("set_exploration() needs a fitted model")
        if not 0 <= slots <= depth:
            raise ValueError(f"need 0 <= slots <= depth, got {slots} and {depth}")
        cfg = self.pipeline.config
        cfg.explore, cfg.depth, cfg.explore_min_history = slots, depth, min_history

    def history_threshold(self, share: float) -> int:
        """See :meth:`avrec.ranker.hybrid.HybridRecommender.history_threshold`."""
        return self.hybrid.history_threshold(share)

    def rescore(self, explore: int, depth: int | None = None, min_history: int = 0
                ) -> np.ndarray:
        """The last ``score`` call's answers re-ordered with ``explore`` slots for users with
        at least ``min_history`` events (the same
        :func:`~avrec.ranker.hybrid_pipeline.served_order` the pipeline serves with)."""
        assert self.pipeline is not None
        depth = depth or self.pipeline.config.depth
        answers = [served_order(a.columns, a.scores, a.cold,
                                explore if length >= min_history else 0, depth)
                   for a, length in zip(self.last, self.last_lengths, strict=True)]
        return self._catalogue_scores(answers)
