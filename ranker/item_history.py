"""Point-in-time item statistics: what the system knew about every item at a given instant.

The per-user split gives every user their own cut, so "how popular was this item" must be
read at each user's cut, from events strictly before it, never from the whole fit table.
:class:`ItemTimeline` holds the fit events sorted by time and answers, for any instant
``t``: interactions in the last ``w`` days, all-time interactions, mean rating and days since
the first interaction (NaN when the item had none before ``t``).

>>> import polars as pl
>>> from datetime import datetime
>>> events = pl.DataFrame({"user_id": [1, 2, 3], "item_id": [10, 10, 20],
...     "value": [4.0, 2.0, 5.0], "event_timestamp": [datetime(2020, 1, 1),
...     datetime(2020, 1, 5), datetime(2020, 1, 9)]})
>>> timeline = ItemTimeline.build(events, np.array([10, 20, 30]))
>>> stats = timeline.at(np.datetime64("2020-01-06"), windows=(3,))
>>> stats["count_3d"].tolist(), stats["count_all"].tolist(), stats["mean_rating"].tolist()
([1.0, 0.0, 0.0], [2.0, 0.0, 0.0], [3.0, nan, nan])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from avrec.names import DAY_US


def naive_utc(series: pl.Series) -> np.ndarray:
    """A datetime column as naive-UTC ``datetime64[us]``."""
    if isinstance(series.dtype, pl.Datetime) and series.dtype.time_zone is not None:
        series = series.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
    return series.to_numpy().astype("datetime64[us]")


@dataclass(frozen=True)
class ItemTimeline:
    """Fit events sorted by time: catalogue column, value and time of each."""

    n_items: int
    times: np.ndarray  # datetime64[us], sorted
    columns: np.ndarray  # catalogue position of each event's item
    values: np.ndarray  # float64, NaN where the event has no value
    first_seen: np.ndarray  # datetime64[us] per item (NaT: never)

    @classmethod
    def build(cls, interactions: pl.DataFrame, item_ids: np.ndarray) -> ItemTimeline:
        """From interactions (``item_id, value, event_timestamp``) over the catalogue."""
        frame = interactions.sort("event_timestamp", "item_id")
        times = naive_utc(frame["event_timestamp"])
        columns = np.searchsorted(item_ids, frame["item_id"].to_numpy())
        values = frame["value"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        first = np.full(item_ids.size, np.datetime64("NaT"), dtype="datetime64[us]")
        order = np.unique(columns, return_index=True)
        first[order[0]] = times[order[1]]
        return cls(int(item_ids.size), times, columns, values, first)

    def at(self, when: np.datetime64, windows: Sequence[float] = (30.0, 365.0)) -> dict:
        """Item statistics from events strictly before ``when`` (arrays over the catalogue)."""
        end = int(np.searchsorted(self.times, when, side="left"))
        cols, vals = self.columns[:end], self.values[:end]
        out = {}
        for days in windows:
            window = np.timedelta64(int(days * DAY_US), "us")
            start = int(np.searchsorted(self.times, when - window))
            out[f"count_{days:g}d"] = np.bincount(
                self.columns[start:end], minlength=self.n_items
            ).astype(np.float64)
        count = np.bincount(cols, minlength=self.n_items).astype(np.float64)
        rated = np.isfinite(vals)
        n_rated = np.bincount(cols[rated], minlength=self.n_items)
        total = np.bincount(cols[rated], weights=vals[rated], minlength=self.n_items)
        out["count_all"] = count
        out["mean_rating"] = np.divide(
            total, n_rated, out=np.full(self.n_items, np.nan), where=n_rated > 0
        )
        seen = ~np.isnat(self.first_seen) & (self.first_seen < when)
        age = (when - self.first_seen).astype(np.int64) / DAY_US
        out["age_days"] = np.where(seen, age, np.nan)
        return out

    def behaviour_at(self, when: np.datetime64) -> dict[str, np.ndarray]:
        """The ``item_behaviour`` feature view's fields as a point-in-time read at ``when``
        would give them (events strictly before ``when``; ``item_age_days`` derived at it)."""
        stats = self.at(when, (7.0, 30.0))
        return {"popularity_7d": stats["count_7d"], "popularity_30d": stats["count_30d"],
                "popularity_all": stats["count_all"], "mean_rating": stats["mean_rating"],
                "item_age_days": stats["age_days"]}
