"""Incremental online behaviour rows: ``LogEvents`` updates a user's (and an item's) row from
a small per-entity state instead of recomputing the whole history.

The rows are exactly those of the offline code (:mod:`avrec.behaviour_features`) as of the
server's clock: ``tests/server/test_incremental.py`` proves it on random event sequences
(window exits, ties in time, out-of-order events, ratings and other events). What a row
needs that the row itself does not keep is the **state**, stored in Redis next to Feast's
hash under ``avrec:<project>:state:<user|item>:<id>``:

* counts (events, ratings, rating sum, positive ratings), first and last event time;
* the event times inside the longest window (30 days) as of the state's clock, plus the
  newest time that already left it: enough for every window count at a later clock (an
  event leaves the 7-day window at ``t + 7d``) and for the row's stamp (the latest change
  point: an event time or an event time plus a window, see ``behaviour_features``);
* users: per-genre counts (``genre_affinity`` = counts / events), the 20 most recent distinct
  items with their last time (an out-of-order event lands where the offline sort puts it),
  and the newest 1,000 ratings with their times (the ``user_history`` row; the Feast row
  keeps no times, so an out-of-order rating could not be placed from the row alone).

A state is rebuilt from the server's event history when it is missing or when the Feast
row no longer carries the stamp the state last wrote (``avrec materialize`` wrote a newer
row), or when the clock went back (a replay clock restarted). Each batch reads all states
in one round trip and writes states and rows in one ``MULTI/EXEC`` under ``WATCH`` (another
writer in between: the batch is redone). Rows are written unconditionally (Feast's own
writer skips a row whose stamp is not newer, which loses a second event at the same instant).

Value encoding: the row values are built as Feast's ``python_values_to_proto_values`` builds
them (checked byte for byte in the tests); that function costs 0.5-0.7 ms for one
1,000-long list, more than the whole update, so it is not called per row.
"""

from __future__ import annotations

import json
import math
import struct
from array import array
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, Value
from google.protobuf.timestamp_pb2 import Timestamp

from avrec.behaviour_features import HISTORY_CAP, POSITIVE_RATING, RECENT_ITEMS, WINDOWS
from server.feature_reader import ViewReader

if TYPE_CHECKING:
    import redis
    from feast import FeatureStore

