"""``LogEvents``: validate user events, append them offline, update the online rows now.

Accepted events are appended to the event journal under ``offline/event_log/``
(:mod:`avrec.event_journal`: one durable record per write in this process's open segment,
compacted into a Parquet file every ``event_journal_events`` events; the events schema of
:mod:`avrec.tables`; ``avrec features`` folds them into the behaviour tables for later
training). Then the online rows, so the next ``Rank`` sees them:

* incremental (the default, ``incremental_events``): each touched user's ``user_behaviour``
  and ``user_history`` rows and each touched item's ``item_behaviour`` row are updated from a
  per-entity state in Redis, in one pipelined batch (:mod:`avrec.server.incremental`; equal to the
  offline code, property-tested);
* recompute (``incremental_events: false``, the former path, kept for comparison): each
  touched user's rows are recomputed from that user's whole history (offline events + logged
  ones) with the code that builds the offline tables
  (:func:`avrec.behaviour_features.user_features`, :func:`~avrec.behaviour_features.user_history`)
  and written through Feast's ``write_to_online_store``; item rows wait for materialization.

Concurrent calls share the durable write (group commit, :mod:`avrec.server.group_commit`): the
batches queued while one write runs go into the next record together, one ``fdatasync`` for
all of them, and each call answers only once the record holding its events is durable. The
online updates run after, one at a time, outside that write.
Client ``event_id`` values are remembered in a bounded window (:class:`RecentIds`, the last
``event_id_window`` accepted ids, refilled from the log's newest files at start): a retry
within the window is dropped as a duplicate.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from avrec import behaviour_features, tables
from avrec.errors import InputError, StoreUnavailableError
from avrec.event_journal import MAX_EVENTS, JournalWriter, compact_orphans
from avrec.names import USER_BEHAVIOUR, USER_HISTORY
from avrec.server.config import ServeConfig
from avrec.server.event_history import EventHistory
from avrec.server.group_commit import GroupCommit
from avrec.server.incremental import OnlineUpdater

if TYPE_CHECKING:
    from feast import FeatureStore

    from avrec.redis_client import Client

EVENT_TYPES = ("rating", "tag")
RATING_RANGE = (0.5, 5.0)
MAX_EVENT_ID = 128  # characters of a client event_id


class EventError(InputError):
    """An event batch that cannot be accepted; nothing of it was written."""


class EventLogUnavailableError(StoreUnavailableError):
    """The offline event log cannot be written (disk full, read-only, gone); nothing of the
    batch was acknowledged or written online."""


@dataclass(frozen=True)
class LoggedEvent:
    """One event as received (``rating`` only for ratings; ``timestamp`` None = now)."""

    user_id: int
    item_id: int
    event_type: str
    rating: float | None
    timestamp: datetime | None
    event_id: str | None = None  # the client's idempotency key (None: none)


@dataclass(frozen=True)
class LogResult:
    accepted: int
    users: list[int]
    path: Path | None  # the journal segment holding them; None: all duplicates, none written
    duplicates: int = 0


@dataclass(frozen=True)
class _Batch:
    frame: pl.DataFrame
    ids: list[str | None]
    now: datetime


@dataclass(frozen=True)
class _Written:
    frame: pl.DataFrame  # the batch less its duplicates
    ids: list[str | None]
    path: Path | None  # the segment holding them (shared by the group); None: nothing written


class RecentIds:
    """The last ``capacity`` distinct event ids added, the oldest evicted first: memory
    bounded by ``capacity``, not by the number of events."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()) -> None:
        if capacity <= 0:
            raise ValueError(f"event id window must be positive, got {capacity}")
        self.capacity = capacity
        self._members: set[str] = set()
        self._order: deque[str] = deque()
        self.extend(ids)

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._members

    def __len__(self) -> int:
        return len(self._order)

    def extend(self, ids: Iterable[str]) -> None:
        """Remember ``ids`` (oldest first), evicting the oldest beyond the capacity."""
        for event_id in ids:
            if event_id in self._members:
                continue
            self._members.add(event_id)
            self._order.append(event_id)
            if len(self._order) > self.capacity:
                self._members.discard(self._order.popleft())


