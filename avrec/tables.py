"""The offline tables: their names, locations and schemas.

These Parquet files are the single source of truth below Feast. Everything upstream
(ingest) writes them; everything downstream (behaviour features, encoders, Feast sources)
reads them. Timestamps are UTC with microsecond precision; ids are Int64.
"""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from avrec import config

log = logging.getLogger("avrec.tables")

TS = pl.Datetime("us", "UTC")
EVENT_LOG = "event_log"  # directory of events logged online (one Parquet file per batch)
# the event log's files carry one more, nullable column: the client's idempotency key
EVENT_ID = "event_id"

EVENTS_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.Int64(),
    "item_id": pl.Int64(),
    "event_type": pl.Utf8(),  # "rating", "tag", or a catalogue's own kind ("play", "like", ...)
    "value": pl.Float64(),  # the rating for "rating" events, else the event's weight or null
    "event_timestamp": TS,
}

ITEMS_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.Int64(),
    "title": pl.Utf8(),
    "year": pl.Int32(),  # null when unknown
    "genres": pl.List(pl.Utf8()),  # empty list when none
    "tags": pl.List(pl.Utf8()),  # free-text tags, most frequent first, deduplicated
    "description": pl.Utf8(),  # null when the catalogue has none
    "image_path": pl.Utf8(),  # absolute path of the poster/cover/frame, null when missing
}

REJECTS_SCHEMA: dict[str, pl.DataType] = {
    "source": pl.Utf8(),  # input file name
    "line": pl.Int64(),  # 1-based line in that file (header is line 1)
    "reason": pl.Utf8(),  # bad_id, bad_timestamp, rating_out_of_range, duplicate, unknown_item, ...
    "raw": pl.Utf8(),  # the row as read, JSON-encoded
}


def table_path(name: str, root: Path | None = None) -> Path:
    """Path of offline table ``name`` (e.g. ``"events"``) under ``root`` (default: config)."""
    return (root or config.offline_dir()) / f"{name}.parquet"


def read_table(name: str, root: Path | None = None) -> pl.DataFrame:
    """Read one offline table, with a clear error when it has not been written yet."""
    path = table_path(name, root)
    if not path.exists():
        raise FileNotFoundError(
            f"offline table {name!r} not found at {path}; run `avrec ingest` first"
        )
    return pl.read_parquet(path)


def read_event_log(root: Path | None = None) -> list[pl.DataFrame]:
    """Every readable batch file under ``event_log/``, oldest first (columns as written: the
    events schema, plus ``event_id`` in files of servers that keep it).

    A crash can leave a write unfinished: a ``*.tmp`` file (killed before its rename) or a
    file that does not parse (truncated, garbage). Each is skipped with a one-line warning
    naming it, never a crash; what the server acknowledged was fsynced and renamed first, so
    it is always among the readable files.
    """
    directory = (root or config.offline_dir()) / EVENT_LOG
    if not directory.is_dir():
        return []
    for leftover in sorted(directory.glob("*.tmp")):
        log.warning("event log: skipping %s: an unfinished write (never acknowledged)", leftover)
    frames = []
    for path in sorted(directory.glob("*.parquet")):
        try:
            frame = pl.read_parquet(path)
        except (OSError, pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
            reason = " ".join(str(exc).split())[:200]
            log.warning("event log: skipping unreadable %s (%s)", path, reason)
            continue
        missing = sorted(set(EVENTS_SCHEMA) - set(frame.columns))
        if missing:
            log.warning("event log: skipping %s: no column %s", path, ", ".join(missing))
            continue
        frames.append(frame)
    return frames


def with_event_log(events: pl.DataFrame, logged: list[pl.DataFrame]) -> pl.DataFrame:
    """``events`` plus the logged batches, in the events schema (``event_id`` left out)."""
    if not logged:
        return events
    columns = list(EVENTS_SCHEMA)
    return pl.concat([events, *(frame.select(columns) for frame in logged)],
                     how="vertical_relaxed")


def event_ids(logged: list[pl.DataFrame], last: int | None = None) -> list[str]:
    """The client ``event_id`` of the logged events that had one, oldest first (``last``:
    only the newest that many, read from the newest files back)."""
    newest_first: list[list[str]] = []
    count = 0
    for frame in reversed(logged):
        if last is not None and count >= last:
            break
        if EVENT_ID in frame.columns:
            ids = frame[EVENT_ID].drop_nulls().cast(pl.Utf8).to_list()
            newest_first.append(ids)
            count += len(ids)
    ids = [i for chunk in reversed(newest_first) for i in chunk]
    return ids[-last:] if last is not None and last < len(ids) else ids


def read_events(root: Path | None = None) -> pl.DataFrame:
    """The events table plus every batch the ranking service logged under ``event_log/``
    (unreadable or unfinished batch files skipped with a warning: :func:`read_event_log`)."""
    return with_event_log(read_table("events", root), read_event_log(root))
