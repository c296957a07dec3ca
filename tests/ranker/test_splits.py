"""Split invariants on hand-made events and on the real MovieLens data."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from avrec import tables
from avrec.ranker.splits import Split, global_split, per_user_split

T0 = datetime(2020, 1, 1, tzinfo=UTC)


def _events(rows: list[tuple[int, int, str, float | None, int]]) -> pl.DataFrame:
    """(user, item, event_type, value, seconds after T0) rows as an events table."""
    return pl.DataFrame(
        [
            {"user_id": u, "item_id": i, "event_type": t, "value": v,
             "event_timestamp": T0 + timedelta(seconds=s)}
            for u, i, t, v, s in rows
        ],
        schema=tables.EVENTS_SCHEMA,
        orient="row",
    )


def test_per_user_split_by_hand_with_ties_broken_by_item_id() -> None:
    # User 1: ten ratings; items 10..17 at seconds 0..7, then items 19 and 18 at the same second.
    rows = [(1, 10 + s, "rating", 4.0, s) for s in range(8)]
    rows += [(1, 19, "rating", 5.0, 8), (1, 18, "rating", 2.0, 8)]
    split = per_user_split(_events(rows))
    assert split.train["item_id"].to_list() == list(range(10, 17))  # 7 = 10 - 2 - 1
    assert split.validation["item_id"].to_list() == [17]
    assert split.test["item_id"].to_list() == [18, 19]  # the tie in item order
    cut = split.cutoffs.row(0, named=True)
    assert cut["validation_start"] == T0 + timedelta(seconds=7)
    assert cut["test_start"] == T0 + timedelta(seconds=8)


def test_users_without_a_test_positive_are_not_evaluated_and_tags_count_as_seen() -> None:
    rows = [(1, i, "rating", 5.0, i) for i in range(1, 11)]  # positives everywhere
    rows += [(2, i, "rating", 5.0 if i < 9 else 1.0, i) for i in range(1, 11)]  # negative test
    rows += [(1, 10, "tag", None, 0)]  # user 1 tagged item 10 before rating it: already seen
    rows += [(1, 50, "tag", None, 0)]
    split = per_user_split(_events(rows))
    test = split.stage("test")
    assert test.users.tolist() == [1]
    assert test.positives.filter(pl.col("user_id") == 1)["item_id"].to_list() == [9]
    assert (1, 50) in test.seen.rows()
    assert test.labelled_pairs.filter(pl.col("user_id") == 2)["label"].to_list() == [0, 0]
    validation = split.stage("validation")
    assert validation.users.tolist() == [1, 2]
    assert validation.fit.height == split.train.height
    assert test.fit.height == split.train.height + split.validation.height


def test_split_options_change_the_proportions() -> None:
    rows = [(1, i, "rating", 5.0, i) for i in range(1, 21)]
    split = per_user_split(_events(rows), test_fraction=0.5, validation_fraction=0.0)
    assert (split.train.height, split.validation.height, split.test.height) == (10, 0, 10)
    with pytest.raises(ValueError):
        per_user_split(_events(rows), test_fraction=0.7, validation_fraction=0.3)


def test_global_split_by_hand() -> None:
    # Ten ratings at seconds 1..10: the 80th/90th percentiles (lower) are seconds 8 and 9.
    rows = [(1 + s % 3, s, "rating", 4.0, s) for s in range(1, 10)]
    rows.append((7, 10, "rating", 5.0, 10))  # a user who only appears in test
    split = global_split(_events(rows))
    assert split.t1 == T0 + timedelta(seconds=8)
    assert split.t2 == T0 + timedelta(seconds=9)
    assert sorted(split.train["item_id"].to_list()) == list(range(1, 8))
    assert split.validation["item_id"].to_list() == [8]
    assert sorted(split.test["item_id"].to_list()) == [9, 10]
    assert split.stage("test").users.tolist() == [1]  # user 7 has no history


def _check_per_user_invariants(split: Split) -> None:
    parts = {"train": split.train, "validation": split.validation, "test": split.test}
    joined = {
        name: frame.join(split.cutoffs, on="user_id") for name, frame in parts.items()
    }
    ts = pl.col("event_timestamp")
    assert joined["test"].filter(ts < pl.col("test_start")).is_empty()
    assert joined["validation"].filter(
        (ts < pl.col("validation_start")) | (ts > pl.col("test_start"))
    ).is_empty()
    assert joined["train"].filter(ts > pl.col("validation_start")).is_empty()
    counts = pl.concat(
        [f.select("user_id").with_columns(pl.lit(n).alias("part")) for n, f in parts.items()]
    ).group_by("user_id").agg(
        pl.len().alias("n"),
        (pl.col("part") == "test").sum().alias("test"),
        (pl.col("part") == "validation").sum().alias("validation"),
    )
    expected_test = ((pl.col("n") * 0.2 + 0.5).floor()).clip(lower_bound=1)
    expected_val = ((pl.col("n") * 0.1 + 0.5).floor()).clip(lower_bound=1)
    assert counts.filter(
        (pl.col("test") != expected_test) | (pl.col("validation") != expected_val)
    ).is_empty()


def test_real_per_user_split_invariants(ml_events: pl.DataFrame, ml_split: Split) -> None:
    ratings = ml_events.filter(pl.col("event_type") == "rating")
    total = ml_split.train.height + ml_split.validation.height + ml_split.test.height
    assert total == ratings.height
    _check_per_user_invariants(ml_split)
    for name in ("validation", "test"):
        stage = ml_split.stage(name)
        per_user = stage.positives.group_by("user_id").len()
        assert set(per_user["user_id"].to_list()) >= set(stage.users.tolist())
        assert stage.positives.join(stage.seen, on=["user_id", "item_id"]).is_empty()
    assert ml_split.stage("test").users.size == 592
    assert 0.19 < ml_split.test.height / total < 0.21


def test_real_global_split_invariants(ml_events: pl.DataFrame) -> None:
    split = global_split(ml_events)
    ts = pl.col("event_timestamp")
    assert split.train.filter(ts >= split.t1).is_empty()
    assert split.validation.filter((ts < split.t1) | (ts >= split.t2)).is_empty()
    assert split.test.filter(ts < split.t2).is_empty()
    test = split.stage("test")
    history = set(test.fit["user_id"].unique().to_list())
    assert set(test.users.tolist()) <= history
    assert test.users.size > 0


def test_splits_are_deterministic_and_ignore_input_order(ml_events: pl.DataFrame) -> None:
    shuffled = ml_events.sample(fraction=1.0, shuffle=True, seed=3)
    for make in (per_user_split, global_split):
        a, b = make(ml_events), make(shuffled)
        for part in ("train", "validation", "test", "cutoffs"):
            assert getattr(a, part).equals(getattr(b, part)), (make.__name__, part)
