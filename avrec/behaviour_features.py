"""User and item behaviour features, each row stamped with the time it became true.

A feature row for an entity at time ``t`` describes the state **including every event with
timestamp <= t**. Rows are written at every *change point* of that state:

* each distinct event time of the entity (counts, means, lists change), and
* each time an event leaves a window, ``event time + 1d / 7d / 30d`` (a windowed count
  drops although nothing happened).

So a point-in-time lookup "latest row with event_timestamp <= T" gives the exact value at
``T`` for every feature, with no stale windowed counts. Windows are half-open, ``(t - w, t]``.

Label convention (see :mod:`avrec.training_set`): a label at time ``T`` reads features as of
``T - 1 microsecond``, so its own event, and anything else at the same instant, is never in
the features used to predict it.

Time-dependent quantities ("days since last interaction", "days since first interaction")
are not frozen into rows; rows carry ``last_interaction_at`` / ``first_interaction_at`` and
readers derive the age at their own time (training set: label time; server: now).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

from avrec import tables
from avrec.names import ITEM_BEHAVIOUR, USER_BEHAVIOUR, USER_HISTORY

WINDOWS: dict[str, timedelta] = {
    "1d": timedelta(days=1),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
RECENT_ITEMS = 20
HISTORY_CAP = 1000  # newest rating events kept in a user's served history
POSITIVE_RATING = 4.0


@dataclass(frozen=True)
class BehaviourTables:
    """The feature tables and the genre vocabulary that orders ``genre_affinity``."""

    user: pl.DataFrame
    item: pl.DataFrame
    genres: list[str]
    history: pl.DataFrame | None = None


def genre_vocabulary(items: pl.DataFrame) -> list[str]:
    """Sorted distinct genres of the catalogue: the order of ``genre_affinity``."""
    return sorted(items.get_column("genres").explode().drop_nulls().unique().to_list())


def _last_row_per_instant(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    """State after all events of an entity at one timestamp (rows already in time order)."""
    return frame.group_by([key, "event_timestamp"], maintain_order=True).last()


def _recent_items(events: pl.DataFrame, n: int) -> pl.Series:
    """Per event row: the user's last ``n`` distinct items so far, most recent first."""
    state: dict[int, OrderedDict[int, None]] = {}
    out = []
    for user, item in zip(events["user_id"].to_list(), events["item_id"].to_list(), strict=True):
        recent = state.setdefault(user, OrderedDict())
        recent.pop(item, None)
        recent[item] = None
        if len(recent) > n:
            recent.popitem(last=False)
        out.append(list(reversed(recent)))
    return pl.Series("recent_items", out, dtype=pl.List(pl.Int64()))


