"""``LogEvents``' group commit and its bounded event-id window: concurrent batches
share one durable write; a failed write acknowledges none of its group; retried ids are
dropped within the last ``id_window`` accepted ids, which a restart refills from the log."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from avrec import event_journal, tables
from avrec.server.event_log import EventLog, EventLogUnavailableError, RecentIds
from avrec.server.group_commit import GroupCommit
from tests.server.test_durability import NOW, batch, tiny_offline

ITEMS = np.array([1, 2])


def logged_ids(offline: Path) -> list[str]:
    return tables.event_ids(tables.read_event_log(offline))


def test_concurrent_appends_share_fsyncs_and_every_record_is_readable(tmp_path):
    offline = tiny_offline(tmp_path)
    synced: list[int] = []

    def slow_fsync(fd: int) -> None:  # a disk whose flush takes a few ms
        synced.append(fd)
        time.sleep(0.005)
        os.fsync(fd)

    log = EventLog(offline, ITEMS, fsync=slow_fsync)
    writers, calls_each = 8, 10
    start = threading.Barrier(writers)
    paths: dict[str, Path | None] = {}

    def write(worker: int) -> None:
        start.wait()
        for call in range(calls_each):
            ids = [f"w{worker}-c{call}-{i}" for i in range(2)]
            paths[ids[0]] = log.append(batch(100 + worker, 2), NOW, ids)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    calls = writers * calls_each
    assert log.commits.items == calls
    assert log.commits.groups < calls
    assert len(synced) < calls  # one-by-one: one a call, plus three for the new segment
    ids = logged_ids(offline)
    assert sorted(ids) == sorted(f"w{w}-c{c}-{i}" for w in range(writers)
                                 for c in range(calls_each) for i in range(2))
    for first, path in paths.items():  # each call's answer names the segment holding it
        assert path is not None
        assert first in event_journal.read_segment(path)[0][tables.EVENT_ID].to_list()
    assert log.journal.records == log.commits.groups  # one record a shared write
    assert tables.read_events(offline).height == 1 + 2 * calls
    assert log.events.height == 1 + 2 * calls


def test_a_failed_group_write_acknowledges_none_of_it_and_the_next_group_is_shared(tmp_path):
    """The first write blocks, then fails (disk full): its caller gets the error, its events
    are in no record and not remembered; the four calls queued meanwhile go out as one."""
    offline = tiny_offline(tmp_path)
    gate, calls = threading.Event(), []

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the parent directory first (the log directory is new)
            gate.wait(10)
            raise OSError(errno.ENOSPC, "No space left on device")
        os.fsync(fd)

    log = EventLog(offline, ITEMS, fsync=fsync)
    results: dict[str, object] = {}

    def write(name: str) -> None:
        try:
            results[name] = log.append(batch(7, 1), NOW, [name])
        except EventLogUnavailableError as exc:
            results[name] = exc

    first = threading.Thread(target=write, args=("a",))
    first.start()
    while len(calls) < 2:
        time.sleep(0.01)
    queued = [threading.Thread(target=write, args=(name,)) for name in "bcde"]
    for thread in queued:
        thread.start()
    while len(log.commits._queue) < 4:
        time.sleep(0.01)
    gate.set()
    for thread in (first, *queued):
        thread.join()

    assert isinstance(results["a"], EventLogUnavailableError)
    assert "no event of this batch was accepted" in str(results["a"])
    assert len({results[name] for name in "bcde"}) == 1  # one segment, one record for the four
    assert log.journal.records == 1
    assert log.commits.groups == 2
    assert sorted(logged_ids(offline)) == ["b", "c", "d", "e"]
    assert not list((offline / tables.EVENT_LOG).glob("*.tmp"))
    assert "a" not in log.recent_ids
    assert log.append(batch(7, 1), NOW, ["a"]) is not None  # the retry is accepted


def test_duplicates_within_a_group_are_written_once(tmp_path):
    offline = tiny_offline(tmp_path)
    log = EventLog(offline, ITEMS)
    start = threading.Barrier(6)
    answers: list[Path | None] = []

    def write() -> None:
        start.wait()
        answers.append(log.append(batch(7, 2), NOW, ["same", None]))

    threads = [threading.Thread(target=write) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert logged_ids(offline) == ["same"]
    assert tables.read_events(offline).height == 1 + 1 + 6  # "same" once, every id-less event


def test_the_window_keeps_the_newest_ids_and_stays_at_its_bound():
    window = RecentIds(3, ["a", "b"])
    window.extend(["c", "b", "d", "e"])
    assert len(window) == 3
    assert [i in window for i in "abcde"] == [False, False, True, True, True]
    with pytest.raises(ValueError, match="positive"):
        RecentIds(0)


def test_retries_within_the_window_are_dropped_older_ones_accepted_even_after_a_restart(
    tmp_path,
):
    offline = tiny_offline(tmp_path)
    log = EventLog(offline, ITEMS, id_window=5)
    for i in range(10):
        assert log.append(batch(7, 1), NOW, [f"e{i}"]) is not None
    assert len(log.recent_ids) == 5  # not 10: memory stays at the bound
    assert log.append(batch(7, 1), NOW, ["e9"]) is None  # within the window: a duplicate
    assert log.append(batch(7, 1), NOW, ["e5"]) is None
    assert log.append(batch(7, 1), NOW, ["e0"]) is not None  # evicted: accepted again
    assert len(log.recent_ids) == 5

    restarted = EventLog(offline, ITEMS, id_window=5)  # refilled from the log's newest files
    assert len(restarted.recent_ids) == 5
    assert [f"e{i}" in restarted.recent_ids for i in (0, 5, 6, 9)] == [True, False, True, True]
    before = sorted(p.name for p in (offline / tables.EVENT_LOG).iterdir())
    assert restarted.append(batch(7, 1), NOW, ["e9"]) is None
    path = restarted.append(batch(7, 1), NOW, ["e5"])
    assert path is not None and path.name > before[-1]  # names keep the write order
    assert logged_ids(offline)[-3:] == ["e9", "e0", "e5"]


def test_event_ids_reads_the_newest_back_from_the_tail():
    frames = [pl.DataFrame({tables.EVENT_ID: ids}, schema={tables.EVENT_ID: pl.Utf8})
              for ids in (["a", "b"], ["c", None, "d"], [None], ["e"])]
    assert tables.event_ids(frames) == ["a", "b", "c", "d", "e"]
    assert tables.event_ids(frames, last=3) == ["c", "d", "e"]
    assert tables.event_ids(frames, last=10) == ["a", "b", "c", "d", "e"]


def test_group_commit_hands_each_caller_its_own_result():
    groups: list[list[int]] = []

    def flush(items: list[int]) -> list[int]:
        groups.append(items)
        time.sleep(0.01)
        return [item * 10 for item in items]

    commits: GroupCommit[int, int] = GroupCommit(flush)
    results: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, commits.submit(i)))
               for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: i * 10 for i in range(20)}
    assert sorted(i for group in groups for i in group) == list(range(20))
    assert commits.groups == len(groups) and commits.items == 20
