"""Temporal train / validation / test splits of rating events, and the evaluation stages.

Two splits, both deterministic and both driven by options, so the same code runs on any
catalogue ingested into the offline ``events`` table:

* **per-user** (primary): each user's ratings in time order, ties broken by ``item_id``; the
  last ``test_fraction`` are test, the ``validation_fraction`` before them validation, the rest
  training. Each user's ``validation_start`` and ``test_start`` (the time of the first event of
  that part) are recorded. Features for a user's test ranking must be read strictly before
  ``test_start`` (avrec's label convention reads at ``T - 1 µs``), which never sees a test event.
* **global**: cut times ``T1``/``T2`` at percentiles of all rating times;
  ``train < T1 <= validation < T2 <= test``; every user's cut is the same.

A :class:`Stage` is one evaluation round: ``validation`` fits on training and predicts the
validation part; ``test`` fits on training + validation and predicts the test part. Only users
with at least one positive target (rating >= ``positive_threshold``) that they had not already
interacted with, and with history in the stage's fit data, are evaluated. The per-user split
shares the global clock across users (another user's training events may be later than this
user's test start); the global split is the one without that leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np
import polars as pl

RATING = "rating"
KEYS = ["user_id", "item_id"]
ORDER = ["user_id", "event_timestamp", "item_id"]
StageName = Literal["validation", "test"]


@dataclass(frozen=True)
class Stage:
    """One evaluation round: what models fit on, what they must predict, what is excluded."""

    name: StageName
    fit: pl.DataFrame  # rating events the models learn from
    target: pl.DataFrame  # rating events to predict
    cut: pl.DataFrame  # user_id, start: each user's cut (features strictly before it)
    seen: pl.DataFrame  # user_id, item_id interacted with before the cut: never ranked
    positive_threshold: float

    @property
    def positives(self) -> pl.DataFrame:
        """Distinct (user, item) target positives that were not already seen."""
        positive = self.target.filter(pl.col("value") >= self.positive_threshold)
        return positive.select(KEYS).unique().join(self.seen, on=KEYS, how="anti").sort(KEYS)

    @property
    def users(self) -> np.ndarray:
        """Evaluated users: a positive to find and history in the fit data (sorted ids)."""
        known = self.fit.select("user_id").unique()
        users = self.positives.select("user_id").unique().join(known, on="user_id")
        return np.sort(users["user_id"].to_numpy())

    @property
    def labelled_pairs(self) -> pl.DataFrame:
        """Target ratings of users with history, labelled 1 when rating >= threshold."""
        known = self.fit.select("user_id").unique()
        pairs = self.target.join(known, on="user_id").sort(ORDER)
        label = (pl.col("value") >= self.positive_threshold).cast(pl.Int8).alias("label")
        return pairs.select(*KEYS, label)


@dataclass(frozen=True)
class Split:
    """Rating events cut into train / validation / test, with each user's cut times."""

    kind: str  # "per-user" or "global"
    train: pl.DataFrame
    validation: pl.DataFrame
    test: pl.DataFrame
    cutoffs: pl.DataFrame  # user_id, validation_start, test_start
    other_events: pl.DataFrame  # non-rating events: count as "seen" before a user's cut
    positive_threshold: float
    params: dict = field(default_factory=dict)
    t1: datetime | None = None  # global split only
    t2: datetime | None = None

    def stage(self, name: StageName) -> Stage:
        """The validation stage (fit on train) or the test stage (fit on train + validation)."""
        if name == "validation":
            fit, target, start = self.train, self.validation, "validation_start"
        elif name == "test":
            fit, target, start = pl.concat([self.train, self.validation]), self.test, "test_start"
        else:
            raise ValueError(f"unknown stage {name!r}; expected 'validation' or 'test'")
        cut = self.cutoffs.select("user_id", pl.col(start).alias("start")).drop_nulls()
        earlier = self.other_events.join(cut, on="user_id").filter(
            pl.col("event_timestamp") < pl.col("start")
        )
        seen = pl.concat([fit.select(KEYS), earlier.select(KEYS)]).unique().sort(KEYS)
        return Stage(name, fit.sort(ORDER), target.sort(ORDER), cut, seen, self.positive_threshold)