def _genre_counts(events: pl.DataFrame, items: pl.DataFrame, genres: list[str]) -> np.ndarray:
    """Per event row, the user's cumulative count of interactions touching each genre.

    Rows must be sorted by user, then time.
    """
    index = {g: i for i, g in enumerate(genres)}
    one_hot_by_item = {}
    for item_id, item_genres in zip(
        items["item_id"].to_list(), items["genres"].to_list(), strict=True
    ):
        row = np.zeros(len(genres), dtype=np.float64)
        row[[index[g] for g in item_genres]] = 1.0
        one_hot_by_item[item_id] = row
    zero = np.zeros(len(genres))
    one_hot = (
        np.stack([one_hot_by_item.get(i, zero) for i in events["item_id"].to_list()])
        if events.height
        else np.zeros((0, len(genres)))
    )
    cum = np.cumsum(one_hot, axis=0)
    users = events["user_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.array([])
    before_group = np.zeros_like(cum)
    for start, stop in zip(starts, [*starts[1:], len(users)], strict=True):
        if start > 0:
            before_group[start:stop] = cum[start - 1]
    return cum - before_group


def _change_points(state: pl.DataFrame, key: str, as_of: datetime) -> pl.DataFrame:
    """Every time the entity's features change, with the cumulative state as of then."""
    ts = pl.col("event_timestamp")
    points = (
        pl.concat([state.select(key, ts)] + [state.select(key, ts + w) for w in WINDOWS.values()])
        .unique()
        .filter(ts <= as_of)
        .sort("event_timestamp")
    )
    state = state.sort("event_timestamp")
    out = points.join_asof(
        state, on="event_timestamp", by=key, strategy="backward", check_sortedness=False
    )
    for name, window in WINDOWS.items():
        shifted = points.with_columns((ts - window).alias("event_timestamp"))
        earlier = shifted.join_asof(
            state.select(key, "event_timestamp", pl.col("cum_n").alias("cum_before")),
            on="event_timestamp",
            by=key,
            strategy="backward",
            check_sortedness=False,
        )
        out = out.with_columns(
            (out["cum_n"] - earlier["cum_before"].fill_null(0)).alias(f"count_{name}")
        )
    return out


def _rating_columns(events: pl.DataFrame, key: str, positive: float) -> list[pl.Expr]:
    is_rating = pl.col("event_type") == "rating"
    rating = pl.when(is_rating).then(pl.col("value"))
    return [
        pl.int_range(pl.len()).over(key).add(1).alias("cum_n"),
        is_rating.cast(pl.Int64).cum_sum().over(key).alias("cum_ratings"),
        rating.fill_null(0.0).cum_sum().over(key).alias("cum_rating_sum"),
        (is_rating & (pl.col("value") >= positive))
        .cast(pl.Int64)
        .cum_sum()
        .over(key)
        .alias("cum_positive"),
        pl.col("event_timestamp").min().over(key).alias("first_interaction_at"),
    ]


def user_features(
    events: pl.DataFrame,
    items: pl.DataFrame,
    genres: list[str],
    as_of: datetime,
    created: datetime,
    positive: float = POSITIVE_RATING,
) -> pl.DataFrame:
    """Behaviour features of every user at every change point up to ``as_of``."""
    ev = events.sort(["user_id", "event_timestamp", "item_id", "event_type"])
    ev = ev.with_columns(_rating_columns(ev, "user_id", positive))
    affinity = _genre_counts(ev, items, genres) / ev["cum_n"].to_numpy()[:, None]
    ev = ev.with_columns(
        pl.Series("genre_affinity", affinity.astype(np.float32)).cast(pl.List(pl.Float32())),
        _recent_items(ev, RECENT_ITEMS),
    )
    state = _last_row_per_instant(ev, "user_id").with_columns(
        pl.col("event_timestamp").alias("last_interaction_at")
    )
    rows = _change_points(state, "user_id", as_of)
    ratings = pl.col("cum_ratings")
    return rows.select(
        "user_id",
        "event_timestamp",
        pl.lit(created).cast(tables.TS).alias("created_timestamp"),
        *[pl.col(f"count_{w}").alias(f"interactions_{w}") for w in WINDOWS],
        pl.col("cum_n").alias("interactions_all"),
        pl.when(ratings > 0).then(pl.col("cum_rating_sum") / ratings).alias("mean_rating"),
        pl.when(ratings > 0).then(pl.col("cum_positive") / ratings).alias("positive_share"),
        "last_interaction_at",
        "genre_affinity",
        "recent_items",
    ).sort(["user_id", "event_timestamp"])


def item_features(
    events: pl.DataFrame, as_of: datetime, created: datetime, positive: float = POSITIVE_RATING
) -> pl.DataFrame:
    """Behaviour features of every item at every change point up to ``as_of``."""
    ev = events.sort(["item_id", "event_timestamp", "user_id", "event_type"])
    ev = ev.with_columns(_rating_columns(ev, "item_id", positive))
    state = _last_row_per_instant(ev, "item_id")
    rows = _change_points(state, "item_id", as_of)
    ratings = pl.col("cum_ratings")
    return rows.select(
        "item_id",
        "event_timestamp",
        pl.lit(created).cast(tables.TS).alias("created_timestamp"),
        *[pl.col(f"count_{w}").alias(f"popularity_{w}") for w in WINDOWS],
        pl.col("cum_n").alias("popularity_all"),
        pl.when(ratings > 0).then(pl.col("cum_rating_sum") / ratings).alias("mean_rating"),
        ratings.alias("rating_count"),
        "first_interaction_at",
    ).sort(["item_id", "event_timestamp"])


def user_history(
    events: pl.DataFrame, as_of: datetime, created: datetime, cap: int = HISTORY_CAP
) -> pl.DataFrame:
    """Each user's rating history as of ``as_of``: one row per user, stamped at their newest
    rating, with the items and ratings of their newest ``cap`` ratings, oldest first (ties in
    time by item id).

    Latest state only (a row per change point would grow with the square of a history): a
    point-in-time read before a user's newest rating finds no row; training and offline
    evaluation rebuild the history at any instant with this function on the events before it.
    """
    ts = pl.col("event_timestamp")
    ratings = (events.filter((pl.col("event_type") == "rating") & (ts <= as_of))
               .sort("user_id", "event_timestamp", "item_id"))
    return (
        ratings.group_by("user_id", maintain_order=True).tail(cap)
        .group_by("user_id", maintain_order=True)
        .agg(ts.max(), pl.col("item_id").alias("history_items"),
             pl.col("value").cast(pl.Float32).alias("history_ratings"))
        .select("user_id", "event_timestamp",
                pl.lit(created).cast(tables.TS).alias("created_timestamp"),
                "history_items", "history_ratings")
    )


def compute(
    events: pl.DataFrame,
    items: pl.DataFrame,
    as_of: datetime | None = None,
    created: datetime | None = None,
    positive: float = POSITIVE_RATING,
) -> BehaviourTables:
    """Both feature tables from the offline ``events`` and ``items`` tables."""
    now = datetime.now(UTC)
    as_of, created = as_of or now, created or now
    genres = genre_vocabulary(items)
    return BehaviourTables(
        user=user_features(events, items, genres, as_of, created, positive),
        item=item_features(events, as_of, created, positive),
        genres=genres,
        history=user_history(events, as_of, created),
    )


def write(features: BehaviourTables, out_dir: Path) -> dict[str, int]:
    """Write ``user_behaviour``, ``item_behaviour``, ``user_history`` and the genre
    vocabulary; row counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    written = [(USER_BEHAVIOUR, features.user), (ITEM_BEHAVIOUR, features.item)]
    if features.history is not None:
        written.append((USER_HISTORY, features.history))
    for name, frame in written:
        path = tables.table_path(name, out_dir)
        tmp = path.with_suffix(".parquet.tmp")
        frame.write_parquet(tmp)
        tmp.replace(path)
        counts[name] = frame.height
    (out_dir / "genre_vocabulary.json").write_text(json.dumps(features.genres, indent=1))
    return counts


def build(offline: Path | None = None, as_of: datetime | None = None) -> dict[str, int]:
    """Read events (with those logged online) and items, compute and write both tables."""
    events, items = tables.read_events(offline), tables.read_table("items", offline)
    root = offline or tables.table_path("events").parent
    return write(compute(events, items, as_of=as_of), root)
