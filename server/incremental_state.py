"""The per-entity state behind an incremental online row, and its pure update maths.

A row's **state** is what the row itself does not keep (:mod:`avrec.server.incremental` stores it
in the entity's Feast hash, field ``_avrec_state:<view>``):

* counts (events, ratings, rating sum, positive ratings), first and last event time;
* the event times inside the longest window (30 days) as of the state's clock, plus the
  newest time that already left it: enough for every window count at a later clock (an
  event leaves the 7-day window at ``t + 7d``) and for the row's stamp (the latest change
  point: an event time or an event time plus a window, see ``behaviour_features``);
* users: per-genre counts (``genre_affinity`` = counts / events), the 20 most recent distinct
  items with their last time (an out-of-order event lands where the offline sort puts it),
  and the newest 1,000 ratings with their times (the ``user_history`` row; the Feast row
  keeps no times, so an out-of-order rating could not be placed from the row alone).

:class:`Tally` holds what users and items share; :class:`ItemState` and :class:`UserState`
add their own parts and build their rows. Times are integer microseconds since the epoch.
A state packs to bytes (a fixed header, array sizes, the arrays' machine bytes); a blob of
another ``STATE_VERSION`` or that does not parse unpacks to None (the state is rebuilt).
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_right, insort
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from avrec.behaviour_features import HISTORY_CAP, POSITIVE_RATING, RECENT_ITEMS, WINDOWS

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_US = {name: w // timedelta(microseconds=1) for name, w in WINDOWS.items()}
LONGEST_US = max(WINDOW_US.values())
STATE_VERSION = 2


def micros(when: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (exact)."""
    return (when - _EPOCH) // timedelta(microseconds=1)


def from_micros(us: int) -> datetime:
    """The inverse of :func:`micros`."""
    return _EPOCH + timedelta(microseconds=us)


