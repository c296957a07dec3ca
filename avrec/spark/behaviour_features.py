"""The behaviour features job on Spark: the tables of :mod:`avrec.behaviour_features`.

Same semantics, same Parquet tables, equal value by value (``tests/spark``). The polars job
walks each entity's events in order; here every feature is a window aggregate over one
row per *change point* (event instants and ``instant + window``, up to ``as_of``):

* per (entity, instant) the events are summed once: count, ratings, rating sum, positive
  ratings, and for users one count per genre;
* cumulative state at a point is a running sum over ``RANGE UNBOUNDED PRECEDING``;
* the count in a window ``(t - w, t]`` is a sum over ``RANGE (w - 1 µs) PRECEDING``
  (instants carry their event counts, the other points zero), so no as-of join is needed;
* ``recent_items`` (last distinct items, most recent first) is the one sequential state:
  a grouped map per user, forward-filled to the points where no event happened.

Partitioned by entity, so it scales out with users and items; the output is written as
the single Parquet files the Feast sources name (:func:`avrec.spark.session.write_parquet`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from avrec import tables
from avrec.behaviour_features import HISTORY_CAP, POSITIVE_RATING, RECENT_ITEMS, WINDOWS
from avrec.names import ITEM_BEHAVIOUR, USER_BEHAVIOUR, USER_HISTORY
from avrec.spark.session import spark_session, write_parquet

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import Column, DataFrame, SparkSession

US = "__us"  # event time in microseconds since the epoch: the window order


def _micros(delta: timedelta) -> int:
    return delta // timedelta(microseconds=1)


def read_events(spark: SparkSession, offline: Path | None = None) -> DataFrame:
    """The events table plus the service's logged batches (as :func:`tables.read_events`)."""
    events = spark.read.parquet(str(tables.table_path("events", offline)))
    events = events.select(*tables.EVENTS_SCHEMA)
    logged = tables.read_event_log(offline)  # small: what the service logged since
    if logged:
        import polars as pl

        batch = pl.concat([f.select(list(tables.EVENTS_SCHEMA)) for f in logged],
                          how="vertical_relaxed")
        events = events.unionByName(spark.createDataFrame(batch.to_pandas(), events.schema))
    return events


def genre_vocabulary(items: DataFrame) -> list[str]:
    """Sorted distinct genres of the catalogue: the order of ``genre_affinity``."""
    from pyspark.sql import functions as F

    rows = items.select(F.explode("genres").alias("g")).where("g IS NOT NULL").distinct()
    return sorted(row.g for row in rows.collect())


def _instant_sums(positive: float) -> list[Column]:
    """Per (entity, instant): events, ratings, their sum, positive ratings."""
    from pyspark.sql import functions as F

    is_rating = F.col("event_type") == "rating"
    return [
        F.count(F.lit(1)).alias("n"),
        F.sum(is_rating.cast("long")).alias("ratings"),
        F.sum(F.when(is_rating, F.col("value")).otherwise(0.0)).alias("rating_sum"),
        F.sum((is_rating & (F.col("value") >= positive)).cast("long")).alias("positives"),
    ]


def _instants(events: DataFrame, key: str, sums: list[Column]) -> DataFrame:
    """The ``sums`` per (entity, instant). ``events`` come hash-partitioned by entity, so no
    later step (points, running windows, recent items) needs a shuffle of its own."""
    return events.groupBy(key, "event_timestamp").agg(*sums)


def _change_points(instants: DataFrame, key: str, as_of: datetime) -> DataFrame:
    """Every (entity, time) where a feature changes, up to ``as_of``, with the instant's
    sums (zero where no event happened) and ``__us``."""
    from pyspark.sql import functions as F

    sums = [c for c in instants.columns if c not in (key, "event_timestamp")]
    us = F.unix_micros("event_timestamp")
    points = [F.struct(us.alias(US), *sums)] + [
        F.struct((us + _micros(w)).alias(US), *[F.lit(0).cast(instants.schema[s].dataType)
                                                .alias(s) for s in sums])
        for w in WINDOWS.values()
    ]
    last = _micros(as_of - datetime(1970, 1, 1, tzinfo=UTC))
    return (instants.select(key, F.explode(F.array(*points)).alias("p"))
            .select(key, "p.*")
            .where(F.col(US) <= last)
            .groupBy(key, US).agg(*[F.sum(s).alias(s) for s in sums])
            .withColumn("event_timestamp", F.timestamp_micros(US)))


