"""Co-consumption pairs: the label-free signal the fusion is trained and scored on.

Item2vec-style pairs: two items a user rated positively (rating >= 4) one after the other in
their time-ordered history, at most ``max_gap`` apart. Pairs used for training have both
events strictly before the cutoff; held-out pairs have both events at or after it
(:func:`between`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from avrec.errors import InputError

if TYPE_CHECKING:
    from avrec.encoders.fusion_fit import ItemFeatures

RATING = "rating"


class NotEnoughDataError(InputError):
    """Too few events, pairs or items to train on."""


@dataclass(frozen=True)
class PairConfig:
    """Which consecutive events make a co-consumption pair."""

    min_rating: float = 4.0
    max_gap: timedelta = timedelta(hours=1)


def co_consumption_pairs(events: pl.DataFrame, config: PairConfig = PairConfig()) -> pl.DataFrame:
    """Consecutive positive ratings per user: ``item_a, item_b, first_at, second_at``.

    Each user's positive ratings are ordered by time (ties by ``item_id``); a pair is two
    neighbours in that order, distinct items, at most ``config.max_gap`` apart.
    """
    positive = events.filter(
        (pl.col("event_type") == RATING) & (pl.col("value") >= config.min_rating)
    ).sort(["user_id", "event_timestamp", "item_id"])
    return (
        positive.select(
            pl.col("item_id").shift(1).over("user_id").alias("item_a"),
            pl.col("item_id").alias("item_b"),
            pl.col("event_timestamp").shift(1).over("user_id").alias("first_at"),
            pl.col("event_timestamp").alias("second_at"),
        )
        .drop_nulls()
        .filter(
            (pl.col("item_a") != pl.col("item_b"))
            & (pl.col("second_at") - pl.col("first_at") <= config.max_gap)
        )
    )


def between(
    pairs: pl.DataFrame, start: datetime | None = None, end: datetime | None = None
) -> pl.DataFrame:
    """Pairs whose both events lie in ``[start, end)`` (open ends when None)."""
    keep = pl.lit(True)
    if start is not None:
        keep = keep & (pl.col("first_at") >= start)
    if end is not None:
        keep = keep & (pl.col("second_at") < end)
    return pairs.filter(keep)


def pairs_before(events: pl.DataFrame, cutoff: datetime, config: PairConfig = PairConfig()
                 ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(all co-consumption pairs, those completed before ``cutoff``); NotEnoughDataError below 2."""
    pairs = co_consumption_pairs(events, config)
    before = between(pairs, end=cutoff)
    if before.height < 2:
        raise NotEnoughDataError(
            f"{before.height} co-consumption pairs before {cutoff.isoformat()}")
    return pairs, before


def pair_rows(pairs: pl.DataFrame, features: ItemFeatures) -> np.ndarray:
    """``[m, 2]`` feature rows of the pairs whose both items have encodings."""
    a = features.rows(pairs["item_a"].to_numpy())
    b = features.rows(pairs["item_b"].to_numpy())
    keep = (a >= 0) & (b >= 0)
    return np.stack([a[keep], b[keep]], axis=1).astype(np.int64)
