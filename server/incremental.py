"""Incremental online behaviour rows: ``LogEvents`` updates a user's (and an item's) row from
a small per-entity state instead of recomputing the whole history.

The rows are exactly those of the offline code (:mod:`avrec.behaviour_features`) as of the
server's clock: ``tests/server/test_incremental.py`` proves it on random event sequences
(window exits, ties in time, out-of-order events, ratings and other events). What a row
needs that the row itself does not keep is the **state**, stored in the entity's own Feast
hash (field ``_avrec_state:<view>``, beside Feast's ``_ts:<view>``; Feast reads and writes
only its own fields):

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
row), or when the clock went back past the state's events (a replay clock restarted; the
rebuilt rows then leave out events after the clock, as the offline code does at that clock).
Each batch reads all states and row stamps in one round trip (one HMGET per entity) and
writes each entity's rows and state in one HSET, all in one ``MULTI/EXEC`` under ``WATCH``
of the touched hashes (another writer in between: the batch is redone). A Redis Cluster
cannot watch keys of several slots: there each entity's HSET is a compare-and-set on the
state and stamp it read (:mod:`server.compare_and_set`), redone for that entity alone; each
entity changes atomically, the batch not as a whole. Rows are written
unconditionally (Feast's own writer skips a row whose stamp is not newer, which loses a
second event at the same instant).

Value encoding: the row values are built as Feast's ``python_values_to_proto_values`` builds
them (checked byte for byte in the tests); that function costs 0.5-0.7 ms for one
1,000-long list, more than the whole update, so it is not called per row.
"""

from __future__ import annotations

import math
import struct
from array import array
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, Value
from google.protobuf.timestamp_pb2 import Timestamp

from avrec.behaviour_features import HISTORY_CAP, POSITIVE_RATING, RECENT_ITEMS, WINDOWS
from server import compare_and_set
from server.feature_reader import ViewReader

if TYPE_CHECKING:
    import redis
    from feast import FeatureStore

USER_VIEW, HISTORY_VIEW, ITEM_VIEW = "user_behaviour", "user_history", "item_behaviour"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
WINDOW_US = {name: w // timedelta(microseconds=1) for name, w in WINDOWS.items()}
LONGEST_US = max(WINDOW_US.values())
STATE_VERSION = 2
MAX_REDOS = 20  # batches redone after concurrent writes before the call fails


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
        self.tally.add(ts, is_rating, value)

    def row(self, now: int) -> tuple[int, dict[str, Any]]:
        t = self.tally
        counts = t.counts(now)
        values = {f"popularity_{w}": c for w, c in zip(WINDOW_US, counts, strict=True)}
        values |= {"popularity_all": t.n, "mean_rating": t.mean_rating(),
                   "rating_count": t.ratings, "first_interaction_at": t.first}
        return t.stamp(now), values

    def pack(self) -> bytes:
        return self.tally.pack([])

    @classmethod
    def unpack(cls, blob: bytes) -> ItemState | None:
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
        recent = array("q", [v for entry in self.recent for v in entry])
        return self.tally.pack([array("q", self.genres), recent, self.history_ts,
                                self.history_items, self.history_ratings])

    @classmethod
    def unpack(cls, blob: bytes) -> UserState | None:
        unpacked = Tally.unpack(blob, "qqqqd")
        if unpacked is None:
            return None
        tally, (genres, recent, times, items, ratings) = unpacked
        state = cls(0)
        state.tally, state.genres = tally, genres.tolist()
        state.recent = [[recent[i], recent[i + 1]] for i in range(0, len(recent), 2)]
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


def replay(events: pl.DataFrame, now: int, genres: dict[int, tuple[int, ...]],
           n_genres: int, users: set[int] | None = None,
           items: set[int] | None = None) -> Replayed:
    """States of ``users`` and ``items`` (None: all) from their events at or before ``now``:
    counts and windows by group-by; a user's genres, recent items and history by replaying
    their events in the offline order."""
    events = (events.with_columns(pl.col("event_timestamp").dt.epoch("us").alias("us"))
              .filter(pl.col("us") <= now))
    of_users = events if users is None else events.filter(pl.col("user_id").is_in(list(users)))
    of_items = events if items is None else events.filter(pl.col("item_id").is_in(list(items)))
    out = Replayed({}, {})
    for user, tally in _tallies(of_users, "user_id", now).items():
        state = out.users[user] = UserState(n_genres)
        state.tally = tally
    ordered = of_users.sort("us", "item_id", "event_type").select(
        "user_id", "item_id", pl.col("event_type") == "rating", "value", "us")
    for user, item, is_rating, value, ts in ordered.iter_rows():
        out.users[user].add_details(ts, item, is_rating, value, genres.get(item, ()))
    if items is None or items:
        for item, tally in _tallies(of_items, "item_id", now).items():
            state = out.items[item] = ItemState()
            state.tally = tally
    for wanted, found, make in ((users, out.users, lambda: UserState(n_genres)),
                                (items, out.items, ItemState)):
        for key in wanted or ():
            if key not in found:
                found[key] = make()
                found[key].tally.as_of = now
    return out


# -- Redis: Feast's row layout, written raw ---------------------------------------------------


@lru_cache(maxsize=1 << 16)
def _scalar_bytes(kind: str, value: Any) -> bytes:
    """Serialized scalar values, memoised (counts and times repeat; 3-4 µs each to build)."""
    return _value(kind, value).SerializeToString()


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


_LISTS = frozenset({"FLOAT_LIST", "INT64_LIST"})


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
            field: (_value(kind, values[name]).SerializeToString() if kind in _LISTS
                    else _scalar_bytes(kind, values[name]))
            for name, kind, field in zip(reader.features, self.kinds, reader.fields,
                                         strict=False)}
        seconds, rest = divmod(stamp_us, 1_000_000)
        out[reader.fields[-1]] = Timestamp(seconds=seconds, nanos=rest * 1000).SerializeToString()
        return out


