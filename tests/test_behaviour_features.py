"""Behaviour features against a brute-force oracle computed straight from the events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from avrec import behaviour_features as bf
from avrec import tables

T0 = datetime(2020, 1, 1, tzinfo=UTC)
CREATED = datetime(2021, 1, 1, tzinfo=UTC)


def _events(rows: list[tuple[int, int, str, float | None, datetime]]) -> pl.DataFrame:
    return pl.DataFrame(
        [dict(zip(tables.EVENTS_SCHEMA, r, strict=True)) for r in rows],
        schema=tables.EVENTS_SCHEMA,
    )


ITEMS = pl.DataFrame(
    [
        {
            "item_id": 1,
            "title": "a",
            "year": None,
            "genres": ["Comedy"],
            "tags": [],
            "description": None,
            "image_path": None,
        },
        {
            "item_id": 2,
            "title": "b",
            "year": None,
            "genres": ["Drama", "Comedy"],
            "tags": [],
            "description": None,
            "image_path": None,
        },
        {
            "item_id": 3,
            "title": "c",
            "year": None,
            "genres": [],
            "tags": [],
            "description": None,
            "image_path": None,
        },
    ],
    schema=tables.ITEMS_SCHEMA,
)

EVENTS = _events(
    [
        (7, 1, "rating", 5.0, T0),
        (7, 2, "rating", 2.0, T0),  # same instant as the first
        (7, 3, "tag", None, T0 + timedelta(hours=30)),
        (7, 1, "rating", 4.0, T0 + timedelta(days=3)),  # re-rating moves item 1 to the front
        (8, 2, "rating", 4.5, T0 + timedelta(days=1)),
    ]
)


def _at(frame: pl.DataFrame, key: str, entity: int, t: datetime) -> dict:
    """Point-in-time lookup: latest row with event_timestamp <= t."""
    rows = frame.filter((pl.col(key) == entity) & (pl.col("event_timestamp") <= t))
    return rows.sort("event_timestamp").row(-1, named=True)


def _oracle_user(events: pl.DataFrame, user: int, t: datetime) -> dict:
    seen = events.filter((pl.col("user_id") == user) & (pl.col("event_timestamp") <= t))
    ratings = seen.filter(pl.col("event_type") == "rating")["value"].to_list()

    def window(days: int) -> int:
        return seen.filter(pl.col("event_timestamp") > t - timedelta(days=days)).height

    genres = bf.genre_vocabulary(ITEMS)
    per_item = dict(zip(ITEMS["item_id"].to_list(), ITEMS["genres"].to_list(), strict=True))
    counts = np.zeros(len(genres))
    for item in seen["item_id"].to_list():
        for g in per_item[item]:
            counts[genres.index(g)] += 1
    order = seen.sort(["event_timestamp", "item_id", "event_type"])["item_id"].to_list()
    recent = list(dict.fromkeys(reversed(order)))[: bf.RECENT_ITEMS]
    return {
        "interactions_1d": window(1),
        "interactions_7d": window(7),
        "interactions_30d": window(30),
        "interactions_all": seen.height,
        "mean_rating": sum(ratings) / len(ratings) if ratings else None,
        "positive_share": sum(r >= 4.0 for r in ratings) / len(ratings) if ratings else None,
        "last_interaction_at": seen["event_timestamp"].max(),
        "genre_affinity": list(counts / seen.height),
        "recent_items": recent,
    }


@pytest.fixture(scope="module")
def computed() -> bf.BehaviourTables:
    return bf.compute(EVENTS, ITEMS, as_of=T0 + timedelta(days=100), created=CREATED)


@pytest.mark.parametrize(
    "offset_hours",
    [0, 1, 23.999, 24, 29, 30, 48, 54, 72, 96, 24 * 7, 24 * 10, 24 * 30, 24 * 33, 24 * 40],
)
def test_user_features_match_oracle(computed: bf.BehaviourTables, offset_hours: float) -> None:
    t = T0 + timedelta(hours=offset_hours)
    got, want = _at(computed.user, "user_id", 7, t), _oracle_user(EVENTS, 7, t)
    for name, value in want.items():
        if name == "genre_affinity":
            np.testing.assert_allclose(got[name], value, rtol=1e-6)
        elif isinstance(value, float):
            assert got[name] == pytest.approx(value), name
        else:
            assert got[name] == value, (name, t)


def test_windows_drop_at_exit_points(computed: bf.BehaviourTables) -> None:
    """A count falls to zero exactly when its last event leaves the window (t - w, t]."""
    times = computed.user.filter(pl.col("user_id") == 8)["event_timestamp"].to_list()
    first = T0 + timedelta(days=1)
    assert times == [first + timedelta(days=d) for d in (0, 1, 7, 30)]
    assert _at(computed.user, "user_id", 8, first + timedelta(days=1))["interactions_1d"] == 0
    just_before = first + timedelta(days=1) - timedelta(microseconds=1)
    assert _at(computed.user, "user_id", 8, just_before)["interactions_1d"] == 1
    assert _at(computed.user, "user_id", 8, first + timedelta(days=30))["interactions_30d"] == 0


def test_item_features(computed: bf.BehaviourTables) -> None:
    got = _at(computed.item, "item_id", 2, T0 + timedelta(days=1, hours=1))
    assert got["popularity_1d"] == 1 and got["popularity_all"] == 2
    assert got["mean_rating"] == pytest.approx(3.25) and got["rating_count"] == 2
    assert got["first_interaction_at"] == T0
    tagged = _at(computed.item, "item_id", 3, T0 + timedelta(days=2))
    assert tagged["rating_count"] == 0 and tagged["mean_rating"] is None


def test_no_rows_in_the_future_of_as_of() -> None:
    as_of = T0 + timedelta(days=2)
    computed = bf.compute(EVENTS, ITEMS, as_of=as_of, created=CREATED)
    assert computed.user["event_timestamp"].max() <= as_of
    assert computed.item["event_timestamp"].max() <= as_of


def test_real_data_spot_check(movielens_offline) -> None:
    """On MovieLens, 200 random (user, time) lookups equal the brute-force recount."""
    events = tables.read_table("events", movielens_offline)
    users = tables.read_table("user_behaviour", movielens_offline)
    rng = np.random.default_rng(3)
    sample = events.sample(200, seed=3)
    for row in sample.iter_rows(named=True):
        t = row["event_timestamp"] + timedelta(hours=float(rng.uniform(-48, 24 * 40)))
        seen = events.filter(
            (pl.col("user_id") == row["user_id"]) & (pl.col("event_timestamp") <= t)
        )
        if seen.is_empty():
            assert users.filter(
                (pl.col("user_id") == row["user_id"]) & (pl.col("event_timestamp") <= t)
            ).is_empty()
            continue
        got = _at(users, "user_id", row["user_id"], t)
        assert got["interactions_all"] == seen.height
        assert (
            got["interactions_7d"]
            == seen.filter(pl.col("event_timestamp") > t - timedelta(days=7)).height
        )
        assert (
            got["interactions_30d"]
            == seen.filter(pl.col("event_timestamp") > t - timedelta(days=30)).height
        )
