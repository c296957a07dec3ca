"""States rebuilt from the event history: when an entity's state is missing or stale.

:func:`replay` builds :class:`~avrec.server.incremental_state.UserState` and
:class:`~avrec.server.incremental_state.ItemState` from the events at or before a clock: counts and
windows in one polars group-by, a user's genres, recent items and history by group-bys over
their events in the offline order (time, item id; :func:`add_user_details`). The rows they
give equal the offline code's (:mod:`avrec.behaviour_features`) at that clock.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import numpy as np
import polars as pl

from avrec.behaviour_features import POSITIVE_RATING
from avrec.server import incremental_state
from avrec.server.incremental_state import LONGEST_US, ItemState, Tally, UserState, micros


def genre_index(items: pl.DataFrame, genres: list[str]) -> dict[int, tuple[int, ...]]:
    """Item id -> indices of its genres in the vocabulary (as the offline one-hot)."""
    position = {g: i for i, g in enumerate(genres)}
    return {int(item): tuple(sorted({position[g] for g in item_genres or []}))
            for item, item_genres in zip(items["item_id"].to_list(),
                                         items["genres"].to_list(), strict=True)}


@dataclass
class Replayed:
    """Rebuilt states by user and item id."""

    users: dict[int, UserState]
    items: dict[int, ItemState]


def event_rows(frame: pl.DataFrame) -> list[tuple[int, int, bool, float | None, int]]:
    """(user, item, is rating, value, time in µs) per row of an events frame."""
    at = [frame.columns.index(c)  # rows() is direct; a select costs 0.5 ms
          for c in ("user_id", "item_id", "event_type", "value", "event_timestamp")]
    return [(row[at[0]], row[at[1]], row[at[2]] == "rating", row[at[3]], micros(row[at[4]]))
            for row in frame.rows()]


def _tallies(events: pl.DataFrame, key: str, now: int) -> dict[int, Tally]:
    """Each entity's :class:`Tally` from its events (column ``us``, all at or before ``now``),
    in one group-by."""
    us, horizon = pl.col("us"), now - LONGEST_US
    is_rating = pl.col("event_type") == "rating"
    grouped = events.group_by(key).agg(
        pl.len().alias("n"),
        is_rating.sum().alias("ratings"),
        pl.when(is_rating).then(pl.col("value")).fill_null(0.0).sum().alias("rating_sum"),
        (is_rating & (pl.col("value") >= POSITIVE_RATING)).sum().alias("positives"),
        us.min().alias("first"), us.max().alias("last"),
        us.filter(us > horizon).sort().alias("window"),
        us.filter(us <= horizon).max().alias("expired"),
    )
    out = {}
    for entity, n, ratings, total, positives, first, last, window, expired in (
            grouped.iter_rows()):
        tally = out[entity] = Tally()
        tally.n, tally.ratings, tally.rating_sum, tally.positives = n, ratings, total, positives
        tally.first, tally.last, tally.expired = first, last, expired
        tally.window, tally.as_of = array("q", window), now
    return out


PYTHON_ROWS = 256  # up to this many events, states are rebuilt in Python (polars' fixed
#                    cost per rebuild, ~3 ms, is more than replaying a few hundred events)


def replay(events: pl.DataFrame, now: int, genres: dict[int, tuple[int, ...]],
           n_genres: int, users: set[int] | None = None,
           items: set[int] | None = None) -> Replayed:
    """States of ``users`` and ``items`` (None: all) from their events at or before ``now``:
    counts and windows by group-by; a user's genres, recent items and history by replaying
    their events in the offline order. Up to :data:`PYTHON_ROWS` events (a few entities'
    events: a one-event ``LogEvents`` meeting an item it has no state of), the same states
    are built event by event in Python (:func:`replay_rows`)."""
    if users is not None and items is not None and events.height <= PYTHON_ROWS:
        return replay_rows(events, now, genres, n_genres, users, items)
    events = (events.with_columns(pl.col("event_timestamp").dt.epoch("us").alias("us"))
              .filter(pl.col("us") <= now))
    of_users = events if users is None else events.filter(pl.col("user_id").is_in(list(users)))
    of_items = events if items is None else events.filter(pl.col("item_id").is_in(list(items)))
    out = Replayed({}, {})
    for user, tally in _tallies(of_users, "user_id", now).items():
        state = out.users[user] = UserState(n_genres)
        state.tally = tally
    ordered = of_users.sort("us", "item_id", "event_type").select(
        "user_id", "item_id", (pl.col("event_type") == "rating").alias("is_rating"), "value",
        "us")
    add_user_details(out.users, ordered, genres, n_genres)
    if items is None or items:
        for item, tally in _tallies(of_items, "item_id", now).items():
            state = out.items[item] = ItemState()
            state.tally = tally
    _add_missing(out, users, items, now, n_genres)
    return out


def add_user_details(states: dict[int, UserState], ordered: pl.DataFrame,
                     genres: dict[int, tuple[int, ...]], n_genres: int) -> None:
    """Each user's genre counts, recent items and rated history from their events in the
    offline order (``ordered``: ``user_id, item_id, is_rating, value, us``, sorted by time,
    item and type), by group-bys: the same as :meth:`UserState.add_details
    <avrec.server.incremental_state.UserState.add_details>` event by event in that order,
    where each event is as new as every earlier one, so an item's place in the recent items
    is its last event and the history is the newest ratings (``tests/server/
    test_incremental.py`` checks the rows of the states it rebuilds against the offline
    code's). Every user of ``ordered`` has a state in ``states``."""
    recent_cap, history_cap = incremental_state.RECENT_ITEMS, incremental_state.HISTORY_CAP
    pairs = ordered.group_by("user_id", "item_id").agg(
        pl.len().alias("n"), pl.col("us").max().alias("last"))
    users, user_at = np.unique(pairs["user_id"].to_numpy(), return_inverse=True)
    items, item_at = np.unique(pairs["item_id"].to_numpy(), return_inverse=True)
    of_item = np.zeros((len(items), n_genres), dtype=np.int64)
    for row, item in enumerate(items.tolist()):
        of_item[row, list(genres.get(item, ()))] = 1
    counts = np.zeros((len(users), n_genres), dtype=np.int64)
    np.add.at(counts, user_at, of_item[item_at] * pairs["n"].to_numpy()[:, None])
    for user, row in zip(users.tolist(), counts.tolist(), strict=True):
        states[user].genres = row
    recent = (pairs.sort(["user_id", "last", "item_id"], descending=[False, True, True])
              .group_by("user_id", maintain_order=True)
              .agg(pl.col("last").head(recent_cap), pl.col("item_id").head(recent_cap)))
    for user, times, item_ids in recent.iter_rows():
        states[user].recent = [[t, i] for t, i in zip(times, item_ids, strict=True)]
    history = (ordered.filter(pl.col("is_rating"))
               .group_by("user_id", maintain_order=True)
               .agg(pl.col("us").tail(history_cap), pl.col("item_id").tail(history_cap),
                    pl.col("value").tail(history_cap)))
    for user, times, item_ids, values in history.iter_rows():
        state = states[user]
        state.history_ts = array("q", times)
        state.history_items = array("q", item_ids)
        state.history_ratings = array("d", values)


def replay_rows(events: pl.DataFrame, now: int, genres: dict[int, tuple[int, ...]],
                n_genres: int, users: set[int], items: set[int]) -> Replayed:
    """:func:`replay` event by event, in Python: each entity's :class:`Tally` counts its
    events one by one (the window is the clock's from the start), a user's details follow
    the offline order (time, item id, event type; ties in arrival order)."""
    times = events["event_timestamp"].dt.epoch("us").to_list()  # not via Python datetimes
    rows = list(zip(times, *(events[c].to_list()
                             for c in ("item_id", "event_type", "user_id", "value")),
                    strict=True))
    rows = sorted((row for row in rows if row[0] <= now), key=lambda row: row[:3])
    out = Replayed({}, {})
    for ts, item, kind, user, value in rows:
        is_rating = kind == "rating"
        if user in users:
            state = out.users.get(user)
            if state is None:
                state = out.users[user] = UserState(n_genres)
                state.tally.as_of = now
            state.tally.add(ts, is_rating, 0.0 if value is None else value)
            state.add_details(ts, item, is_rating, value, genres.get(item, ()))
        if item in items:
            item_state = out.items.get(item)
            if item_state is None:
                item_state = out.items[item] = ItemState()
                item_state.tally.as_of = now
            item_state.tally.add(ts, is_rating, 0.0 if value is None else value)
    _add_missing(out, users, items, now, n_genres)
    return out


def _add_missing(out: Replayed, users: set[int] | None, items: set[int] | None, now: int,
                 n_genres: int) -> None:
    """Empty states (as of ``now``) for the asked entities without events."""
    for wanted, found, make in ((users, out.users, lambda: UserState(n_genres)),
                                (items, out.items, ItemState)):
        for key in wanted or ():
            if key not in found:
                found[key] = make()
                found[key].tally.as_of = now
