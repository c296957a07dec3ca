"""Training sets: labels, negatives and the point-in-time join, checked by brute force."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from avrec import tables
from avrec import training_set as ts

SPEC = ts.TrainingSetSpec(
    start=datetime(2017, 6, 1, tzinfo=UTC),
    end=datetime(2018, 1, 1, tzinfo=UTC),
    negatives=3,
    feature_service="behaviour_features",
)
TTL = {"user_behaviour": timedelta(days=730), "item_behaviour": None}  # items: no expiry


@pytest.fixture(scope="module")
def training(feature_store) -> pl.DataFrame:
    # the reference engine, checked by brute force (test_pit_join.py: DuckDB's rows equal it)
    return ts.build_training_set(SPEC, store=feature_store, engine="feast")


def _oracle_row(
    table: pl.DataFrame, key: str, entity: int, lookup: datetime, ttl: timedelta | None
) -> dict | None:
    """Brute force: every feature row of the entity, keep valid ones, take the latest."""
    best = None
    for row in table.filter(pl.col(key) == entity).iter_rows(named=True):
        ts_ = row["event_timestamp"]
        if ts_ <= lookup and (ttl is None or lookup - ts_ <= ttl):
            rank = (ts_, row["created_timestamp"])
            if best is None or rank > best[0]:
                best = (rank, row)
    return None if best is None else best[1]


def test_point_in_time_join_matches_brute_force(training: pl.DataFrame, movielens_offline) -> None:
    sample = training.sample(400, seed=11)
    views = {
        "user_behaviour": ("user_id", tables.read_table("user_behaviour", movielens_offline)),
        "item_behaviour": ("item_id", tables.read_table("item_behaviour", movielens_offline)),
    }
    nulls = 0
    for row in sample.iter_rows(named=True):
        lookup = row["label_timestamp"] - ts.FEATURE_LAG
        for view, (key, table) in views.items():
            want = _oracle_row(table, key, row[key], lookup, TTL[view])
            names = [
                c for c in table.columns if c not in (key, "event_timestamp", "created_timestamp")
            ]
            for name in names:
                got = row[f"{view}__{name}"]
                expected = None if want is None else want[name]
                if isinstance(expected, float):
                    assert got == pytest.approx(expected), (view, name, row)
                elif isinstance(expected, list) and expected and isinstance(expected[0], float):
                    np.testing.assert_allclose(got, expected, rtol=1e-6)
                else:
                    assert got == expected, (view, name, row)
            nulls += want is None
    assert nulls < len(sample)  # the sample exercises real joins, not only misses


def test_label_never_sees_its_own_event(training: pl.DataFrame, movielens_offline) -> None:
    events = tables.read_table("events", movielens_offline)
    positives = training.filter(pl.col("sample_type") == "positive").sample(150, seed=5)
    for row in positives.iter_rows(named=True):
        before = events.filter(
            (pl.col("user_id") == row["user_id"])
            & (pl.col("event_timestamp") < row["label_timestamp"])
        )
        got = row["user_behaviour__interactions_all"]
        assert got in (None, before.height)
        recent = row["user_behaviour__recent_items"] or []
        touched_before = before.filter(pl.col("item_id") == row["item_id"]).height > 0
        assert touched_before or row["item_id"] not in recent


def test_negatives_are_items_not_yet_touched(training: pl.DataFrame, movielens_offline) -> None:
    events = tables.read_table("events", movielens_offline)
    first = events.group_by("user_id", "item_id").agg(pl.col("event_timestamp").min().alias("f"))
    negatives = training.filter(pl.col("sample_type") == "sampled_negative")
    touched = negatives.join(first, on=["user_id", "item_id"]).filter(
        pl.col("f") <= pl.col("label_timestamp")
    )
    assert touched.is_empty()
    positives = training.filter(pl.col("sample_type") == "positive").height
    assert negatives.height == SPEC.negatives * positives
    assert not training.select(
        pl.struct("user_id", "item_id", "label_timestamp").is_duplicated().any()
    ).item()


def test_schema_order_and_determinism(training: pl.DataFrame, movielens_offline) -> None:
    assert training.schema["user_id"] == pl.Int64 and training.schema["item_id"] == pl.Int64
    assert training.schema["user_behaviour__recent_items"] == pl.List(pl.Int64)
    assert training.schema["user_behaviour__genre_affinity"] == pl.List(pl.Float32)
    assert training.schema["user_behaviour__interactions_all"] == pl.Int64
    keys = training.select("label_timestamp", "user_id", "item_id")
    assert keys.equals(keys.sort(["label_timestamp", "user_id", "item_id"]))
    events = tables.read_table("events", movielens_offline)
    items = tables.read_table("items", movielens_offline)
    again = ts.build_labels(events, items, SPEC)
    assert again.equals(training.select(again.columns))
    other_seed = ts.build_labels(
        events,
        items,
        ts.TrainingSetSpec(start=SPEC.start, end=SPEC.end, negatives=3, seed=SPEC.seed + 1),
    )
    assert not other_seed.equals(again)


def test_derived_ages(training: pl.DataFrame) -> None:
    row = training.drop_nulls("user_behaviour__last_interaction_at").row(0, named=True)
    age = (row["label_timestamp"] - row["user_behaviour__last_interaction_at"]) / timedelta(days=1)
    assert row["days_since_last_interaction"] == pytest.approx(age)
    assert (training["days_since_last_interaction"].drop_nulls() >= 0).all()


def test_popularity_sampling_prefers_popular_items(movielens_offline) -> None:
    events = tables.read_table("events", movielens_offline)
    items = tables.read_table("items", movielens_offline)
    spec = ts.TrainingSetSpec(start=SPEC.start, end=SPEC.end, negatives=3, sampling="popularity")
    negatives = ts.build_labels(events, items, spec).filter(
        pl.col("sample_type") == "sampled_negative"
    )
    counts = events.group_by("item_id").len()
    mean_pop = negatives.join(counts, on="item_id", how="left")["len"].fill_null(0).mean()
    uniform = ts.build_labels(events, items, SPEC).filter(
        pl.col("sample_type") == "sampled_negative"
    )
    mean_uniform = uniform.join(counts, on="item_id", how="left")["len"].fill_null(0).mean()
    assert mean_pop > 5 * mean_uniform


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"start": datetime(2018, 1, 1, tzinfo=UTC), "end": datetime(2017, 1, 1, tzinfo=UTC)},
            "empty window",
        ),
        ({"start": datetime(2017, 1, 1), "end": datetime(2018, 1, 1)}, "timezone"),
        ({"negatives": -1}, "negatives"),
        ({"sampling": "zipf"}, "sampling"),
    ],
)
def test_bad_specs_are_clear_errors(kwargs: dict, message: str) -> None:
    args = {"start": SPEC.start, "end": SPEC.end, **kwargs}
    with pytest.raises(ts.TrainingSetError, match=message):
        ts.TrainingSetSpec(**args)


def test_pandas_output_keeps_ints_and_lists(training: pl.DataFrame) -> None:
    frame = ts.to_pandas(training)
    assert str(frame["user_id"].dtype) == "int64[pyarrow]"
    column = frame["user_behaviour__interactions_all"]
    assert column.isna().any() and str(column.dtype) == "int64[pyarrow]"
    assert isinstance(frame["user_behaviour__recent_items"].dropna().iloc[0], list)
