"""The Spark behaviour features job equals the polars job, table by table, row by row.

Synthetic events built to hit the edges (ties in time, events exactly a window apart,
re-ratings, unknown items, items without genres, a logged batch, ``as_of`` mid-history),
then the real MovieLens data, both engines with the same ``as_of`` and created time.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from avrec import behaviour_features as bf
from avrec import cli, tables
from avrec.spark import behaviour_features as sbf
from tests.spark.conftest import assert_same_rows

pytestmark = pytest.mark.slow  # a JVM: kept out of the inner loop

T0 = datetime(2020, 1, 1, tzinfo=UTC)
AS_OF = T0 + timedelta(days=50)
CREATED = datetime(2021, 1, 1, tzinfo=UTC)
KEYS = {"user_behaviour": ["user_id", "event_timestamp"],
        "item_behaviour": ["item_id", "event_timestamp"],
        "user_history": ["user_id"]}


def synthetic_offline(root: Path, seed: int = 3) -> Path:
    """events, items and one logged batch: 800 events of 30 users on 40 items (item 99
    unknown to the catalogue) on a 12-hour grid, so instants tie and windows meet events."""
    rng = np.random.default_rng(seed)
    n = 800
    kinds = rng.choice(["rating", "tag", "play"], size=n, p=[0.7, 0.1, 0.2])
    ratings = rng.integers(1, 11, size=n) / 2
    events = pl.DataFrame({
        "user_id": rng.integers(1, 31, size=n),
        "item_id": np.where(rng.random(n) < 0.03, 99, rng.integers(1, 41, size=n)),
        "event_type": kinds,
        "value": [float(r) if k == "rating" else None for k, r in zip(kinds, ratings,
                                                                        strict=True)],
        "event_timestamp": [T0 + timedelta(hours=12 * int(h)) for h in rng.integers(0, 130, n)],
    }, schema=tables.EVENTS_SCHEMA)
    genres = ["Action", "Comedy", "Drama", "Sci-Fi", "(no genres listed)"]
    items = pl.DataFrame({
        "item_id": range(1, 41),
        "title": [f"t{i}" for i in range(1, 41)],
        "year": [None] * 40,
        "genres": [[] if i % 9 == 0 else sorted({genres[i % 5], genres[(i * 7) % 5]})
                   for i in range(1, 41)],
        "tags": [[]] * 40,
        "description": [None] * 40,
        "image_path": [None] * 40,
    }, schema=tables.ITEMS_SCHEMA)
    offline = root / "offline"
    (offline / tables.EVENT_LOG).mkdir(parents=True)
    events.head(700).write_parquet(tables.table_path("events", offline))
    events.tail(100).with_columns(pl.lit("e").alias(tables.EVENT_ID)).write_parquet(
        offline / tables.EVENT_LOG / "batch-1.parquet")
    items.write_parquet(tables.table_path("items", offline))
    return offline


def compare_engines(offline: Path, out: Path, as_of: datetime,
                    created: datetime | None = CREATED) -> dict[str, int]:
    """Both engines on ``offline``, as of ``as_of``; the Spark tables read from ``out``
    (without ``created``: the time the job ran, compared apart)."""
    want = bf.compute(tables.read_events(offline), tables.read_table("items", offline),
                      as_of=as_of, created=created or CREATED)
    counts = {} if created is None else sbf.build(offline, as_of=as_of, out_dir=out,
                                                  created=created)
    for name, frame in (("user_behaviour", want.user), ("item_behaviour", want.item),
                        ("user_history", want.history)):
        assert frame is not None
        got = tables.read_table(name, out)
        if created is None:
            assert got["created_timestamp"].n_unique() == 1
            got = got.with_columns(pl.lit(CREATED, tables.TS).alias("created_timestamp"))
        assert_same_rows(got, frame, KEYS[name])
        counts[name] = got.height
    assert json.loads((out / "genre_vocabulary.json").read_text()) == want.genres
    return counts


def test_synthetic_edges_equal_polars_through_the_cli(spark, tmp_path: Path) -> None:
    offline = synthetic_offline(tmp_path)
    assert cli.main(["features", "--engine", "spark", "--spark-master", "local[2]",
                     "--offline", str(offline), "--as-of", AS_OF.isoformat()]) == 0
    counts = compare_engines(offline, offline, AS_OF, created=None)
    assert counts["user_behaviour"] > 700  # change points beyond the events themselves


def test_movielens_equal_polars(spark, movielens_offline: Path, tmp_path: Path) -> None:
    """A fifth of the real users (all their events, the whole catalogue): the same code paths
    as the full data in a third of the time (``bench/spark_offline.py`` runs all of it)."""
    offline = tmp_path / "offline"
    offline.mkdir()
    events = tables.read_table("events", movielens_offline)
    events.filter(pl.col("user_id") % 5 == 0).write_parquet(tables.table_path("events", offline))
    tables.read_table("items", movielens_offline).write_parquet(
        tables.table_path("items", offline))
    counts = compare_engines(offline, tmp_path / "spark", datetime(2018, 9, 25, tzinfo=UTC))
    assert counts["user_history"] == events.filter(pl.col("user_id") % 5 == 0)[
        "user_id"].n_unique()
