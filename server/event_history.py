"""The server's event history, indexed by user and by item.

A state rebuild (:mod:`avrec.server.incremental_replay`) needs the events of a few users and
items, not the whole history: filtering every event for them cost a one-event ``LogEvents``
most of its time (an item's first event since start always rebuilds that item's state).
:class:`EventHistory` keeps the events as one frame plus the events appended since, and for
each id column the frame's rows grouped by id, so :meth:`EventHistory.of` gathers just the
rows of the asked entities (a binary search among the ids) and scans only the recent events.
These join the frame (its index is rebuilt, lazily) once they outgrow a fraction of it, so
the cost of merging stays a small share of the appends.

>>> history = EventHistory(pl.DataFrame({"user_id": [1, 2, 1], "item_id": [10, 10, 30]}))
>>> history.append(pl.DataFrame({"user_id": [2], "item_id": [30]}))
>>> history.of(users={1}).rows()
[(1, 10), (1, 30)]
>>> history.of(items={30}).rows()
[(1, 30), (2, 30)]
>>> history.frame.height
4
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import polars as pl

KEYS = ("user_id", "item_id")
MERGE_SHARE = 8  # recent events join the indexed frame beyond 1/MERGE_SHARE of its rows
MERGE_ROWS = 4_096  # ... and beyond this many rows (small histories merge less often)
MAX_CHUNKS = 64  # the recent events are made contiguous beyond this many chunks


class EventHistory:
    """Events (at least ``user_id`` and ``item_id``), appended in batches; the rows of given
    users or items in their order of arrival.

    Three parts, oldest first: the indexed frame (the rows of an id found by binary search),
    the recent events (one frame, scanned with ``np.isin``) and the batches appended since
    the last read (joined to the recent events when read)."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self._frame = frame
        self._index: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._recent = frame.clear()
        self._recent_ids: dict[str, np.ndarray] = {}
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0

    @property
    def height(self) -> int:
        return self._frame.height + self._recent.height + self._pending_rows

    @property
    def frame(self) -> pl.DataFrame:
        """Every event, in order of arrival."""
        self._merge()
        return self._frame

    def append(self, batch: pl.DataFrame) -> None:
        """Add a batch of events (the frame's columns)."""
        self._pending.append(batch)
        self._pending_rows += batch.height
        if (self._recent.height + self._pending_rows
                > max(MERGE_ROWS, self._frame.height // MERGE_SHARE)):
            self._merge()

    def of(self, users: Iterable[int] = (), items: Iterable[int] = ()) -> pl.DataFrame:
        """The events of any of ``users`` or ``items``, in order of arrival."""
        wanted = {key: np.unique(np.fromiter(ids, dtype=np.int64))
                  for key, ids in zip(KEYS, (users, items), strict=True)}
        rows = [self._rows(key, ids) for key, ids in wanted.items() if ids.size]
        indexed = self._frame[np.unique(np.concatenate(rows))] if rows else self._frame.clear()
        recent = self._recent_events()
        if not recent.height:
            return indexed
        hit = np.zeros(recent.height, dtype=bool)
        for key, ids in wanted.items():
            hit |= np.isin(self._recent_ids[key], ids)
        return pl.concat([indexed, recent[np.flatnonzero(hit)]], how="vertical_relaxed")

    def build_index(self) -> None:
        """Index the frame now (else the first :meth:`of` does; a server calls this at start)."""
        for key in KEYS:
            self._rows(key, np.empty(0, dtype=np.int64))

    def _rows(self, key: str, ids: np.ndarray) -> np.ndarray:
        """Row positions in the indexed frame of the events whose ``key`` is in ``ids``."""
        index = self._index.get(key)
        if index is None:
            index = self._index[key] = _index(self._frame[key].to_numpy())
        known, bounds, by_id = index
        at = np.minimum(np.searchsorted(known, ids), max(known.size - 1, 0))
        found = at[known[at] == ids] if known.size else at[:0]
        return np.concatenate([by_id[bounds[i]:bounds[i + 1]] for i in found.tolist()]
                              or [np.empty(0, dtype=by_id.dtype)])

    def _recent_events(self) -> pl.DataFrame:
        """The recent events, the batches appended since the last read included."""
        if self._pending:
            recent = self._recent
            for batch in self._pending:  # vstack: the chunks are kept, not copied
                recent = (recent.vstack(batch) if batch.schema == recent.schema
                          else pl.concat([recent, batch], how="vertical_relaxed"))
            self._recent = recent.rechunk() if recent.n_chunks() > MAX_CHUNKS else recent
            self._recent_ids = {key: np.concatenate(
                [self._recent_ids.get(key, np.empty(0, np.int64)),
                 *(batch[key].to_numpy() for batch in self._pending)]) for key in KEYS}
            self._pending, self._pending_rows = [], 0
        return self._recent

    def _merge(self) -> None:
        """Every event into the indexed frame (its index is rebuilt when next read)."""
        recent = self._recent_events()
        if recent.height:
            self._frame = pl.concat([self._frame, recent], how="vertical_relaxed",
                                    rechunk=True)
            self._recent, self._recent_ids, self._index = recent.clear(), {}, {}


def _index(column: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct ids, their bounds, row positions by id): the rows of ``known[i]`` are
    ``by_id[bounds[i]:bounds[i + 1]]``, in order. 4 bytes a row below 2^31 rows."""
    by_id = np.argsort(column, kind="stable").astype(
        np.int32 if column.size < 2**31 else np.int64)
    known, starts = np.unique(column[by_id], return_index=True)
    return known, np.append(starts, column.size), by_id
