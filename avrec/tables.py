"""The offline tables: their names, locations and schemas.

These Parquet files are the single source of truth below Feast. Everything upstream
(ingest) writes them; everything downstream (behaviour features, encoders, Feast sources)
reads them. Timestamps are UTC with microsecond precision; ids are Int64.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from avrec import config

TS = pl.Datetime("us", "UTC")
EVENT_LOG = "event_log"  # directory of events logged online (one Parquet file per batch)

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


def read_events(root: Path | None = None) -> pl.DataFrame:
    """The events table plus every batch the ranking service logged under ``event_log/``."""
    events = read_table("events", root)
    logged = sorted(((root or config.offline_dir()) / EVENT_LOG).glob("*.parquet"))
    if not logged:
        return events
    return pl.concat([events, *map(pl.read_parquet, logged)], how="vertical_relaxed")
