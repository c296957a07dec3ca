"""Ingest raw catalogues and interaction logs into the offline tables.

Two input formats are understood:

* **MovieLens-latest** directory: ``ratings.csv movies.csv tags.csv`` (``links.csv`` is not
  needed) plus an optional poster directory of ``<movieId>.jpg`` files.
* **Generic** format, for any catalogue (music, video, ...):

  - ``events.csv``: ``user_id,item_id,event_type,value,timestamp``. ``timestamp`` is unix
    seconds or ISO 8601 (a naive time is read as UTC); ``value`` may be empty.
    ``event_type`` ``rating`` must carry a value within the rating range.
  - ``items.csv``: ``item_id,title`` and optional ``year``, ``genres`` and ``tags``
    (``|``-separated), ``description``, ``image_path`` (absolute, or relative to the
    items file).

Every input row either lands in an offline table or goes to ``rejects.parquet`` with its
source file, line number, reason and raw text, and the report's counts add up per source:
``read == landed + rejected``. Files are UTF-8 (a byte-order mark is accepted); a row with
bytes that are not UTF-8 (``bad_encoding``), a field over 128 KiB (``field_too_large``), too
many or too few fields (``wrong_field_count``) or only empty fields (``empty_row``) is
rejected, never repaired. Ids are ASCII digits. Outputs are rewritten whole and sorted, so
re-running on the same input gives the same files (idempotent).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from avrec import tables
from avrec.errors import InputError

RATING_RANGE = (0.5, 5.0)
# Anything before the web or after tomorrow is a corrupt timestamp, not an event.
EARLIEST = datetime(1990, 1, 1, tzinfo=UTC)
GENRE_NONE = "(no genres listed)"
_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})(?:[-–]\d{0,4})?\)\s*$", re.ASCII)
# bytes that are not UTF-8, as decoded with errors="surrogateescape"
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
IMAGE_NOT_FOUND = "image_not_found (item kept without image)"
# reject rows written as warnings: their input row landed anyway
NOTES = frozenset({IMAGE_NOT_FOUND})


class IngestError(InputError):
    """An input that cannot be read at all (missing file, missing columns)."""


@dataclass
class IngestReport:
    """What an ingest run read, wrote and rejected."""

    rows_read: Counter[str] = field(default_factory=Counter)
    rows_landed: Counter[str] = field(default_factory=Counter)
    rows_written: Counter[str] = field(default_factory=Counter)
    rejects: Counter[tuple[str, str]] = field(default_factory=Counter)

    def rejected(self) -> Counter[str]:
        """Rejected input rows per source (warnings about rows that landed left out)."""
        out: Counter[str] = Counter()
        for (source, reason), n in self.rejects.items():
            if reason not in NOTES:
                out[source] += n
        return out

    def unaccounted(self) -> dict[str, tuple[int, int, int]]:
        """Sources whose ``read != landed + rejected``: ``{source: (read, landed, rejected)}``
        (empty when every row is accounted for)."""
        rejected = self.rejected()
        sources = set(self.rows_read) | set(self.rows_landed) | set(rejected)
        counts = {s: (self.rows_read[s], self.rows_landed[s], rejected[s]) for s in sources}
        return {s: c for s, c in counts.items() if c[0] != c[1] + c[2]}

    def summary(self) -> str:
        """A short human-readable table of the counts."""
        rejected = self.rejected()
        lines = ["source                   read   landed rejected",
                 "-------------------- -------- -------- --------"]
        lines += [f"{src:<20} {n:>8} {self.rows_landed[src]:>8} {rejected[src]:>8}"
                  for src, n in sorted(self.rows_read.items())]
        lines += ["", "table                written", "-------------------- --------"]
        lines += [f"{t:<20} {n:>8}" for t, n in sorted(self.rows_written.items())]
        lines += ["", "rejected (source, reason)"]
        if not self.rejects:
            lines.append("  none")
        lines += [f"  {s}: {r}: {n}" for (s, r), n in sorted(self.rejects.items())]
        return "\n".join(lines)


@dataclass
class _Rejects:
    rows: list[dict] = field(default_factory=list)

    def add(self, source: str, line: int, reason: str, raw: object) -> None:
        self.rows.append(
            {"source": source, "line": line, "reason": reason, "raw": json.dumps(raw, default=str)}
        )


def _read_csv(
    path: Path, required: list[str], rejects: _Rejects
) -> tuple[list[tuple[int, dict]], int]:
    """Rows of a CSV as (line number, dict), and the number of rows read (blank lines aside);
    rows that cannot be read whole go to rejects."""
    if not path.exists():
        raise IngestError(f"input file not found: {path}")
    source, rows, read = path.name, [], 0
    # utf-8-sig: a byte-order mark is not part of the first column's name
    with path.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)  # fields over csv.field_size_limit() (128 KiB) raise csv.Error
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise IngestError(f"{path}: unreadable header: {exc}") from exc
        if header is None:
            raise IngestError(f"{path}: empty file, expected header {required}")
        header = [h.strip() for h in header]
        missing = [c for c in required if c not in header]
        if missing:
            raise IngestError(f"{path}: missing column(s) {missing}; header is {header}")
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:  # the rest of the physical line is skipped
                read += 1
                reason = "field_too_large" if "field limit" in str(exc) else "unreadable_row"
                rejects.add(source, reader.line_num, reason, str(exc))
                continue
            line = reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # a blank line is no row
            read += 1
            if any(_NOT_UTF8.search(v) for v in record):
                rejects.add(source, line, "bad_encoding", record)
            elif len(record) != len(header):
                rejects.add(source, line, "wrong_field_count", record)
            elif all(not v.strip() for v in record):
                rejects.add(source, line, "empty_row", record)
            else:
                rows.append((line, dict(zip(header, record, strict=True))))
    return rows, read


def _digits(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes ``²``, which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def _parse_id(text: str) -> int | None:
    text = text.strip()
    if not _digits(text):
        return None
    value = int(text)
    return value if 0 < value < 2**63 else None


def _parse_timestamp(text: str, latest: datetime) -> datetime | None:
    text = text.strip()
    try:
        if re.fullmatch(r"\d+(\.\d+)?", text, re.ASCII):
            ts = datetime.fromtimestamp(float(text), tz=UTC)
        else:
            ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
            ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        return None
    return ts if EARLIEST <= ts <= latest else None


def _parse_float(text: str) -> float | None:
    if not text.isascii():
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _events_from_rows(
    source: str,
    rows: list[tuple[int, dict]],
    known_items: set[int],
    rejects: _Rejects,
    latest: datetime,
) -> list[dict]:
    """Validate generic event rows (user_id,item_id,event_type,value,timestamp)."""
    out = []
    for line, row in rows:
        user, item = _parse_id(row["user_id"]), _parse_id(row["item_id"])
        if user is None or item is None:
            rejects.add(source, line, "bad_id", row)
            continue
        ts = _parse_timestamp(row["timestamp"], latest)
        if ts is None:
            rejects.add(source, line, "bad_timestamp", row)
            continue
        event_type = row["event_type"].strip().lower()
        if not event_type:
            rejects.add(source, line, "missing_event_type", row)
            continue
        raw_value = (row.get("value") or "").strip()
        value = _parse_float(raw_value) if raw_value else None
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


def _dedupe_events(
    events: list[dict], rejects: _Rejects, landed: Counter[str]
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


def _finish(
    events: list[dict],
    items: list[dict],
    item_tags: dict[int, Counter[str]],
    rejects: _Rejects,
    out_dir: Path,
    report: IngestReport,
    items_source: str,
) -> IngestReport:
    _write(_dedupe_events(events, rejects, report.rows_landed), "events", out_dir, report)
    _write(_items_frame(items, item_tags), "items", out_dir, report)
    report.rows_landed[items_source] = len(items)
    reject_frame = pl.DataFrame(rejects.rows, schema=tables.REJECTS_SCHEMA, orient="row")
    _write(reject_frame.sort(["source", "line"]), "rejects", out_dir, report)
    for row in rejects.rows:
        report.rejects[(row["source"], row["reason"])] += 1
    return report


def _catalogue_items(
    source: str,
    rows: list[tuple[int, dict]],
    rejects: _Rejects,
    image_for: Callable[[int, dict], str | None],
) -> list[dict]:
    items: dict[int, dict] = {}
    for line, row in rows:
        item_id = _parse_id(row["item_id"])
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
            if not _digits(year_text):
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


def ingest_movielens(
    ml_dir: Path, out_dir: Path, posters_dir: Path | None = None, now: datetime | None = None
) -> IngestReport:
    """Ingest a MovieLens-latest directory (and optional posters) into ``out_dir``."""
    ml_dir, report, rejects = Path(ml_dir), IngestReport(), _Rejects()
    latest = now or datetime.now(UTC)

    movie_rows, report.rows_read["movies.csv"] = _read_csv(
        ml_dir / "movies.csv", ["movieId", "title", "genres"], rejects)
    posters = (
        {int(p.stem): p.resolve() for p in Path(posters_dir).glob("*.jpg") if _digits(p.stem)}
        if posters_dir
        else {}
    )
    items = _catalogue_items(
        "movies.csv",
        [(line, {"item_id": r["movieId"], **r}) for line, r in movie_rows],
        rejects,
        lambda item_id, _row: str(posters[item_id]) if item_id in posters else None,
    )
    known = {item["item_id"] for item in items}
    for item_id in sorted(set(posters) - known):
        rejects.add("posters", 0, "unknown_item", str(posters[item_id]))
    report.rows_read["posters"] = len(posters)
    report.rows_landed["posters"] = sum(1 for i in items if i["image_path"] is not None)

    rating_rows, report.rows_read["ratings.csv"] = _read_csv(
        ml_dir / "ratings.csv", ["userId", "movieId", "rating", "timestamp"], rejects
    )
    events = _events_from_rows(
        "ratings.csv",
        [
            (
                line,
                {
                    "user_id": r["userId"],
                    "item_id": r["movieId"],
                    "event_type": "rating",
                    "value": r["rating"],
                    "timestamp": r["timestamp"],
                },
            )
            for line, r in rating_rows
        ],
        known,
        rejects,
        latest,
    )

    item_tags: dict[int, Counter[str]] = {}
    tags_path = ml_dir / "tags.csv"
    if tags_path.exists():
        tag_rows, report.rows_read["tags.csv"] = _read_csv(
            tags_path, ["userId", "movieId", "tag", "timestamp"], rejects)
        valid = []
        for line, r in tag_rows:
            if not r["tag"].strip():
                rejects.add("tags.csv", line, "empty_tag", r)
            else:
                valid.append((line, r))
        tag_events = _events_from_rows(
            "tags.csv",
            [
                (
                    line,
                    {
                        "user_id": r["userId"],
                        "item_id": r["movieId"],
                        "event_type": "tag",
                        "value": "",
                        "timestamp": r["timestamp"],
                        "tag": r["tag"],
                    },
                )
                for line, r in valid
            ],
            known,
            rejects,
            latest,
        )
        for e in tag_events:
            item_tags.setdefault(e["item_id"], Counter())[e["_raw"]["tag"].strip().lower()] += 1
        events += tag_events
    return _finish(events, items, item_tags, rejects, Path(out_dir), report, "movies.csv")


def ingest_generic(
    events_csv: Path, items_csv: Path, out_dir: Path, now: datetime | None = None
) -> IngestReport:
    """Ingest the generic ``events.csv`` + ``items.csv`` format into ``out_dir``."""
    report, rejects = IngestReport(), _Rejects()
    latest = now or datetime.now(UTC)
    items_csv, events_csv = Path(items_csv), Path(events_csv)

    item_rows, report.rows_read[items_csv.name] = _read_csv(
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

    items = _catalogue_items(items_csv.name, item_rows, rejects, image_for)
    event_rows, report.rows_read[events_csv.name] = _read_csv(
        events_csv, ["user_id", "item_id", "event_type", "value", "timestamp"], rejects
    )
    events = _events_from_rows(
        events_csv.name, event_rows, {i["item_id"] for i in items}, rejects, latest
    )
    return _finish(events, items, {}, rejects, Path(out_dir), report, items_csv.name)