def state_field(view: str) -> str:
    """The hash field (next to Feast's ``_ts:<view>``) that holds an entity's state."""
    return f"_avrec_state:{view}"


class OnlineUpdater:
    """Applies a batch of accepted events to the users' and items' online rows."""

    def __init__(self, store: FeatureStore, client: redis.Redis, items: pl.DataFrame,
                 genres: list[str], history: Callable[[], pl.DataFrame],
                 update_items: bool = True) -> None:
        self.client, self.history, self.update_items = client, history, update_items
        views = {v.name for v in store.list_feature_views()}
        self.user = ViewWriter.from_store(store, USER_VIEW)
        self.user_history = (ViewWriter.from_store(store, HISTORY_VIEW)
                             if HISTORY_VIEW in views else None)
        self.item = ViewWriter.from_store(store, ITEM_VIEW) if update_items else None
        self.genres = genre_index(items, genres)
        self.n_genres = len(genres)
        self.rebuilt = 0  # states rebuilt from the event history (missing or stale)
        self.redone = 0  # batches redone because another writer touched their entities
        self._keys: dict[tuple[str, int], bytes] = {}  # Feast's hash keys (60 µs each)
        self.user_fields = [state_field(USER_VIEW), self.user.reader.fields[-1]]
        self.item_fields = ([state_field(ITEM_VIEW), self.item.reader.fields[-1]]
                            if self.item is not None else None)

    def key(self, writer: ViewWriter, entity_id: int) -> bytes:
        """The entity's Feast hash (users' two views share it), computed once."""
        cached = self._keys.get((writer.reader.join_key, entity_id))
        if cached is None:
            cached = self._keys[(writer.reader.join_key, entity_id)] = writer.reader.key(
                entity_id)
        return cached

    def update(self, frame: pl.DataFrame, now_dt: datetime) -> None:
        """Read the touched states, apply ``frame`` (already in the event history), write
        states and rows; all under WATCH so a concurrent writer makes the batch redo (on a
        Redis Cluster: per entity, :meth:`_update_per_key`)."""
        import redis

        now = micros(now_dt)
        events = event_rows(frame)
        users = sorted({e[0] for e in events})
        items = sorted({e[1] for e in events}) if self.item is not None else []
        if isinstance(self.client, redis.RedisCluster):
            self._update_per_key(users, items, events, now)
            return
        keys = ([self.key(self.user, u) for u in users]
                + [self.key(self.item, i) for i in items])  # type: ignore[arg-type]
        with self.client.pipeline(transaction=True) as pipe:
            for _ in range(MAX_REDOS):
                try:
                    pipe.watch(*keys)  # held on this connection; the reads use another
                    replies = self._read(users, items)
                    user_states, item_states = self._states(users, items, replies, now, events)
                    pipe.multi()
                    for key, mapping, _ in self._mappings(users, items, user_states,
                                                          item_states, now):
                        pipe.hset(key, mapping=mapping)
                    pipe.execute()
                    return
                except redis.WatchError:
                    self.redone += 1
        raise RuntimeError(f"online rows of {len(keys)} entities changed under {MAX_REDOS} "
                           "tries in a row; the events are logged offline")

    def _update_per_key(self, users: list[int], items: list[int],
                        events: list[tuple[int, int, bool, float | None, int]],
                        now: int) -> None:
        """The cluster form of :meth:`update`: one read pipeline, then one compare-and-set
        per entity hash (:mod:`server.compare_and_set`: written only if its state and row
        stamp still hold what was read); the entities another writer changed meanwhile are
        read and applied again, alone. Each entity's rows and state change atomically; the
        batch as a whole does not (readers may see one user's rows before another's)."""
        for _ in range(MAX_REDOS):
            replies = self._read(users, items)
            user_states, item_states = self._states(users, items, replies, now, events)
            seen = dict(zip([self.key(self.user, u) for u in users]
                            + [self.key(self.item, i) for i in items],  # type: ignore[arg-type]
                            replies, strict=True))
            written = []
            with self.client.pipeline(transaction=False) as pipe:
                for key, mapping, checked in self._mappings(users, items, user_states,
                                                            item_states, now):
                    compare_and_set.queue(pipe, key, checked, seen[key], mapping)
                    written.append(key)
                done = {key for key, ok in zip(written, pipe.execute(), strict=True) if ok}
            if len(done) == len(written):
                return
            self.redone += 1
            users = [u for u in users if self.key(self.user, u) not in done]
            items = [i for i in items if self.key(self.item, i) not in done]  # type: ignore[arg-type]
        raise RuntimeError(f"online rows of {len(users) + len(items)} entities changed under "
                           f"{MAX_REDOS} tries in a row; the events are logged offline")

    def _read(self, users: list[int], items: list[int]) -> list[list[bytes | None]]:
        """Each entity's state and the stamp of its row, in one round trip."""
        with self.client.pipeline(transaction=False) as reads:
            for u in users:
                reads.hmget(self.key(self.user, u), self.user_fields)
            for i in items:
                reads.hmget(self.key(self.item, i), self.item_fields)  # type: ignore[arg-type]
            return reads.execute()

    def _states(self, users: list[int], items: list[int], replies: list[list[bytes | None]],
                now: int, events: list[tuple[int, int, bool, float | None, int]]
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
                blob, stamp = replies[offset + j]
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
        for user, item, is_rating, value, ts in events:  # (a redo may cover some entities)
            if user not in stale_users and user in user_states:
                user_states[user].add(ts, item, is_rating, value, self.genres.get(item, ()))
            if self.item is not None and item not in stale_items and item in item_states:
                item_states[item].add(ts, user, is_rating, value)
        return user_states, item_states

    def _mappings(self, users: list[int], items: list[int],
                  user_states: dict[int, UserState], item_states: dict[int, ItemState],
                  now: int) -> Iterator[tuple[bytes, dict[bytes | str, bytes], list[str]]]:
        """Each entity's hash key, its fields to set (its row(s) and its state) and the
        fields its state was read from (state and row stamp)."""
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
            mapping[self.user_fields[0]] = state.pack()
            yield self.key(self.user, u), mapping, self.user_fields
        for i in items:
            item_state = item_states[i]
            if self.item is None or not item_state.tally.n:
                continue
            stamp, values = item_state.row(now)
            item_state.tally.written = stamp
            mapping = self.item.mapping(stamp, values)
            mapping[self.item_fields[0]] = item_state.pack()
            yield self.key(self.item, i), mapping, self.item_fields  # type: ignore[misc]


def _stamp_us(raw: bytes | None) -> int | None:
    if raw is None:
        return None
    stamp = Timestamp()
    stamp.ParseFromString(raw)
    return stamp.seconds * 1_000_000 + stamp.nanos // 1000