def _running(frame: DataFrame, key: str, sums: list[str]) -> DataFrame:
    """Cumulative ``cum_<sum>`` and windowed ``count_<w>`` of the instants' sums, plus
    ``last_interaction_at`` and ``first_interaction_at``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    order = Window.partitionBy(key).orderBy(US)
    upto = order.rangeBetween(Window.unboundedPreceding, Window.currentRow)
    columns = {f"cum_{s}": F.sum(s).over(upto) for s in sums}
    for name, window in WINDOWS.items():
        columns[f"count_{name}"] = F.sum("n").over(order.rangeBetween(-(_micros(window) - 1), 0))
    ts = F.col("event_timestamp")
    columns["last_interaction_at"] = F.max(F.when(F.col("n") > 0, ts)).over(upto)
    columns["first_interaction_at"] = F.min(ts).over(upto)  # the first point: an instant
    return frame.withColumns(columns)


def _means() -> list[Column]:
    from pyspark.sql import functions as F

    ratings = F.col("cum_ratings")
    return [
        F.when(ratings > 0, F.col("cum_rating_sum") / ratings).alias("mean_rating"),
        F.when(ratings > 0, F.col("cum_positives") / ratings).alias("positive_share"),
    ]


def _recent_items_per_user(events: pa.Table) -> pa.Table:
    """One user's events (``user_id``, ``item_id``, ``__us``): at each of their instants, the
    last ``RECENT_ITEMS`` distinct items, most recent first (ties in time by item id)."""
    import pyarrow as pa

    events = events.sort_by([(US, "ascending"), ("item_id", "ascending")])
    recent: OrderedDict[int, None] = OrderedDict()
    out: dict[int, list[int]] = {}
    for us, item in zip(events[US].to_pylist(), events["item_id"].to_pylist(), strict=True):
        recent.pop(item, None)
        recent[item] = None
        if len(recent) > RECENT_ITEMS:
            recent.popitem(last=False)
        out[us] = list(reversed(recent))
    user = events["user_id"][0].as_py()
    return pa.table({"user_id": pa.array([user] * len(out), pa.int64()),
                     US: pa.array(list(out), pa.int64()),
                     "recent_items": pa.array(list(out.values()), pa.list_(pa.int64()))})


def user_features(
    events: DataFrame, items: DataFrame, genres: list[str], as_of: datetime, created: datetime,
    positive: float = POSITIVE_RATING,
) -> DataFrame:
    """Behaviour features of every user at every change point up to ``as_of``."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    key = "user_id"
    events = events.repartition(key)
    tagged = events.join(F.broadcast(items.select("item_id", "genres")), "item_id", "left")
    per_genre = [
        F.sum(F.coalesce(F.array_contains("genres", g), F.lit(False)).cast("long")).alias(f"g{i}")
        for i, g in enumerate(genres)
    ]
    instants = _instants(tagged, key, [*_instant_sums(positive), *per_genre])
    genre_sums = [f"g{i}" for i in range(len(genres))]
    rows = _running(_change_points(instants, key, as_of), key,
                    ["n", "ratings", "rating_sum", "positives", *genre_sums])
    cum_n = F.col("cum_n")
    affinity = F.array(*[(F.col(f"cum_{g}").cast("double") / cum_n).cast("float")
                         for g in genre_sums]).cast("array<float>")
    recent = (events.select(key, "item_id", F.unix_micros("event_timestamp").alias(US))
              .groupBy(key)
              .applyInArrow(_recent_items_per_user,
                             f"{key} long, {US} long, recent_items array<long>"))
    carried = Window.partitionBy(key).orderBy(US).rowsBetween(Window.unboundedPreceding, 0)
    rows = (rows.join(recent, [key, US], "left")
            .withColumn("recent_items", F.last("recent_items", ignorenulls=True).over(carried)))
    return rows.select(
        key,
        "event_timestamp",
        F.lit(created).alias("created_timestamp"),
        *[F.col(f"count_{w}").alias(f"interactions_{w}") for w in WINDOWS],
        cum_n.alias("interactions_all"),
        *_means(),
        "last_interaction_at",
        affinity.alias("genre_affinity"),
        "recent_items",
    )