class Tally:
    """Counts, first/last time and the window state shared by users and items."""

    __slots__ = (
        "as_of",
        "expired",
        "first",
        "last",
        "n",
        "positives",
        "rating_sum",
        "ratings",
        "window",
        "written",
    )

    def __init__(self) -> None:
        self.n = self.ratings = self.positives = 0
        self.rating_sum = 0.0
        self.first: int | None = None
        self.last: int | None = None
        self.window = array("q")  # sorted event times > as_of - LONGEST
        self.expired: int | None = None  # newest event time <= as_of - LONGEST
        self.as_of = 0  # the clock the window was last advanced to
        self.written: int | None = None  # stamp of the row last written from this state

    def advance(self, now: int) -> bool:
        """Move the clock to ``now``: events that left the longest window leave the list.

        A clock behind the state's (another process's replay clock) is taken when the state
        is exact there too: no event after ``now`` and none dropped from the window that
        ``now`` still needs. Otherwise False: the state must be rebuilt.
        """
        if now < self.as_of:
            if (self.last is not None and self.last > now) or (
                    self.expired is not None and self.expired > now - LONGEST_US):
                return False
            self.as_of = now  # the window holds every event after now - LONGEST: exact
            return True
        self.as_of = now
        k = bisect_right(self.window, now - LONGEST_US)
        if k:
            newest = self.window[k - 1]
            self.expired = newest if self.expired is None else max(self.expired, newest)
            del self.window[:k]
        return True

    def add(self, ts: int, is_rating: bool, value: float | None,
            positive: float = POSITIVE_RATING) -> None:
        """Count one event at ``ts`` (a rating of ``value`` when ``is_rating``)."""
        self.n += 1
        if is_rating:
            self.ratings += 1
            self.rating_sum += value  # type: ignore[operator]
            self.positives += value >= positive  # type: ignore[operator]
        self.first = ts if self.first is None else min(self.first, ts)
        self.last = ts if self.last is None else max(self.last, ts)
        if ts <= self.as_of - LONGEST_US:
            self.expired = ts if self.expired is None else max(self.expired, ts)
        else:
            insort(self.window, ts)

    def counts(self, now: int) -> list[int]:
        """Events in ``(now - w, now]`` per window (every event is at or before ``now``)."""
        size = len(self.window)
        return [size - bisect_right(self.window, now - w) for w in WINDOW_US.values()]

    def stamp(self, now: int) -> int:
        """The latest change point at or before ``now``: an event time, or an event time
        plus a window (when the event left it)."""
        points = [self.window[-1]] if self.window else []
        for w in WINDOW_US.values():
            k = bisect_right(self.window, now - w)
            if k:
                points.append(self.window[k - 1] + w)
        if self.expired is not None:
            points.append(self.expired + LONGEST_US)  # its shorter windows end earlier
        return max(points)

    def mean_rating(self) -> float | None:
        """The mean rating; None without ratings."""
        return self.rating_sum / self.ratings if self.ratings else None

    def pack(self, arrays: Sequence[array]) -> bytes:
        """The tally and ``arrays`` (window first) as bytes: a fixed header, array sizes,
        the arrays' machine bytes."""
        head = _HEAD.pack(STATE_VERSION, self.n, self.ratings, self.rating_sum,
                          self.positives, *(_NONE if v is None else v for v in (
                              self.first, self.last, self.expired, self.written)),
                          self.as_of, len(arrays) + 1)
        arrays = [self.window, *arrays]
        sizes = struct.pack(f"<{len(arrays)}I", *map(len, arrays))
        return head + sizes + b"".join(a.tobytes() for a in arrays)

    @classmethod
    def unpack(cls, blob: bytes, codes: str) -> tuple[Tally, list[array]] | None:
        """A tally and the other arrays (typecodes ``codes``); None for another version or
        a blob that does not parse (the state is then rebuilt)."""
        try:
            (version, n, ratings, total, positives, first, last, expired, written, as_of,
             count) = _HEAD.unpack_from(blob)
            if version != STATE_VERSION or count != len(codes) + 1:
                return None
            sizes = struct.unpack_from(f"<{count}I", blob, _HEAD.size)
        except struct.error:
            return None
        if _HEAD.size + 4 * count + sum(sizes) * 8 != len(blob):  # every typecode is 8 bytes
            return None
        tally = cls()
        tally.n, tally.ratings, tally.rating_sum, tally.positives = n, ratings, total, positives
        tally.first, tally.last, tally.expired, tally.written = (
            None if v == _NONE else v for v in (first, last, expired, written))
        tally.as_of = as_of
        offset, arrays = _HEAD.size + 4 * count, []
        for code, size in zip("q" + codes, sizes, strict=True):
            a = array(code)
            a.frombytes(blob[offset:offset + size * a.itemsize])
            offset += size * a.itemsize
            arrays.append(a)
        tally.window = arrays[0]
        return tally, arrays[1:]


_HEAD = struct.Struct("<BqqdqqqqqqB")  # version, counts, sum, times (None: _NONE), arrays
_NONE = -(2**63)


class ItemState:
    """What an ``item_behaviour`` row needs."""

    __slots__ = ("tally",)

    def __init__(self) -> None:
        self.tally = Tally()

    def add(self, ts: int, user_id: int, is_rating: bool, value: float | None) -> None:
        """Count one event of ``user_id`` on this item."""
        self.tally.add(ts, is_rating, value)

    def row(self, now: int) -> tuple[int, dict[str, Any]]:
        """The ``item_behaviour`` row at ``now``: (stamp, values)."""
        t = self.tally
        counts = t.counts(now)
        values = {f"popularity_{w}": c for w, c in zip(WINDOW_US, counts, strict=True)}
        values |= {"popularity_all": t.n, "mean_rating": t.mean_rating(),
                   "rating_count": t.ratings, "first_interaction_at": t.first}
        return t.stamp(now), values

    def pack(self) -> bytes:
        """The state as bytes (see :meth:`Tally.pack`)."""
        return self.tally.pack([])

    @classmethod
    def unpack(cls, blob: bytes) -> ItemState | None:
        """The state packed in ``blob``; None when it does not parse."""
        unpacked = Tally.unpack(blob, "")
        if unpacked is None:
            return None
        state = cls()
        state.tally = unpacked[0]
        return state