USER_VIEW, HISTORY_VIEW, ITEM_VIEW = "user_behaviour", "user_history", "item_behaviour"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_US = {name: w // timedelta(microseconds=1) for name, w in WINDOWS.items()}
LONGEST_US = max(WINDOW_US.values())
STATE_VERSION = 1


def micros(when: datetime) -> int:
    """An aware datetime as integer microseconds since the epoch (exact)."""
    return (when - _EPOCH) // timedelta(microseconds=1)


def from_micros(us: int) -> datetime:
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
        return self.rating_sum / self.ratings if self.ratings else None

    def header(self) -> dict[str, Any]:
        return {"n": self.n, "r": self.ratings, "s": self.rating_sum, "p": self.positives,
                "f": self.first, "l": self.last, "e": self.expired, "a": self.as_of,
                "w": self.written}

    def load(self, head: dict[str, Any], window: array) -> None:
        self.n, self.ratings, self.rating_sum = head["n"], head["r"], head["s"]
        self.positives, self.first, self.last = head["p"], head["f"], head["l"]
        self.expired, self.as_of, self.written = head["e"], head["a"], head["w"]
        self.window = window


def _pack(header: dict[str, Any], arrays: Sequence[array]) -> bytes:
    head = json.dumps(header | {"v": STATE_VERSION, "sizes": [len(a) for a in arrays]},
                      separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + b"".join(a.tobytes() for a in arrays)


def _unpack(blob: bytes, codes: str) -> tuple[dict[str, Any], list[array]] | None:
    (size,) = struct.unpack_from("<I", blob)
    head = json.loads(blob[4:4 + size])
    if head.get("v") != STATE_VERSION:
        return None
    arrays, offset = [], 4 + size
    for code, n in zip(codes, head["sizes"], strict=True):
        a = array(code)
        a.frombytes(blob[offset:offset + n * a.itemsize])
        offset += n * a.itemsize
        arrays.append(a)
    return head, arrays


class ItemState:
    """What an ``item_behaviour`` row needs."""

    __slots__ = ("tally",)

    def __init__(self) -> None:
        self.tally = Tally()

    def add(self, ts: int, user_id: int, is_rating: bool, value: float | None) -> None:
        self.tally.add(ts, is_rating, value)

    def row(self, now: int) -> tuple[int, dict[str, Any]]:
        t = self.tally
        counts = t.counts(now)
        values = {f"popularity_{w}": c for w, c in zip(WINDOW_US, counts, strict=True)}
        values |= {"popularity_all": t.n, "mean_rating": t.mean_rating(),
                   "rating_count": t.ratings, "first_interaction_at": t.first}
        return t.stamp(now), values

    def pack(self) -> bytes:
        return _pack(self.tally.header(), [self.tally.window])

    @classmethod
    def unpack(cls, blob: bytes) -> ItemState | None:
        unpacked = _unpack(blob, "q")
        if unpacked is None:
            return None
        state = cls()
        state.tally.load(unpacked[0], unpacked[1][0])
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
        self.tally.add(ts, is_rating, value)
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
        if not self.history_ts:
            return None
        return self.history_ts[-1], {"history_items": self.history_items.tolist(),
                                     "history_ratings": self.history_ratings.tolist()}

    def pack(self) -> bytes:
        head = self.tally.header() | {"g": self.genres, "ri": self.recent}
        return _pack(head, [self.tally.window, self.history_ts, self.history_items,
                            self.history_ratings])

    @classmethod
    def unpack(cls, blob: bytes) -> UserState | None:
        unpacked = _unpack(blob, "qqqd")
        if unpacked is None:
            return None
        head, (window, times, items, ratings) = unpacked
        state = cls(len(head["g"]))
        state.tally.load(head, window)
        state.genres, state.recent = head["g"], head["ri"]
        state.history_ts, state.history_items, state.history_ratings = times, items, ratings
        return state


def genre_index(items: pl.DataFrame, genres: list[str]) -> dict[int, tuple[int, ...]]:
    """Item id -> indices of its genres in the vocabulary (as the offline one-hot)."""
    position = {g: i for i, g in enumerate(genres)}
    return {int(item): tuple(sorted({position[g] for g in item_genres or []}))
            for item, item_genres in zip(items["item_id"].to_list(),
                                         items["genres"].to_list(), strict=True)}


@dataclass
class Replayed:
    users: dict[int, UserState]
    items: dict[int, ItemState]


def event_rows(frame: pl.DataFrame) -> Iterable[tuple[int, int, bool, float | None, int]]:
    """(user, item, is rating, value, time in µs) per row of an events frame."""
    us = frame["event_timestamp"].dt.epoch("us").to_list()
    return zip(frame["user_id"].to_list(), frame["item_id"].to_list(),
               (frame["event_type"] == "rating").to_list(), frame["value"].to_list(), us,
               strict=True)


def replay(events: pl.DataFrame, now: int, genres: dict[int, tuple[int, ...]],
           n_genres: int, users: set[int] | None = None,
           items: set[int] | None = None) -> Replayed:
    """States of ``users`` and ``items`` (None: all) from their events at or before ``now``."""
    events = events.filter(pl.col("event_timestamp").dt.epoch("us") <= now)
    if users is not None or items is not None:
        events = events.filter(pl.col("user_id").is_in(list(users or []))
                               | pl.col("item_id").is_in(list(items or [])))
    out = Replayed({}, {})
    ordered = events.sort("event_timestamp", "item_id", "event_type", "user_id")
    for user, item, is_rating, value, ts in event_rows(ordered):
        if users is None or user in users:
            state = out.users.get(user)
            if state is None:
                state = out.users[user] = UserState(n_genres)
                state.tally.advance(now)
            state.add(ts, item, is_rating, value, genres.get(item, ()))
        if items is None or item in items:
            item_state = out.items.get(item)
            if item_state is None:
                item_state = out.items[item] = ItemState()
                item_state.tally.advance(now)
            item_state.add(ts, user, is_rating, value)
    for wanted, found, make in ((users, out.users, lambda: UserState(n_genres)),
                                (items, out.items, ItemState)):
        for key in wanted or ():
            if key not in found:
                found[key] = make()
                found[key].tally.advance(now)
    return out


# -- Redis: Feast's row layout, written raw ---------------------------------------------------


def _value(kind: str, value: Any) -> Value:
    """One feature value as Feast's ``python_values_to_proto_values`` makes it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Value()
    if kind == "INT64":
        return Value(int64_val=value)
    if kind == "DOUBLE":
        return Value(double_val=value)
    if kind == "UNIX_TIMESTAMP":  # microseconds in, whole seconds stored (as Feast does)
        return Value(unix_timestamp_val=value // 1_000_000)
    if kind == "FLOAT_LIST":
        return Value(float_list_val=FloatList(val=value))
    if kind == "INT64_LIST":
        return Value(int64_list_val=Int64List(val=value))
    raise TypeError(f"no raw encoding for {kind}")


@dataclass(frozen=True)
class ViewWriter:
    """Writes rows of one view where Feast's Redis store keeps them (see ViewReader)."""

    reader: ViewReader
    kinds: tuple[str, ...]

    @classmethod
    def from_store(cls, store: FeatureStore, view_name: str) -> ViewWriter:
        view = store.get_feature_view(view_name)
        kinds = tuple(f.dtype.to_value_type().name for f in view.features)
        return cls(ViewReader.from_store(store, view_name), kinds)

    def mapping(self, stamp_us: int, values: dict[str, Any]) -> dict[bytes | str, bytes]:
        """The hash fields of one row: each feature's ``ValueProto`` and ``_ts:<view>``."""
        reader = self.reader
        out: dict[bytes | str, bytes] = {
            field: _value(kind, values[name]).SerializeToString()
            for name, kind, field in zip(reader.features, self.kinds, reader.fields,
                                         strict=False)}
        seconds, rest = divmod(stamp_us, 1_000_000)
        out[reader.fields[-1]] = Timestamp(seconds=seconds, nanos=rest * 1000).SerializeToString()
        return out


def state_key(project: str, kind: str, entity_id: int) -> str:
    return f"avrec:{project}:state:{kind}:{entity_id}"


class OnlineUpdater:
    """Applies a batch of accepted events to the users' and items' online rows."""

    def __init__(self, store: FeatureStore, client: redis.Redis, items: pl.DataFrame,
                 genres: list[str], history: Callable[[], pl.DataFrame],
                 update_items: bool = True) -> None:
        self.client, self.history, self.update_items = client, history, update_items
        self.project = store.config.project
        views = {v.name for v in store.list_feature_views()}
        self.user = ViewWriter.from_store(store, USER_VIEW)
        self.user_history = (ViewWriter.from_store(store, HISTORY_VIEW)
                             if HISTORY_VIEW in views else None)
        self.item = ViewWriter.from_store(store, ITEM_VIEW) if update_items else None
        self.genres = genre_index(items, genres)
        self.n_genres = len(genres)
        self.rebuilt = 0  # states rebuilt from the event history (missing or stale)

    def update(self, frame: pl.DataFrame, now_dt: datetime) -> None:
        """Read the touched states, apply ``frame`` (already in the event history), write
        states and rows; all under WATCH so a concurrent writer makes the batch redo."""
        import redis

        now = micros(now_dt)
        rows = list(event_rows(frame))
        users = sorted({r[0] for r in rows})
        items = sorted({r[1] for r in rows}) if self.item is not None else []
        keys = ([state_key(self.project, "user", u) for u in users]
                + [state_key(self.project, "item", i) for i in items])
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*keys)  # held on this connection; the reads use another
                    blobs, stamps = self._read(keys, users, items)
                    user_states, item_states = self._states(
                        users, items, blobs, stamps, now, frame)
                    pipe.multi()
                    self._queue(pipe, users, items, user_states, item_states, now)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def _read(self, keys: list[str], users: list[int], items: list[int]
              ) -> tuple[list[bytes | None], list[bytes | None]]:
        """The states and the stamps of the rows they wrote, in one round trip."""
        with self.client.pipeline(transaction=False) as reads:
            reads.mget(keys)
            for u in users:
                reads.hget(self.user.reader.key(u), self.user.reader.fields[-1])
            if self.item is not None:
                for i in items:
                    reads.hget(self.item.reader.key(i), self.item.reader.fields[-1])
            replies = reads.execute()
        return replies[0], replies[1:]

    def _states(self, users: list[int], items: list[int], blobs: list[bytes | None],
                stamps: list[bytes | None], now: int, frame: pl.DataFrame
                ) -> tuple[dict[int, UserState], dict[int, ItemState]]:
        """Each touched entity's state with the batch applied (rebuilt when unusable)."""
        user_states: dict[int, UserState] = {}
        item_states: dict[int, ItemState] = {}
        stale_users, stale_items = set(), set()
        for ids, out, stale, offset, cls in (
            (users, user_states, stale_users, 0, UserState),
            (items, item_states, stale_items, len(users), ItemState),
        ):
            for j, entity in enumerate(ids):
                blob, stamp = blobs[offset + j], stamps[offset + j]
                state = cls.unpack(blob) if blob else None
                if (state is None or not state.tally.advance(now)
                        or _stamp_us(stamp) != state.tally.written):
                    stale.add(entity)
                else:
                    out[entity] = state
        if stale_users or stale_items:
            # the event history already holds this batch: the rebuilt states include it
            rebuilt = replay(self.history(), now, self.genres, self.n_genres,
                             stale_users, stale_items)
            self.rebuilt += len(stale_users) + len(stale_items)
            user_states |= rebuilt.users
            item_states |= rebuilt.items
        for user, item, is_rating, value, ts in event_rows(frame):
            if user not in stale_users:
                user_states[user].add(ts, item, is_rating, value, self.genres.get(item, ()))
            if self.item is not None and item not in stale_items:
                item_states[item].add(ts, user, is_rating, value)
        return user_states, item_states

    def _queue(self, pipe, users: list[int], items: list[int],
               user_states: dict[int, UserState], item_states: dict[int, ItemState],
               now: int) -> None:
        for u in users:
            state = user_states[u]
            if not state.tally.n:  # nothing at or before the clock (it went back)
                continue
            stamp, values = state.behaviour_row(now)
            state.tally.written = stamp
            mapping = self.user.mapping(stamp, values)
            history = state.history_row()
            if history is not None and self.user_history is not None:
                mapping |= self.user_history.mapping(*history)  # the same entity hash
            pipe.hset(self.user.reader.key(u), mapping=mapping)
            pipe.set(state_key(self.project, "user", u), state.pack())
        for i in items:
            item_state = item_states[i]
            if self.item is None or not item_state.tally.n:
                continue
            stamp, values = item_state.row(now)
            item_state.tally.written = stamp
            pipe.hset(self.item.reader.key(i), mapping=self.item.mapping(stamp, values))
            pipe.set(state_key(self.project, "item", i), item_state.pack())


def _stamp_us(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    stamp = Timestamp()
    stamp.ParseFromString(raw)
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000
