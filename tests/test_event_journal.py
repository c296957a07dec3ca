"""The event journal (``avrec/event_journal.py``): records read back as written, a torn tail
at any byte leaves exactly the whole records before it, a failed append leaves nothing
readable, and compaction keeps every event once."""

from __future__ import annotations

import errno
import os
from datetime import UTC, datetime, timedelta

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avrec import event_journal, tables

START = datetime(2018, 9, 25, tzinfo=UTC)

event = st.tuples(
    st.integers(1, 2**62), st.integers(1, 2**62), st.sampled_from(["rating", "tag", "play"]),
    st.one_of(st.none(), st.floats(0.5, 5.0)), st.integers(0, 10**12),
    st.one_of(st.none(), st.text(max_size=20)))
batches = st.lists(st.lists(event, min_size=1, max_size=4), min_size=1, max_size=5)


def frame_of(rows: list[tuple]) -> pl.DataFrame:
    """Events (the log's schema, ``event_id`` included) from plain tuples."""
    return pl.DataFrame(
        [(u, i, k, v, START + timedelta(microseconds=us), e) for u, i, k, v, us, e in rows],
        schema=event_journal.SCHEMA, orient="row")


def segment_bytes(frames: list[pl.DataFrame]) -> tuple[bytes, list[int]]:
    """A segment of ``frames`` and the offset where each record ends."""
    data, ends = event_journal.MAGIC, []
    for frame in frames:
        data += event_journal.encode(frame)
        ends.append(len(data))
    return data, ends


@settings(max_examples=60, deadline=None)
@given(batches, st.data())
def test_a_cut_anywhere_reads_exactly_the_whole_records_before_it(tmp_path_factory, rows, data):
    frames = [frame_of(batch) for batch in rows]
    whole, ends = segment_bytes(frames)
    cut = data.draw(st.integers(0, len(whole)), label="cut")
    path = tmp_path_factory.mktemp("segment") / "x.journal"
    path.write_bytes(whole[:cut])
    frame, torn = event_journal.read_segment(path)
    kept = [f for f, end in zip(frames, ends, strict=True) if end <= cut]
    expected = pl.concat(kept) if kept else pl.DataFrame(schema=event_journal.SCHEMA)
    assert frame.equals(expected)  # values, order and dtypes; floats to the last bit
    boundaries = [0, len(event_journal.MAGIC), *ends]  # a cut in the header: all of it torn
    assert torn == cut - max(b for b in boundaries if b <= cut)


def test_a_flipped_byte_ends_the_readable_records_and_a_foreign_file_is_refused(tmp_path):
    frames = [frame_of([(1, 2, "tag", None, 5, "a")]), frame_of([(3, 4, "rating", 4.5, 6, None)])]
    whole, ends = segment_bytes(frames)
    damaged = bytearray(whole)
    damaged[ends[0] + 12] ^= 0x40  # inside the second record's payload
    path = tmp_path / "x.journal"
    path.write_bytes(bytes(damaged))
    frame, torn = event_journal.read_segment(path)
    assert frame.equals(frames[0]) and torn == len(whole) - ends[0]
    path.write_bytes(b"PAR1" + whole)
    with pytest.raises(ValueError, match="not an avrec event journal"):
        event_journal.read_segment(path)


def test_a_failed_append_leaves_nothing_readable_and_the_next_goes_to_a_new_segment(tmp_path):
    calls = []

    def sync(fd: int) -> None:  # the fourth sync (the second record's) fails: disk full
        calls.append(fd)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)

    directory = tmp_path / "event_log"
    directory.mkdir()
    writer = event_journal.JournalWriter(directory, fsync=sync)
    first = frame_of([(1, 2, "tag", None, 5, "a")])
    segment = writer.append(first, START)  # header, directory, record: three syncs
    with pytest.raises(OSError, match="No space"):
        writer.append(frame_of([(3, 4, "tag", None, 6, "b")]), START)
    # the written but unsynced record was cut off; the segment closed and compacted
    assert not segment.exists()
    assert pl.read_parquet(segment.with_suffix(".parquet")).equals(first)
    later = writer.append(frame_of([(5, 6, "tag", None, 7, "c")]), START)
    assert later != segment and later.name > segment.name
    writer.close()
    ids = tables.event_ids(tables.read_event_log(tmp_path))
    assert ids == ["a", "c"]


