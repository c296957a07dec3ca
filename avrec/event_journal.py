"""The event journal: ``LogEvents``' durable, append-only record of accepted batches.

A serving process appends each group commit's events to its open *segment*,
``event_log/<stamp>-<id>.journal``, as one record made durable by one ``fdatasync``: no new
file, rename or directory sync per call (a Parquet file per call cost about half of a
one-event ``LogEvents``: the Parquet write, an fsync of the file, a rename, an fsync of the
directory).

Layout: :data:`MAGIC`, then records ``<u32 length><u32 crc32><payload>`` (little-endian), the
payload the batch's columns as JSON (:func:`encode`). A crash mid-append leaves a torn tail (a
short record or a wrong checksum): readers take the records before it, and nothing from it
on was acknowledged. A failed append is cut off again at once and its segment closed.

A segment is closed once it holds ``max_events`` events, when its writer closes (the server
stops) or after a failed append; a closed segment is *compacted* into ``<same
stem>.parquet``, the event log's offline form, then deleted. Readers
(:func:`avrec.tables.read_event_log`) skip a segment whose Parquet file exists, so a crash
between the two steps counts nothing twice. The writer holds an exclusive ``flock`` on its
segment until it is compacted, taken before the segment is renamed in from its creation
name (``*.journal-new``); a process starting over the log compacts each segment nobody holds
(:func:`compact_orphans`: a crash left it) and leaves the others (another replica's open
segment) alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl

from avrec import tables

log = logging.getLogger("avrec.event_journal")

MAGIC = b"avrec event journal 1\n"
SUFFIX = ".journal"
NEW_SUFFIX = ".journal-new"  # a segment being created (header only), renamed to SUFFIX
MAX_EVENTS = 10_000  # events in a segment before it is closed and compacted
_FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
_COLUMNS = ("user_id", "item_id", "event_type", "value")
SCHEMA: dict[str, pl.DataType] = {**tables.EVENTS_SCHEMA, tables.EVENT_ID: pl.Utf8()}

Sync = Callable[[int], None]


def fsync_directory(directory: Path, fsync: Sync | None = None) -> None:
    """Make a new or renamed entry of ``directory`` durable (the entry lives in it)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        (fsync or os.fsync)(fd)
    finally:
        os.close(fd)


def encode(frame: pl.DataFrame) -> bytes:
    """One record of ``frame``'s events (the events schema, ``event_id`` optional).

    >>> len(encode(pl.DataFrame(schema=SCHEMA))) > 8
    True
    """
    columns: list[list[object]] = [frame.get_column(c).to_list() for c in _COLUMNS]
    stamps = frame.get_column("event_timestamp")
    if stamps.dtype.time_unit != "us":  # type: ignore[attr-defined]
        stamps = stamps.dt.cast_time_unit("us")
    columns.append(stamps.cast(pl.Int64).to_list())  # microseconds since the epoch
    columns.append(frame.get_column(tables.EVENT_ID).to_list()
                   if tables.EVENT_ID in frame.columns else [None] * frame.height)
    payload = json.dumps(columns, separators=(",", ":")).encode()
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def read_segment(path: Path) -> tuple[pl.DataFrame, int]:
    """The events of every whole record of the segment at ``path`` (:data:`SCHEMA`), and the
    number of bytes after them that are no whole record (a torn tail; 0: none). Raises
    :class:`ValueError` for a file that is no journal."""
    payloads, torn = _whole_records(path.read_bytes())
    columns: list[list[object]] = [[] for _ in range(6)]
    for payload in payloads:
        for column, values in zip(columns, json.loads(payload), strict=True):
            column.extend(values)
    users, items, kinds, values, stamps, ids = columns
    frame = pl.DataFrame(
        [pl.Series("user_id", users, pl.Int64), pl.Series("item_id", items, pl.Int64),
         pl.Series("event_type", kinds, pl.Utf8), pl.Series("value", values, pl.Float64),
         pl.Series("event_timestamp", stamps, pl.Int64).cast(SCHEMA["event_timestamp"]),
         pl.Series(tables.EVENT_ID, ids, pl.Utf8)])
    return frame, torn


def count_records(path: Path) -> int:
    """How many whole records the segment at ``path`` holds (one per durable write)."""
    return len(_whole_records(path.read_bytes())[0])


def _whole_records(data: bytes) -> tuple[list[bytes], int]:
    """The payloads of the whole records in ``data``, and the bytes after them."""
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):  # killed while writing the header
            return [], len(data)
        raise ValueError("not an avrec event journal (wrong header)")
    payloads, at = [], len(MAGIC)
    while at + _FRAME.size <= len(data):
        length, checksum = _FRAME.unpack_from(data, at)
        payload = data[at + _FRAME.size:at + _FRAME.size + length]
        if len(payload) < length or zlib.crc32(payload) != checksum:
            break
        payloads.append(payload)
        at += _FRAME.size + length
    return payloads, len(data) - at


def compact(path: Path, fsync: Sync | None = None) -> Path | None:
    """Write the segment's events as ``<stem>.parquet`` (durably), then delete the segment;
    the Parquet file (None: the segment held no event). The caller holds its lock."""
    target = path.with_suffix(".parquet")
    if not target.exists():  # else a crash came after the rename: only the delete is left
        frame, torn = read_segment(path)
        if torn:
            log.warning("event journal: %s: its last %d bytes are an unfinished append (never "
                        "acknowledged), left out", path, torn)
        if frame.height == 0:
            target = None
        else:
            partial = path.with_suffix(".compacting")
            with partial.open("wb") as out:
                frame.write_parquet(out)
                out.flush()
                (fsync or os.fsync)(out.fileno())
            partial.replace(target)
            fsync_directory(path.parent, fsync)
    path.unlink()
    fsync_directory(path.parent, fsync)
    return target