class UserState:
    """What a user's ``user_behaviour`` and ``user_history`` rows need."""

    __slots__ = ("genres", "history_items", "history_ratings", "history_ts", "recent", "tally")

    def __init__(self, n_genres: int) -> None:
        self.tally = Tally()
        self.genres = [0] * n_genres
        self.recent: list[list[int]] = []  # [time, item], most recent first (time, item desc)
        self.history_ts = array("q")  # newest HISTORY_CAP ratings, oldest first (time, item)
        self.history_items = array("q")
        self.history_ratings = array("d")

    def add(self, ts: int, item: int, is_rating: bool, value: float | None,
            genres: Iterable[int]) -> None:
        """Apply one event on ``item`` (of ``genres``): the tally and the details."""
        self.tally.add(ts, is_rating, value)
        self.add_details(ts, item, is_rating, value, genres)

    def add_details(self, ts: int, item: int, is_rating: bool, value: float | None,
                    genres: Iterable[int]) -> None:
        """Everything but the tally: genre counts, recent items, the rated history."""
        for g in genres:
            self.genres[g] += 1
        self._recent(ts, item)
        if is_rating:
            self._history(ts, item, value)  # type: ignore[arg-type]

    def _recent(self, ts: int, item: int) -> None:
        """The offline order is (time, item id); an item sits at its last occurrence."""
        key = [ts, item]
        for i, entry in enumerate(self.recent):
            if entry[1] == item:
                if entry >= key:
                    return
                del self.recent[i]
                break
        else:
            if len(self.recent) >= RECENT_ITEMS and key < self.recent[-1]:
                return  # older than the 20th most recent: never listed
        at = next((i for i, entry in enumerate(self.recent) if entry < key), len(self.recent))
        self.recent.insert(at, key)
        del self.recent[RECENT_ITEMS:]

    def _history(self, ts: int, item: int, value: float) -> None:
        times, items = self.history_ts, self.history_items
        at = len(times)
        if at and (times[-1], items[-1]) > (ts, item):  # out of order: find its place
            at = bisect_right(times, ts)
            while at > 0 and times[at - 1] == ts and items[at - 1] > item:
                at -= 1
        times.insert(at, ts)
        items.insert(at, item)
        self.history_ratings.insert(at, value)
        if len(times) > HISTORY_CAP:
            del times[0], items[0], self.history_ratings[0]

    def behaviour_row(self, now: int) -> tuple[int, dict[str, Any]]:
        """The ``user_behaviour`` row at ``now``: (stamp, values)."""
        t = self.tally
        counts = t.counts(now)
        values: dict[str, Any] = {
            f"interactions_{w}": c for w, c in zip(WINDOW_US, counts, strict=True)}
        affinity = (np.asarray(self.genres, dtype=np.float64) / t.n).astype(np.float32)
        values |= {
            "interactions_all": t.n,
            "mean_rating": t.mean_rating(),
            "positive_share": t.positives / t.ratings if t.ratings else None,
            "last_interaction_at": t.last,
            "genre_affinity": affinity.tolist(),
            "recent_items": [item for _, item in self.recent],
        }
        return t.stamp(now), values

    def history_row(self) -> tuple[int, dict[str, Any]] | None:
        """The ``user_history`` row: (stamp, values); None without ratings."""
        if not self.history_ts:
            return None
        return self.history_ts[-1], {"history_items": self.history_items.tolist(),
                                     "history_ratings": self.history_ratings.tolist()}

    def pack(self) -> bytes:
        """The state as bytes (see :meth:`Tally.pack`)."""
        recent = array("q", [v for entry in self.recent for v in entry])
        return self.tally.pack([array("q", self.genres), recent, self.history_ts,
                                self.history_items, self.history_ratings])

    @classmethod
    def unpack(cls, blob: bytes) -> UserState | None:
        """The state packed in ``blob``; None when it does not parse."""
        unpacked = Tally.unpack(blob, "qqqqd")
        if unpacked is None:
            return None
        tally, (genres, recent, times, items, ratings) = unpacked
        state = cls(0)
        state.tally, state.genres = tally, genres.tolist()
        state.recent = [[recent[i], recent[i + 1]] for i in range(0, len(recent), 2)]
        state.history_ts, state.history_items, state.history_ratings = times, items, ratings
        return state