def _ratings(events: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rating events, other events), each with the event columns, sorted."""
    cols = [*KEYS, "value", "event_timestamp"]
    is_rating = pl.col("event_type") == RATING
    ratings = events.filter(is_rating & pl.col("value").is_not_null()).select(cols).sort(ORDER)
    return ratings, events.filter(~is_rating).select(cols).sort(ORDER)


def _round_half_up(x: pl.Expr) -> pl.Expr:
    return (x + 0.5).floor().cast(pl.Int64)


def per_user_split(
    events: pl.DataFrame,
    test_fraction: float = 0.2,
    validation_fraction: float = 0.1,
    positive_threshold: float = 4.0,
) -> Split:
    """Per-user temporal split (see the module docstring).

    A user with ``n`` ratings gets ``max(1, round(test_fraction * n))`` test ratings and
    ``max(1, round(validation_fraction * n))`` validation ratings before them (fewer when the
    user has too few), the rest in training.
    """
    if not (0 < test_fraction < 1 and 0 <= validation_fraction < 1):
        raise ValueError("fractions must be in (0, 1) for test and [0, 1) for validation")
    if test_fraction + validation_fraction >= 1:
        raise ValueError("test_fraction + validation_fraction must be below 1")
    ratings, other = _ratings(events)
    n = pl.len().over("user_id")
    n_test = pl.max_horizontal(_round_half_up(n * test_fraction), pl.lit(1))
    wanted_val = _round_half_up(n * validation_fraction)
    if validation_fraction > 0:
        wanted_val = pl.max_horizontal(wanted_val, pl.lit(1))
    n_val = pl.min_horizontal(wanted_val, pl.max_horizontal(n - n_test, pl.lit(0)))
    pos = pl.int_range(pl.len()).over("user_id")
    part = (
        pl.when(pos >= n - n_test)
        .then(pl.lit("test"))
        .when(pos >= n - n_test - n_val)
        .then(pl.lit("validation"))
        .otherwise(pl.lit("train"))
    )
    tagged = ratings.with_columns(part.alias("_part"))
    starts = tagged.group_by("user_id").agg(
        pl.col("event_timestamp").filter(pl.col("_part") == "validation").min().alias(
            "validation_start"
        ),
        pl.col("event_timestamp").filter(pl.col("_part") == "test").min().alias("test_start"),
    )
    return Split(
        kind="per-user",
        train=tagged.filter(pl.col("_part") == "train").drop("_part"),
        validation=tagged.filter(pl.col("_part") == "validation").drop("_part"),
        test=tagged.filter(pl.col("_part") == "test").drop("_part"),
        cutoffs=starts.sort("user_id"),
        other_events=other,
        positive_threshold=positive_threshold,
        params={
            "test_fraction": test_fraction,
            "validation_fraction": validation_fraction,
            "positive_threshold": positive_threshold,
            "order": "event_timestamp, then item_id",
        },
    )


def global_split(
    events: pl.DataFrame,
    validation_quantile: float = 0.8,
    test_quantile: float = 0.9,
    positive_threshold: float = 4.0,
) -> Split:
    """Global temporal split: ``T1``/``T2`` are rating-time quantiles (an actual event time)."""
    if not 0 < validation_quantile <= test_quantile < 1:
        raise ValueError("need 0 < validation_quantile <= test_quantile < 1")
    ratings, other = _ratings(events)
    if ratings.is_empty():
        raise ValueError("no rating events to split")
    micros = ratings["event_timestamp"].dt.epoch("us").to_numpy()
    t1_us, t2_us = np.quantile(micros, [validation_quantile, test_quantile], method="lower")
    ts_dtype = ratings.schema["event_timestamp"]
    t1, t2 = (pl.Series([int(t)]).cast(pl.Datetime("us")).cast(ts_dtype) for t in (t1_us, t2_us))
    ts = pl.col("event_timestamp")
    cutoffs = ratings.select("user_id").unique().sort("user_id").with_columns(
        pl.lit(t1[0], dtype=ts_dtype).alias("validation_start"),
        pl.lit(t2[0], dtype=ts_dtype).alias("test_start"),
    )
    return Split(
        kind="global",
        train=ratings.filter(ts < t1[0]),
        validation=ratings.filter((ts >= t1[0]) & (ts < t2[0])),
        test=ratings.filter(ts >= t2[0]),
        cutoffs=cutoffs,
        other_events=other,
        positive_threshold=positive_threshold,
        params={
            "validation_quantile": validation_quantile,
            "test_quantile": test_quantile,
            "positive_threshold": positive_threshold,
        },
        t1=t1[0],
        t2=t2[0],
    )
