"""Rows and fields of the ingest inputs: reading a CSV into rows or rejects, parsing ids,
timestamps and values, and the report whose counts add up per source.

A row with bytes that are not UTF-8 (``bad_encoding``), a field over 128 KiB
(``field_too_large``), too many or too few fields (``wrong_field_count``) or only empty fields
(``empty_row``) is rejected, never repaired; files are UTF-8 (a byte-order mark is accepted).
Ids are ASCII digits. Every rejected row keeps its source file, line number, reason and raw
text (:class:`Rejects`).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from avrec.errors import InputError

# Anything before the web or after tomorrow is a corrupt timestamp, not an event.
EARLIEST = datetime(1990, 1, 1, tzinfo=UTC)
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
class Rejects:
    """The rejected rows of one run, as rows of the ``rejects`` table."""

    rows: list[dict] = field(default_factory=list)

    def add(self, source: str, line: int, reason: str, raw: object) -> None:
        self.rows.append(
            {"source": source, "line": line, "reason": reason, "raw": json.dumps(raw, default=str)}
        )


def read_csv(
    path: Path, required: list[str], rejects: Rejects
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


def digits(text: str) -> bool:
    """ASCII digits only (``str.isdigit`` also takes ``²``, which ``int`` refuses)."""
    return text.isascii() and text.isdigit()


def parse_id(text: str) -> int | None:
    """A positive 64-bit id written in ASCII digits, else None."""
    text = text.strip()
    if not digits(text):
        return None
    value = int(text)
    return value if 0 < value < 2**63 else None


def parse_timestamp(text: str, latest: datetime) -> datetime | None:
    """Unix seconds or ISO 8601 (naive is UTC) between :data:`EARLIEST` and ``latest``."""
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


def parse_float(text: str) -> float | None:
    """A finite ASCII number, else None."""
    if not text.isascii():
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None