class EventLog:
    """The offline history the server updates users from, plus the events logged since start."""

    def __init__(self, offline: Path, catalogue_ids: np.ndarray,
                 client: Client | None = None,
                 id_window: int = ServeConfig.event_id_window,
                 fsync: Callable[[int], None] | None = None,
                 journal_events: int = MAX_EVENTS) -> None:
        """``client``: update rows incrementally through it (None: recompute them);
        ``id_window``: how many accepted event ids are remembered for retries; ``fsync``:
        what makes a file durable (default :func:`os.fdatasync` for records, :func:`os.fsync`
        for new files and directories); ``journal_events``: events in a journal segment
        before it is compacted into Parquet."""
        self.offline = offline
        # segments a crash left (no writer holds them) become Parquet before anything reads
        compact_orphans(offline / tables.EVENT_LOG, fsync)
        self.items = tables.read_table("items", offline)
        self.genres = behaviour_features.genre_vocabulary(self.items)
        logged = tables.read_event_log(offline)  # torn or unfinished files: skipped
        self.history = EventHistory(
            tables.with_event_log(tables.read_table("events", offline), logged))
        self.history.build_index()  # not at the first call that rebuilds a state
        # the newest event ids accepted, here or by an earlier process (idempotent retries)
        self.recent_ids = RecentIds(id_window, tables.event_ids(logged, last=id_window))
        self.catalogue = set(int(i) for i in catalogue_ids)
        self.journal = JournalWriter(offline / tables.EVENT_LOG, journal_events, fsync)
        self.commits: GroupCommit[_Batch, _Written] = GroupCommit(self._flush)
        self._lock = threading.Lock()  # the in-memory history and the online rows
        self.client = client
        self.updater: OnlineUpdater | None = None

    @property
    def events(self) -> pl.DataFrame:
        """Every event the server knows: offline, logged earlier, logged since start."""
        return self.history.frame

    def validate(self, events: Sequence[LoggedEvent], now: datetime) -> pl.DataFrame:
        """The batch as an events frame, or :class:`EventError` naming the first bad event."""
        if not events:
            raise EventError("no events in the request")
        rows = []
        for i, event in enumerate(events):
            where = f"event {i} (user {event.user_id}, item {event.item_id})"
            if event.user_id <= 0 or event.item_id <= 0:
                raise EventError(f"{where}: ids must be positive")
            if event.item_id not in self.catalogue:
                raise EventError(f"{where}: item {event.item_id} is not in the catalogue")
            if event.event_type not in EVENT_TYPES:
                raise EventError(f"{where}: event_type {event.event_type!r} not in {EVENT_TYPES}")
            value = None
            if event.event_type == "rating":
                value = event.rating
                low, high = RATING_RANGE
                if value is None or not math.isfinite(value) or not low <= value <= high:
                    raise EventError(f"{where}: rating {value} outside [{low}, {high}]")
            if event.event_id is not None and len(event.event_id) > MAX_EVENT_ID:
                raise EventError(f"{where}: event_id longer than {MAX_EVENT_ID} characters")
            stamp = event.timestamp or now
            if stamp > now:
                raise EventError(f"{where}: timestamp {stamp.isoformat()} is after the server "
                                 f"clock {now.isoformat()}")
            rows.append((event.user_id, event.item_id, event.event_type, value, stamp))
        return pl.DataFrame(rows, schema=tables.EVENTS_SCHEMA, orient="row")

    def fresh(self, frame: pl.DataFrame, ids: Sequence[str | None],
              seen: set[str] | None = None) -> tuple[pl.DataFrame, list[str | None]]:
        """The events of ``frame`` not accepted before (by ``event_id``; the first of ids
        repeated within the batch or in ``seen``, which the batch's ids are added to), with
        their ids. Only the group commit's flush calls it, so no accept runs meanwhile."""
        keep, kept = [], []
        seen = set() if seen is None else seen
        for event_id in ids:
            new = event_id is None or (event_id not in self.recent_ids and event_id not in seen)
            keep.append(new)
            if new:
                kept.append(event_id)
                if event_id is not None:
                    seen.add(event_id)
        if all(keep):
            return frame, list(ids)
        return frame.filter(pl.Series(keep, dtype=pl.Boolean)), kept

    def append(self, frame: pl.DataFrame, now: datetime,
               ids: Sequence[str | None] | None = None) -> Path | None:
        """Write the batch under ``offline/event_log/`` durably and keep it in memory; the
        file's path (None: every event's id was accepted before)."""
        written = self._commit(frame, now, ids)
        if written.path is not None:
            with self._lock:
                self.history.append(written.frame)
        return written.path

    def _commit(self, frame: pl.DataFrame, now: datetime,
                ids: Sequence[str | None] | None) -> _Written:
        ids = list(ids) if ids is not None else [None] * frame.height
        return self.commits.submit(_Batch(frame, ids, now))

    def _flush(self, batches: list[_Batch]) -> list[_Written]:
        """One group: drop the duplicates, write the rest as one file, remember its ids."""
        seen: set[str] = set()
        kept = [self.fresh(batch.frame, batch.ids, seen) for batch in batches]
        writing = [(frame, ids) for frame, ids in kept if frame.height]
        path = None
        if writing:
            frame = pl.concat(
                [frame.with_columns(pl.Series(tables.EVENT_ID, ids, dtype=pl.Utf8))
                 for frame, ids in writing], how="vertical_relaxed")
            path = self._write(frame, max(batch.now for batch in batches))
            self.recent_ids.extend(i for _, ids in writing for i in ids if i is not None)
        return [_Written(frame, ids, path if frame.height else None) for frame, ids in kept]

    def _write(self, frame: pl.DataFrame, now: datetime) -> Path:
        """Append ``frame`` (events + ``event_id``) to the journal as one record, durable
        before the callers are answered (and so before ``LogEvents`` acknowledges): an
        acknowledged batch survives a SIGKILL or a power cut. A failed append is cut off
        again (:class:`~avrec.event_journal.JournalWriter`); ``now`` names a new segment.
        ``event_id`` is null where the client gave none; once written, the ids are
        remembered (:class:`RecentIds`)."""
        try:
            return self.journal.append(frame, now)
        except OSError as exc:
            raise EventLogUnavailableError(f"the event log cannot be written ({exc}); "
                                           "no event of this batch was accepted") from exc

    def close(self) -> None:
        """Compact the journal's open segment; once no call runs (the server stopped)."""
        self.journal.close()

    def user_rows(self, user_ids: list[int], now: datetime) -> pl.DataFrame:
        """Each user's latest ``user_behaviour`` row as of ``now``, from their whole history."""
        history = self.history.of(users=user_ids)
        rows = behaviour_features.user_features(history, self.items, self.genres, now, now)
        return (
            rows.filter(pl.col("event_timestamp") <= now)
            .sort("event_timestamp")
            .group_by("user_id", maintain_order=True)
            .last()
        )

    def history_rows(self, user_ids: list[int], now: datetime) -> pl.DataFrame:
        """Each user's ``user_history`` row as of ``now`` (users without ratings: none)."""
        events = self.history.of(users=user_ids)
        return behaviour_features.user_history(events, now, now)

    def log(self, store: FeatureStore, events: Sequence[LoggedEvent], now: datetime) -> LogResult:
        """Validate, drop events already accepted (by ``event_id``), append the rest offline
        (sharing the write with concurrent calls), then write the touched users' rows
        online."""
        frame = self.validate(events, now)
        written = self._commit(frame, now, [event.event_id or None for event in events])
        frame, duplicates = written.frame, len(events) - written.frame.height
        if frame.height == 0:
            return LogResult(0, [], None, duplicates)
        users = _users(frame)
        if self.client is not None:
            with self._lock:
                self.history.append(frame)
                if self.updater is None:
                    self.updater = OnlineUpdater(store, self.client, self.items, self.genres,
                                                 self.history.of)
                self.updater.update(frame, now)
            return LogResult(frame.height, users, written.path, duplicates)
        with self._lock:
            self.history.append(frame)
            rows = self.user_rows(users, now)
            histories = self.history_rows(users, now)
        store.write_to_online_store(
            USER_BEHAVIOUR, rows.to_pandas(use_pyarrow_extension_array=False))
        if histories.height and USER_HISTORY in {v.name for v in store.list_feature_views()}:
            store.write_to_online_store(
                USER_HISTORY, histories.to_pandas(use_pyarrow_extension_array=False))
        return LogResult(frame.height, users, written.path, duplicates)


def _users(frame: pl.DataFrame) -> list[int]:
    return sorted(set(frame["user_id"].to_list()))
