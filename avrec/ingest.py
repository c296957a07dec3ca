"""Ingest raw catalogues and interaction logs into the offline tables: the generic format, and
the tables every format ends in.

The **generic** format, for any catalogue (music, video, ...):

- ``events.csv``: ``user_id,item_id,event_type,value,timestamp``. ``timestamp`` is unix
  seconds or ISO 8601 (a naive time is read as UTC); ``value`` may be empty.
  ``event_type`` ``rating`` must carry a value within the rating range.
- ``items.csv``: ``item_id,title`` and optional ``year``, ``genres`` and ``tags``
  (``|``-separated), ``description``, ``image_path`` (absolute, or relative to the
  items file).

A MovieLens-latest directory is read by :mod:`avrec.ingest_movielens` into the same rows.
Every input row either lands in an offline table or goes to ``rejects.parquet`` with its
source file, line number, reason and raw text, and the report's counts add up per source:
``read == landed + rejected`` (reading and field checks: :mod:`avrec.ingest_validation`).
Outputs are rewritten whole and sorted, so re-running on the same input gives the same files
(idempotent).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from avrec import tables
from avrec.ingest_validation import (
    IMAGE_NOT_FOUND,
    IngestReport,
    Rejects,
    digits,
    parse_float,
    parse_id,
    parse_timestamp,
    read_csv,
)

RATING_RANGE = (0.5, 5.0)
GENRE_NONE = "(no genres listed)"
_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-–]\d{0,4})?\)\s*$", re.ASCII)


def events_from_rows(
    source: str,
    rows: list[tuple[int, dict]],
    known_items: set[int],
    rejects: Rejects,
    latest: datetime,
) -> list[dict]:
    """Validate generic event rows (user_id,item_id,event_type,value,timestamp)."""
    out = []
    for line, row in rows:
        user, item = parse_id(row["user_id"]), parse_id(row["item_id"])
        if user is None or item is None:
            rejects.add(source, line, "bad_id", row)
            continue
        ts = parse_timestamp(row["timestamp"], latest)
        if ts is None:
            rejects.add(source, line, "bad_timestamp", row)
            continue
        event_type = row["event_type"].strip().lower()
        if not event_type:
            rejects.add(source, line, "missing_event_type", row)
            continue
        raw_value = (row.get("value") or "").strip()
        value = parse_float(raw_value) if raw_value else None
        if raw_value and value is None:
            rejects.add(source, line, "bad_value", row)
            continue
        if event_type == "rating" and (
            value is None or not RATING_RANGE[0] <= value <= RATING_RANGE[1]
        ):
            rejects.add(source, line, "rating_out_of_range", row)
            continue
        if item not in known_items:
            rejects.add(source, line, "unknown_item", row)
            continue
        out.append(
            {
                "user_id": user,
                "item_id": item,
                "event_type": event_type,
                "value": value,
                "event_timestamp": ts,
                "_source": source,
                "_line": line,
                "_raw": row,
            }
        )
    return out


def dedupe_events(
    events: list[dict], rejects: Rejects, landed: Counter[str]
) -> pl.DataFrame:
    """One event per (user, item, event_type, timestamp); the first row read wins.

    A second tag by the same user on the same item in the same second is the same
    interaction: it is merged (its tag text already joined the item's tags).
    """
    seen: dict[tuple, dict] = {}
    kept = []
    for e in events:
        key = (e["user_id"], e["item_id"], e["event_type"], e["event_timestamp"])
        first = seen.get(key)
        if first is not None:
            same_row = first["_raw"] == e["_raw"]
            reason = "duplicate" if same_row else "merged_into_earlier_event (tag kept on item)"
            rejects.add(e["_source"], e["_line"], reason, e["_raw"])
            continue
        seen[key] = e
        landed[e["_source"]] += 1
        kept.append({k: v for k, v in e.items() if not k.startswith("_")})
    frame = pl.DataFrame(kept, schema=tables.EVENTS_SCHEMA, orient="row")
    return frame.sort(["event_timestamp", "user_id", "item_id", "event_type"])


def _split_title(title: str) -> tuple[str, int | None]:
    match = _YEAR.match(title.strip())
    if not match:
        return title.strip(), None
    return match.group("title").strip(), int(match.group("year"))


def _split_list(text: str | None) -> list[str]:
    if not text:
        return []
    return [p.strip() for p in text.split("|") if p.strip() and p.strip() != GENRE_NONE]


def _items_frame(items: list[dict], item_tags: dict[int, Counter[str]]) -> pl.DataFrame:
    for item in items:
        counts = item_tags.get(item["item_id"], Counter())
        extra = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        item["tags"] = list(dict.fromkeys(item["tags"] + extra))
    return pl.DataFrame(items, schema=tables.ITEMS_SCHEMA, orient="row").sort("item_id")


def _write(frame: pl.DataFrame, name: str, out_dir: Path, report: IngestReport) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = tables.table_path(name, out_dir)
    tmp = path.with_suffix(".parquet.tmp")
    frame.write_parquet(tmp)
    tmp.replace(path)
    report.rows_written[name] = frame.height


def finish(
    events: list[dict],
    items: list[dict],
    item_tags: dict[int, Counter[str]],
    rejects: Rejects,
    out_dir: Path,
    report: IngestReport,
    items_source: str,
) -> IngestReport:
    """Write the ``events``, ``items`` and ``rejects`` tables and complete the report."""
    _write(dedupe_events(events, rejects, report.rows_landed), "events", out_dir, report)
    _write(_items_frame(items, item_tags), "items", out_dir, report)
    report.rows_landed[items_source] = len(items)
    reject_frame = pl.DataFrame(rejects.rows, schema=tables.REJECTS_SCHEMA, orient="row")
    _write(reject_frame.sort(["source", "line"]), "rejects", out_dir, report)
    for row in rejects.rows:
        report.rejects[(row["source"], row["reason"])] += 1
    return report


def catalogue_items(
    source: str,
    rows: list[tuple[int, dict]],
    rejects: Rejects,
    image_for: Callable[[int, dict], str | None],
) -> list[dict]:
    """Validate catalogue rows (``item_id``, ``title``, optional columns) into item records;
    ``image_for`` gives an item's image path (or None)."""
    items: dict[int, dict] = {}
    for line, row in rows:
        item_id = parse_id(row["item_id"])
        if item_id is None:
            rejects.add(source, line, "bad_id", row)
            continue
        if item_id in items:
            rejects.add(source, line, "duplicate", row)
            continue
        title = row["title"].strip()
        if not title:
            rejects.add(source, line, "missing_title", row)
            continue
        year_text = (row.get("year") or "").strip()
        title, year = _split_title(title) if not year_text else (title, None)
        if year_text:
            if not digits(year_text):
                rejects.add(source, line, "bad_year", row)
                continue
            year = int(year_text)
        items[item_id] = {
            "item_id": item_id,
            "title": title,
            "year": year,
            "genres": _split_list(row.get("genres")),
            "tags": _split_list(row.get("tags")),
            "description": (row.get("description") or "").strip() or None,
            "image_path": image_for(item_id, row),
        }
    return list(items.values())


def ingest_generic(
    events_csv: Path, items_csv: Path, out_dir: Path, now: datetime | None = None
) -> IngestReport:
    """Ingest the generic ``events.csv`` + ``items.csv`` format into ``out_dir``."""
    report, rejects = IngestReport(), Rejects()
    latest = now or datetime.now(UTC)
    items_csv, events_csv = Path(items_csv), Path(events_csv)

    item_rows, report.rows_read[items_csv.name] = read_csv(
        items_csv, ["item_id", "title"], rejects)

    def image_for(_item_id: int, row: dict) -> str | None:
        raw = (row.get("image_path") or "").strip()
        if not raw:
            return None
        path = Path(raw) if Path(raw).is_absolute() else items_csv.parent / raw
        try:
            found = path.is_file()
        except (OSError, ValueError):  # a name too long for the file system, a NUL byte
            found = False
        if not found:
            rejects.add(items_csv.name, 0, IMAGE_NOT_FOUND, row)
            return None
        return str(path.resolve())

    items = catalogue_items(items_csv.name, item_rows, rejects, image_for)
    event_rows, report.rows_read[events_csv.name] = read_csv(
        events_csv, ["user_id", "item_id", "event_type", "value", "timestamp"], rejects
    )
    events = events_from_rows(
        events_csv.name, event_rows, {i["item_id"] for i in items}, rejects, latest
    )
    return finish(events, items, {}, rejects, Path(out_dir), report, items_csv.name)