def test_compaction_writes_each_event_once_even_when_it_was_interrupted(tmp_path):
    frames = [frame_of([(1, 2, "tag", None, 5, "a")]), frame_of([(3, 4, "rating", 2.0, 6, "b")])]
    whole, _ = segment_bytes(frames)
    path = tmp_path / "20180925T000000000000-0000beef.journal"
    path.write_bytes(whole)
    target = event_journal.compact(path)
    assert target is not None and not path.exists()
    assert pl.read_parquet(target).equals(pl.concat(frames))
    # killed after the Parquet file's rename, before the segment's delete: readers take the
    # Parquet file alone, and the next compaction only deletes the segment
    path.write_bytes(whole)
    log_dir = tmp_path / "offline" / tables.EVENT_LOG
    log_dir.mkdir(parents=True)
    for p in (path, target):
        p.rename(log_dir / p.name)
    assert [f.height for f in tables.read_event_log(tmp_path / "offline")] == [2]
    assert event_journal.compact_orphans(log_dir) == [log_dir / path.name]
    assert sorted(p.name for p in log_dir.iterdir()) == [target.name]
    assert tables.event_ids(tables.read_event_log(tmp_path / "offline")) == ["a", "b"]
    # an empty segment (killed right after it was created) leaves no file at all
    empty = log_dir / "20180926T000000000000-0000f00d.journal"
    empty.write_bytes(event_journal.MAGIC[:5])
    assert event_journal.compact(empty) is None and not empty.exists()


def test_a_compaction_between_the_readers_listings_loses_nothing(tmp_path, monkeypatch):
    """The reader lists segments and Parquet files one after the other; a segment compacted
    in between (whichever listing came first) is read once, from the one or the other."""
    from pathlib import Path

    log_dir = tmp_path / tables.EVENT_LOG
    log_dir.mkdir()
    frames = [frame_of([(1, 2, "tag", None, 5, "a")]), frame_of([(3, 4, "tag", None, 6, "b")])]
    segment = log_dir / "20180925T000000000000-0000beef.journal"
    segment.write_bytes(segment_bytes(frames)[0])
    real_glob, listings = Path.glob, []

    def glob_then_compact(self, pattern, *args, **kwargs):
        found = list(real_glob(self, pattern, *args, **kwargs))
        if self == log_dir and pattern in ("*.parquet", "*.journal"):
            listings.append(pattern)
            if len(listings) == 1:  # after the first of the two listings, whichever
                event_journal.compact(segment)
        return iter(found)

    monkeypatch.setattr(Path, "glob", glob_then_compact)
    assert tables.event_ids(tables.read_event_log(tmp_path)) == ["a", "b"]
    assert sorted(listings) == ["*.journal", "*.parquet"]
    assert not segment.exists() and segment.with_suffix(".parquet").exists()


def test_readers_during_appends_and_compactions_see_every_acknowledged_event_once(tmp_path):
    """A reader looping while a writer appends and compacts every 3 events: each read holds
    every event acknowledged before it started, none twice, and never fails."""
    import threading

    log_dir = tmp_path / tables.EVENT_LOG
    writer = event_journal.JournalWriter(log_dir, max_events=3)
    acknowledged: list[str] = []
    done, problems = threading.Event(), []

    def read() -> None:
        while not done.is_set():
            before = list(acknowledged)
            ids = tables.event_ids(tables.read_event_log(tmp_path))
            if len(ids) != len(set(ids)) or not set(before) <= set(ids):
                problems.append((before, ids))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(300):
            writer.append(frame_of([(1, 2, "tag", None, n, f"e{n}")]), START)
            acknowledged.append(f"e{n}")
    finally:
        done.set()
        reader.join()
        writer.close()
    assert not problems, problems[:1]
    assert tables.event_ids(tables.read_event_log(tmp_path)) == acknowledged