def item_features(
    events: DataFrame, as_of: datetime, created: datetime, positive: float = POSITIVE_RATING
) -> DataFrame:
    """Behaviour features of every item at every change point up to ``as_of``."""
    from pyspark.sql import functions as F

    key = "item_id"
    instants = _instants(events.repartition(key), key, _instant_sums(positive))
    rows = _running(_change_points(instants, key, as_of), key,
                    ["n", "ratings", "rating_sum", "positives"])
    mean_rating, _ = _means()
    return rows.select(
        key,
        "event_timestamp",
        F.lit(created).alias("created_timestamp"),
        *[F.col(f"count_{w}").alias(f"popularity_{w}") for w in WINDOWS],
        F.col("cum_n").alias("popularity_all"),
        mean_rating,
        F.col("cum_ratings").alias("rating_count"),
        "first_interaction_at",
    )


def user_history(
    events: DataFrame, as_of: datetime, created: datetime, cap: int = HISTORY_CAP
) -> DataFrame:
    """Each user's newest ``cap`` ratings as of ``as_of``, oldest first (ties by item id):
    one row per user stamped at the newest (cf. :func:`avrec.behaviour_features.user_history`)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    ts = F.col("event_timestamp")
    newest = Window.partitionBy("user_id").orderBy(ts.desc(), F.col("item_id").desc())
    ratings = (events.where((F.col("event_type") == "rating") & (ts <= F.lit(as_of)))
               .withColumn("__rank", F.row_number().over(newest))
               .where(F.col("__rank") <= cap))
    kept = F.sort_array(F.collect_list(F.struct(ts.alias("t"), "item_id", "value")))
    return ratings.groupBy("user_id").agg(F.max(ts).alias("event_timestamp"),
                                          kept.alias("__kept")).select(
        "user_id",
        "event_timestamp",
        F.lit(created).alias("created_timestamp"),
        F.transform("__kept", lambda r: r["item_id"]).alias("history_items"),
        F.transform("__kept", lambda r: r["value"].cast("float")).alias("history_ratings"),
    )


def compute(
    spark: SparkSession,
    offline: Path | None = None,
    as_of: datetime | None = None,
    created: datetime | None = None,
    positive: float = POSITIVE_RATING,
) -> tuple[dict[str, DataFrame], list[str]]:
    """The three tables as (lazy) Spark frames, and the genre vocabulary."""
    now = datetime.now(UTC)
    as_of, created = as_of or now, created or now
    events = read_events(spark, offline)
    items = spark.read.parquet(str(tables.table_path("items", offline)))
    genres = genre_vocabulary(items)
    frames = {
        USER_BEHAVIOUR: user_features(events, items, genres, as_of, created, positive),
        ITEM_BEHAVIOUR: item_features(events, as_of, created, positive),
        USER_HISTORY: user_history(events, as_of, created),
    }
    return frames, genres


SORT_KEYS = {
    USER_BEHAVIOUR: ["user_id", "event_timestamp"],
    ITEM_BEHAVIOUR: ["item_id", "event_timestamp"],
    USER_HISTORY: ["user_id"],
}


def build(
    offline: Path | None = None,
    as_of: datetime | None = None,
    master: str | None = None,
    out_dir: Path | None = None,
    created: datetime | None = None,
) -> dict[str, int]:
    """``avrec features --engine spark``: compute and write the tables the polars job
    writes (``out_dir``, default the offline directory); row counts."""
    spark = spark_session(master)
    frames, genres = compute(spark, offline, as_of, created)
    out_dir = out_dir or offline or tables.table_path("events").parent
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {name: write_parquet(frame, tables.table_path(name, out_dir), SORT_KEYS[name])
              for name, frame in frames.items()}
    (out_dir / "genre_vocabulary.json").write_text(json.dumps(genres, indent=1))
    return counts

