"""Point-in-time item statistics against a brute-force filter of the real events."""

from __future__ import annotations

import numpy as np
import polars as pl

from avrec.ranker.item_history import ItemTimeline, naive_utc
from avrec.ranker.recommender import catalogue


def test_item_timeline_matches_a_brute_force_filter(
    ml_events: pl.DataFrame, ml_items: pl.DataFrame
) -> None:
    ratings = ml_events.filter(pl.col("event_type") == "rating")
    item_ids = catalogue(ml_items)
    timeline = ItemTimeline.build(ratings, item_ids)
    times = naive_utc(ratings["event_timestamp"])
    rng = np.random.default_rng(0)
    # instants on event times (the event itself must not count) and between them
    instants = [*rng.choice(times, 3), times.min(), times.max() + np.timedelta64(1, "us")]
    for when in instants:
        stats = timeline.at(when, windows=(30.0,))
        before = ratings.filter(pl.Series(times < when))
        recent = ratings.filter(pl.Series((times < when)
                                          & (times >= when - np.timedelta64(30 * 86_400, "s"))))
        for name, frame in (("count_all", before), ("count_30d", recent)):
            expected = np.zeros(item_ids.size)
            counts = frame.group_by("item_id").len()
            expected[np.searchsorted(item_ids, counts["item_id"].to_numpy())] = counts["len"]
            np.testing.assert_array_equal(stats[name], expected)
        means = before.group_by("item_id").agg(pl.col("value").mean())
        cols = np.searchsorted(item_ids, means["item_id"].to_numpy())
        np.testing.assert_allclose(stats["mean_rating"][cols], means["value"].to_numpy())
        assert np.isnan(np.delete(stats["mean_rating"], cols)).all()
        first = before.group_by("item_id").agg(pl.col("event_timestamp").min())
        cols = np.searchsorted(item_ids, first["item_id"].to_numpy())
        age = (when - naive_utc(first["event_timestamp"])).astype(np.int64) / 86_400e6
        np.testing.assert_allclose(stats["age_days"][cols], age)
