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
EVENT_LOG = "event_log"  # events logged online: journal segments and their Parquet files
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
    """Every readable batch of ``event_log/``, oldest first: its Parquet files and the whole
    records of its journal segments (:mod:`avrec.event_journal`; columns as written: the
    events schema, plus ``event_id`` where servers keep it).

    A crash can leave a write unfinished: a ``*.tmp`` file (killed before its rename), a file
    that does not parse (truncated, garbage) or a segment's torn tail. Each is skipped with a
    one-line warning naming it, never a crash; what the server acknowledged was made durable
    first, so it is always among what is read.
    """
    from avrec import event_journal  # it imports this module

    directory = (root or config.offline_dir()) / EVENT_LOG
    if not directory.is_dir():
        return []
    for leftover in sorted(directory.glob("*.tmp")):
        log.warning("event log: skipping %s: an unfinished write (never acknowledged)", leftover)
    frames = []
    # segments listed before the Parquet files: one compacted in between (its Parquet file
    # renamed in, then the segment deleted) is then found as the one or the other
    segments = list(directory.glob(f"*{event_journal.SUFFIX}"))
    batch_files = list(directory.glob("*.parquet"))
    listed = {path.name for path in batch_files}
    for path in sorted([*segments, *batch_files], key=lambda p: p.name):
        if path.suffix != event_journal.SUFFIX:
            frame = _read_batch_file(path)
        elif path.with_suffix(".parquet").name in listed:
            continue  # compacted: read as the Parquet file (the segment's delete is pending)
        else:
            frame = _read_segment(path)
        if frame is not None:
            frames.append(frame)
    return frames


def _read_batch_file(path: Path) -> pl.DataFrame | None:
    try:
        frame = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
        log.warning("event log: skipping unreadable %s (%s)", path, one_line(exc))
        return None
    missing = sorted(set(EVENTS_SCHEMA) - set(frame.columns))
    if missing:
        log.warning("event log: skipping %s: no column %s", path, ", ".join(missing))
        return None
    return frame


def one_line(error: BaseException) -> str:
    """An error's message on one line, at most 200 characters (for a log line)."""
    return " ".join(str(error).split())[:200]


def _read_segment(path: Path) -> pl.DataFrame | None:
    from avrec import event_journal

    try:
        frame, torn = event_journal.read_segment(path)
    except FileNotFoundError:  # compacted since the listing: its Parquet file is in place
        compacted = path.with_suffix(".parquet")
        return _read_batch_file(compacted) if compacted.exists() else None
    except (OSError, ValueError) as exc:
        log.warning("event log: skipping unreadable %s (%s)", path, one_line(exc))
        return None
    if torn:
        log.warning("event log: %s: skipping its last %d bytes, an unfinished append (never "
                    "acknowledged)", path, torn)
    return frame


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
