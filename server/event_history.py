"""The server's event history, indexed by user and by item.

A state rebuild (:mod:`avrec.server.incremental_replay`) needs the events of a few users and
items, not the whole history: filtering every event for them cost a one-event ``LogEvents``
most of its time (an item's first event since start always rebuilds that item's state).
:class:`EventHistory` keeps the events as one frame plus the batches appended since, and for
each id column a sort order of the frame's rows, so :meth:`EventHistory.of` gathers just the
rows of the asked entities (``searchsorted`` into the sorted ids) and filters only the recent
batches. The batches join the frame (and the orders are rebuilt, lazily) once they outgrow a
fraction of it, so the cost of merging stays a small share of the appends.

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
MERGE_SHARE = 8  # recent batches join the frame beyond 1/MERGE_SHARE of its rows
MERGE_ROWS = 4_096  # ... and beyond this many rows (small histories merge less often)
RECENT_BATCHES = 32  # recent batches kept apart before they are joined into one


class EventHistory:
    """Events (at least ``user_id`` and ``item_id``), appended in batches; the rows of given
    users or items in their order of arrival."""

    def __init__(self, frame: pl.DataFrame) -> None:
        self._frame = frame
        self._recent: list[pl.DataFrame] = []
        self._recent_rows = 0
        self._orders: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    @property
    def height(self) -> int:
        return self._frame.height + self._recent_rows

    @property
    def frame(self) -> pl.DataFrame:
        """Every event, in order of arrival."""
        self._merge()
        return self._frame

    def append(self, batch: pl.DataFrame) -> None:
        """Add a batch of events (the frame's columns)."""
        self._recent.append(batch)
        self._recent_rows += batch.height
        if self._recent_rows > max(MERGE_ROWS, self._frame.height // MERGE_SHARE):
            self._merge()
        elif len(self._recent) > RECENT_BATCHES:  # one-event batches: read as one frame
            self._recent = [pl.concat(self._recent, how="vertical_relaxed", rechunk=True)]

    def of(self, users: Iterable[int] = (), items: Iterable[int] = ()) -> pl.DataFrame:
        """The events of any of ``users`` or ``items``, in order of arrival (the frame's
        rows, then the recent batches')."""
        wanted = {key: np.unique(np.fromiter(ids, dtype=np.int64))
                  for key, ids in zip(KEYS, (users, items), strict=True)}
        rows = [self._rows(key, ids) for key, ids in wanted.items() if ids.size]
        indexed = (self._frame[np.unique(np.concatenate(rows))] if rows
                   else self._frame.clear())
        if not self._recent:
            return indexed
        recent = pl.concat(self._recent, how="vertical_relaxed").filter(pl.any_horizontal(
            [pl.col(key).is_in(ids.tolist()) for key, ids in wanted.items()]))
        return pl.concat([indexed, recent], how="vertical_relaxed")

    def _rows(self, key: str, ids: np.ndarray) -> np.ndarray:
        """Row positions in the frame of the events whose ``key`` is in ``ids`` (sorted)."""
        index = self._orders.get(key)
        if index is None:
            index = self._orders[key] = _index(self._frame[key].to_numpy())
        known, bounds, by_id = index
        at = np.minimum(np.searchsorted(known, ids), max(known.size - 1, 0))
        found = at[known[at] == ids] if known.size else at[:0]
        return np.concatenate([by_id[bounds[i]:bounds[i + 1]] for i in found.tolist()]
                              or [np.empty(0, dtype=by_id.dtype)])

    def _merge(self) -> None:
        if self._recent:
            self._frame = pl.concat([self._frame, *self._recent], how="vertical_relaxed",
                                    rechunk=True)
            self._recent, self._recent_rows, self._orders = [], 0, {}


def _index(column: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct ids, their bounds, row positions by id): the rows of ``known[i]`` are
    ``by_id[bounds[i]:bounds[i + 1]]``, in order. 4 bytes a row below 2^31 rows."""
    by_id = np.argsort(column, kind="stable").astype(
        np.int32 if column.size < 2**31 else np.int64)
    known, starts = np.unique(column[by_id], return_index=True)
    return known, np.append(starts, column.size), by_id