def compact_orphans(directory: Path, fsync: Sync | None = None) -> list[Path]:
    """Compact every segment under ``directory`` that no writer holds (left by a crash or a
    stop that could not compact); the segments compacted. A segment a crash left half made
    (``*.journal-new``: a header at most, nothing acknowledged) is deleted."""
    done: list[Path] = []
    if not directory.is_dir():
        return done
    for new in sorted(directory.glob(f"*{NEW_SUFFIX}")):
        with contextlib.suppress(OSError), _locked(new) as fd:
            if fd is not None:
                new.unlink()
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            with _locked(path) as fd:
                if fd is None or not path.exists():  # a live writer's / compacted meanwhile
                    continue
                compact(path, fsync)
                done.append(path)
        except FileNotFoundError:  # compacted meanwhile by its writer
            continue
        except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
            log.warning("event journal: cannot compact %s (%s); readers still read it",
                        path, tables.one_line(exc))
    return done


@dataclass
class _Segment:
    path: Path
    fd: int  # open for appends, flock held until compacted
    size: int  # bytes of whole, acknowledged records (with the header)
    events: int = 0


class JournalWriter:
    """Appends batches to this process's open segment of ``directory``, one durable record
    each; closes a segment at ``max_events`` and compacts it on a thread of its own.

    ``fsync``: what makes a file durable (default: :func:`os.fdatasync` for records,
    :func:`os.fsync` for a new segment and the directory).
    """

    def __init__(self, directory: Path, max_events: int = MAX_EVENTS,
                 fsync: Sync | None = None) -> None:
        if max_events <= 0:
            raise ValueError(f"max_events must be positive, not {max_events}")
        self.directory, self.max_events = directory, max_events
        self._given_sync = fsync
        self._segment: _Segment | None = None
        self._last_stamp = _newest_stamp(directory)
        self._compactions: list[threading.Thread] = []
        self.records = 0  # records appended by this writer (one per group commit)

    @property
    def segment(self) -> Path | None:
        """The open segment (None: none yet, or the last one was closed)."""
        return self._segment.path if self._segment is not None else None

    def _fsync(self, fd: int) -> None:
        (self._given_sync or os.fsync)(fd)

    def append(self, frame: pl.DataFrame, stamp: datetime) -> Path:
        """Append ``frame`` as one record, durable when this returns; the segment holding it.
        ``stamp`` names a new segment (kept increasing, so names sort in write order)."""
        record = encode(frame)
        segment = self._segment or self._open(stamp)
        try:
            _write_all(segment.fd, record)
            (self._given_sync or os.fdatasync)(segment.fd)
        except OSError:
            self._segment = None
            with contextlib.suppress(OSError):  # nothing unacknowledged stays readable
                os.ftruncate(segment.fd, segment.size)
            self._close(segment, background=False)  # a segment of no event: deleted
            raise
        segment.size += len(record)
        segment.events += frame.height
        self.records += 1
        if segment.events >= self.max_events:
            self._segment = None
            self._close(segment, background=True)
        return segment.path

    def close(self) -> None:
        """Compact the open segment and wait for the compactions under way."""
        segment, self._segment = self._segment, None
        if segment is not None:
            self._close(segment, background=False)
        for thread in self._compactions:
            thread.join()
        self._compactions.clear()

    def _open(self, stamp: datetime) -> _Segment:
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            fsync_directory(self.directory.parent, self._fsync)
        if self._last_stamp is not None and stamp <= self._last_stamp:
            stamp = self._last_stamp + timedelta(microseconds=1)
        path = self.directory / f"{stamp:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        # made under another name and locked before it is renamed in: a process starting
        # over the log never finds the segment unlocked (it would compact it away)
        new = path.with_suffix(NEW_SUFFIX)
        fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, MAGIC)
            self._fsync(fd)
            new.replace(path)
            fsync_directory(self.directory, self._fsync)
        except OSError:
            os.close(fd)
            for leftover in (new, path):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            raise
        self._last_stamp = stamp
        self._segment = _Segment(path, fd, len(MAGIC))
        return self._segment

    def _close(self, segment: _Segment, background: bool) -> None:
        """Compact ``segment`` (here or on a thread), then release its lock."""
        def run() -> None:
            try:
                compact(segment.path, self._fsync)
            except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
                log.warning("event journal: cannot compact %s (%s); the next start will",
                            segment.path, tables.one_line(exc))
            finally:
                os.close(segment.fd)

        if not background:
            run()
            return
        self._compactions = [t for t in self._compactions if t.is_alive()]
        thread = threading.Thread(target=run, name="avrec-journal-compaction", daemon=True)
        self._compactions.append(thread)
        thread.start()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int | None]:
    """``path`` opened and exclusively locked while the block runs; None when another
    process holds it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _newest_stamp(directory: Path) -> datetime | None:
    """The time in the newest name of the log (``%Y%m%dT%H%M%S%f-...``): segments and
    compacted files alike."""
    stamps = []
    for path in directory.iterdir() if directory.is_dir() else ():
        with contextlib.suppress(ValueError):
            stamps.append(datetime.strptime(path.name[:21], "%Y%m%dT%H%M%S%f"))
    return max(stamps).replace(tzinfo=UTC) if stamps else None
