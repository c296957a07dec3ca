"""Durable ``LogEvents``: each batch is one journal record, synced before the call is
acknowledged; segments become Parquet files when full, at stop, or at the next start after
a crash; readers of ``offline/event_log/`` skip what a crash can leave behind (``*.tmp``,
truncated or garbage files, a segment's torn tail) with a one-line warning."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pytest

from avrec import event_journal, tables
from tests.server.test_faults import Load

NOW = datetime(2018, 9, 25, tzinfo=UTC)


def tiny_offline(root: Path) -> Path:
    """An offline directory with two items and one event: enough for :class:`EventLog`."""
    offline = root / "offline"
    offline.mkdir(parents=True)
    pl.DataFrame(
        {"item_id": [1, 2], "title": ["a", "b"], "year": [2000, None],
         "genres": [["Drama"], []], "tags": [[], []], "description": [None, None],
         "image_path": [None, None]},
        schema=tables.ITEMS_SCHEMA,
    ).write_parquet(tables.table_path("items", offline))
    pl.DataFrame(
        [(1, 1, "rating", 4.0, datetime(2018, 1, 1, tzinfo=UTC))],
        schema=tables.EVENTS_SCHEMA, orient="row",
    ).write_parquet(tables.table_path("events", offline))
    return offline


def batch(user: int, n: int = 3) -> pl.DataFrame:
    return pl.DataFrame(
        [(user, 1 + i % 2, "rating", 3.0, NOW) for i in range(n)],
        schema=tables.EVENTS_SCHEMA, orient="row",
    )


def test_an_append_is_one_record_synced_before_it_returns(tmp_path, monkeypatch):
    """A new segment: its header, then the directory, synced; then each batch is one record
    and one ``fdatasync`` of the segment, before ``append`` returns. At close the segment
    becomes one Parquet file of every batch, and is deleted."""
    from avrec.server.event_log import EventLog

    offline = tiny_offline(tmp_path)
    log = EventLog(offline, np.array([1, 2]))
    synced: list[tuple[str, str]] = []
    real_fsync, real_datasync = os.fsync, os.fdatasync

    def recorder(name: str, real):
        def sync(fd: int) -> None:
            synced.append((name, os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)
        return sync

    monkeypatch.setattr(os, "fsync", recorder("fsync", real_fsync))
    monkeypatch.setattr(os, "fdatasync", recorder("fdatasync", real_datasync))
    directory = offline / tables.EVENT_LOG
    segment = log.append(batch(7), NOW)
    assert segment.suffix == event_journal.SUFFIX
    # the parent first (the directory was created), then the new segment (its header, still
    # under its creation name) and the directory (the renamed entry), then the record
    assert synced == [("fsync", str(offline)),
                      ("fsync", str(segment.with_suffix(event_journal.NEW_SUFFIX))),
                      ("fsync", str(directory)), ("fdatasync", str(segment))]
    assert event_journal.read_segment(segment)[0].height == 3
    synced.clear()
    assert log.append(batch(8, 2), NOW) == segment
    assert synced == [("fdatasync", str(segment))]  # no new file, no rename, no directory
    assert sorted(p.name for p in directory.iterdir()) == [segment.name]

    log.close()
    compacted = segment.with_suffix(".parquet")
    assert sorted(p.name for p in directory.iterdir()) == [compacted.name]
    assert pl.read_parquet(compacted)["user_id"].to_list() == [7, 7, 7, 8, 8]


def test_a_segment_is_compacted_once_it_holds_max_events(tmp_path):
    from avrec.server.event_log import EventLog

    offline = tiny_offline(tmp_path)
    log = EventLog(offline, np.array([1, 2]), journal_events=5)
    first = log.append(batch(7, 3), NOW)
    assert log.append(batch(8, 2), NOW) == first  # 5 events: closed, compacted on a thread
    second = log.append(batch(9, 1), NOW)
    assert second != first and second.name > first.name  # names keep the write order
    log.close()
    directory = offline / tables.EVENT_LOG
    assert sorted(p.suffix for p in directory.iterdir()) == [".parquet", ".parquet"]
    assert [f.height for f in tables.read_event_log(offline)] == [5, 1]


def test_a_crashed_writers_segment_is_read_then_compacted_at_the_next_start(tmp_path):
    """A segment no process holds (its writer was killed) is read as it is, then compacted by
    the next server to start; one killed while being created is deleted; a segment another
    writer holds is left to it."""
    from avrec.server.event_log import EventLog

    offline = tiny_offline(tmp_path)
    directory = offline / tables.EVENT_LOG
    live = EventLog(offline, np.array([1, 2]))
    held = live.append(batch(5, 2), NOW)
    orphan = directory / "20180101T000000000000-0000dead.journal"
    orphan.write_bytes(event_journal.MAGIC + event_journal.encode(batch(6, 4)))
    half_made = directory / f"20180102T000000000000-0000f00d{event_journal.NEW_SUFFIX}"
    half_made.write_bytes(event_journal.MAGIC[:5])  # killed while creating a segment
    assert tables.read_events(offline).height == 1 + 2 + 4

    restarted = EventLog(offline, np.array([1, 2]))
    assert not orphan.exists() and orphan.with_suffix(".parquet").exists()
    assert not half_made.exists()
    assert held.exists()  # another writer's open segment: not touched
    assert restarted.events.height == 1 + 2 + 4
    live.close()
    restarted.close()
    assert tables.read_events(offline).height == 1 + 2 + 4


def test_readers_skip_unfinished_truncated_and_garbage_files_with_a_warning(tmp_path, caplog):
    from avrec.server.event_log import EventLog

    offline = tiny_offline(tmp_path)
    log = EventLog(offline, np.array([1, 2]))
    log.append(batch(7), NOW)
    log.close()
    directory = offline / tables.EVENT_LOG
    (good,) = directory.glob("*.parquet")
    whole = good.read_bytes()
    truncated = directory / "20180925T000000000001-trunc.parquet"
    truncated.write_bytes(whole[: len(whole) // 2])  # a torn Parquet file
    garbage = directory / "20180925T000000000002-garbage.parquet"
    garbage.write_bytes(b"\x00not parquet at all\n" * 3)
    empty = directory / "20180925T000000000003-empty.parquet"
    empty.write_bytes(b"")
    unfinished = directory / "20180925T000000000004-0000cafe.tmp"
    unfinished.write_bytes(whole[:100])
    wrong = directory / "20180925T000000000005-wrong.parquet"
    pl.DataFrame({"x": [1]}).write_parquet(wrong)
    torn = directory / "20180925T000000000006-torn.journal"  # killed mid-append
    torn.write_bytes(event_journal.MAGIC + event_journal.encode(batch(9, 2))
                     + event_journal.encode(batch(10, 4))[:-5])
    alien = directory / "20180925T000000000007-alien.journal"
    alien.write_bytes(b"not a journal at all")

    with caplog.at_level(logging.WARNING, logger="avrec.tables"):
        events = tables.read_events(offline)  # the reader of `avrec features`
    assert events.height == 1 + 3 + 2  # the offline event, the good batch, the torn's whole
    assert set(events["user_id"].to_list()) == {1, 7, 9}
    assert events.columns == list(tables.EVENTS_SCHEMA)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for bad in (truncated, garbage, empty, unfinished, wrong, torn, alien):
        (line,) = [m for m in warned if str(bad) in m]
        assert "\n" not in line
    assert not any(str(good) in m for m in warned)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        restarted = EventLog(offline, np.array([1, 2]))  # a server starting over the log
    assert restarted.events.height == 6
    assert not torn.exists() and torn.with_suffix(".parquet").exists()  # its whole records
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(torn) in m and "unfinished append" in m for m in warned)
    assert any(str(alien) in m and "cannot compact" in m for m in warned)
    assert len([m for m in warned if "skipping" in m]) == 6  # the reader's, torn's gone


def test_features_build_reads_past_a_torn_event_log(tmp_path, caplog):
    """``avrec features`` (``behaviour_features.build``) over a log with a torn file."""
    from avrec import behaviour_features
    from avrec.server.event_log import EventLog

    offline = tiny_offline(tmp_path)
    EventLog(offline, np.array([1, 2])).append(batch(7), NOW)
    torn = offline / tables.EVENT_LOG / "20180925T000000000009-torn.parquet"
    torn.write_bytes(b"PAR1\x00\x01")
    with caplog.at_level(logging.WARNING, logger="avrec.tables"):
        behaviour_features.build(offline)
    users = pl.read_parquet(tables.table_path("user_behaviour", offline))
    assert {1, 7} <= set(users["user_id"].to_list())
    assert any(str(torn) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("missing", [True, False])
def test_no_event_log_directory_reads_the_events_alone(tmp_path, missing):
    offline = tiny_offline(tmp_path)
    if not missing:
        (offline / tables.EVENT_LOG).mkdir()
    assert tables.read_events(offline).height == 1


def interactions(stack, user: int) -> int | None:
    return stack.store.get_online_features(
        features=["user_behaviour:interactions_all"], entity_rows=[{"user_id": user}],
    ).to_dict()["interactions_all"][0]


def test_a_retried_batch_counts_once_even_after_a_restart(stack, service, client) -> None:
    """The same batch sent twice: the online rows change once and the log holds it once; a
    retry after a server restart (the ids read back from the event log) is dropped too."""
    from avrec.server.app import start
    from avrec.server.client import RankingClient
    from avrec.server.protocol import ranking_pb2
    from tests.server.conftest import serve_config, stack_env

    # a user of its own, and items no raw-read-versus-Feast oracle compares (an item row
    # written online here is newer than those oracles' replay clock)
    user, run = 40_100_000, uuid.uuid4().hex[:8]
    events = [ranking_pb2.Event(user_id=user, item_id=item, event_type="rating", rating=4.0,
                                event_id=f"{run}-{item}") for item in (6, 7, 8)]
    first = client.log_events(events)
    assert (first.accepted, first.duplicates) == (3, 0) and first.offline_path
    assert interactions(stack, user) == 3
    again = client.log_events(events)
    assert (again.accepted, again.duplicates, again.offline_path) == (0, 3, "")
    assert list(again.users_updated) == []
    assert interactions(stack, user) == 3
    # part new, part retried; an id repeated inside one batch counts once
    fresh = ranking_pb2.Event(user_id=user, item_id=9, event_type="tag", event_id=f"{run}-9")
    mixed = client.log_events([events[0], fresh, fresh])
    assert (mixed.accepted, mixed.duplicates) == (1, 2)
    assert interactions(stack, user) == 4
    # no event_id: never deduplicated
    bare = ranking_pb2.Event(user_id=user, item_id=10, event_type="tag")
    assert client.log_events([bare]).accepted == 1 and client.log_events([bare]).accepted == 1
    assert interactions(stack, user) == 6
    with pytest.raises(grpc.RpcError) as caught:
        client.log_events([ranking_pb2.Event(user_id=user, item_id=6, event_type="tag",
                                             event_id="x" * 129)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with stack_env(stack):
        restarted = start(serve_config(stack, hybrid=False))
    try:
        with RankingClient(f"127.0.0.1:{restarted.port}") as after:
            retry = after.log_events([*events, fresh])
    finally:
        restarted.stop(0)
    assert (retry.accepted, retry.duplicates) == (0, 4)
    assert interactions(stack, user) == 6
    logged = pl.concat([f.select(tables.EVENT_ID) for f in tables.read_event_log(
        stack.data_dir / "offline") if tables.EVENT_ID in f.columns])
    ids = logged[tables.EVENT_ID].drop_nulls().to_list()
    assert sorted(i for i in ids if i.startswith(run)) == sorted(
        [f"{run}-6", f"{run}-7", f"{run}-8", f"{run}-9"])
    mine = tables.read_events(stack.data_dir / "offline").filter(pl.col("user_id") == user)
    assert mine.height == 6  # what `avrec features` reads: each event once, the bare ones twice


class EventLoad(Load):  # its threads started and joined as Rank's in test_faults
    """Threads sending ``LogEvents`` batches with unique event ids until stopped or until a
    call fails; each call's batch and outcome (the status code name) is recorded."""

    def __init__(self, target: str, items: list[int], threads: int = 6, size: int = 5) -> None:
        self.target, self.items, self.size = target, items, size
        self.calls: list[tuple[list[object], str]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(t,)) for t in range(threads)]

    def batch(self, thread: int, n: int) -> list[object]:
        from avrec.server.protocol import ranking_pb2

        user = 42_000_000 + thread  # users of their own
        return [ranking_pb2.Event(user_id=user, item_id=self.items[(n * self.size + k) % len(
            self.items)], event_type="rating", rating=0.5 + (n + k) % 10 / 2,
            event_id=f"kill-{thread}-{n}-{k}") for k in range(self.size)]

    def run(self, thread: int) -> None:
        from avrec.server.client import RankingClient

        with RankingClient(self.target, timeout=10) as client:
            n = 0
            while not self.stop.is_set():
                events = self.batch(thread, n)
                try:
                    reply = client.log_events(events)
                    code = "OK" if reply.accepted == len(events) else "PARTIAL"
                except grpc.RpcError as error:
                    code = error.code().name
                self.calls.append((events, code))
                if code != "OK":  # the server is gone: this call was in flight at the kill
                    return
                n += 1

    def ok(self) -> int:
        return sum(code == "OK" for _, code in list(self.calls))


def start_server(data_dir: Path, stack, url: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """``avrec serve`` in a process of its own over ``data_dir``, serving when it returns."""
    from avrec.server.client import RankingClient
    from tests.conftest import free_port
    from tests.server.conftest import CLOCK, env_of

    port = free_port()
    env = env_of(stack) | {"AVREC_DATA_DIR": str(data_dir), "REDIS_URL": url}
    command = [sys.executable, "-m", "avrec.server.app", "--port", str(port), "--clock",
               CLOCK.isoformat(), "--model-dir", str(stack.model_dir), "--redis-url", url]
    with log_path.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    try:
        with RankingClient(target) as client:
            client.wait_until_serving(600, process)
    except (RuntimeError, TimeoutError):
        process.kill()
        raise AssertionError(log_path.read_text()[-3000:]) from None
    return process, target


def test_sigkill_under_load_loses_no_acknowledged_event(stack, tmp_path, caplog) -> None:
    """SIGKILL the server while LogEvents calls run on 6 threads; restart it. Every event of
    an acknowledged call is in the offline event log (read as ``avrec features`` reads it),
    each once; the restarted server starts over what the kill left (its journal segment, with
    a torn tail) and compacts it; retrying every batch then logs nothing twice."""
    from avrec import feature_store
    from avrec.redis_server import start_embedded
    from avrec.server.client import RankingClient
    from tests.conftest import free_port
    from tests.server.conftest import CLOCK, stack_env

    url = f"redis://127.0.0.1:{free_port()}/0"
    redis_pid = start_embedded(url, workdir=tmp_path / "redis")
    data_dir = tmp_path / "data"
    shutil.copytree(stack.data_dir / "offline", data_dir / "offline",
                    ignore=shutil.ignore_patterns(tables.EVENT_LOG))
    shutil.copy2(stack.data_dir / "registry.db", data_dir / "registry.db")
    offline = data_dir / "offline"
    log_dir = offline / tables.EVENT_LOG
    process = None
    try:
        with stack_env(stack, url):
            feature_store.materialize(start=datetime(1970, 1, 1, tzinfo=UTC), end=CLOCK,
                                      redis_url=url)
        process, target = start_server(data_dir, stack, url, tmp_path / "serve1.log")
        items = tables.read_table("items", offline)["item_id"][:300].to_list()
        with EventLoad(target, items) as load:
            deadline = time.monotonic() + 120
            while load.ok() < 40 and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGKILL)  # mid-load: calls are in flight
            answered = load.ok()
            process.wait(30)
            load.stop.set()
        calls = list(load.calls)
        codes = Counter(code for _, code in calls)
        acked = [e.event_id for events, code in calls if code == "OK" for e in events]
        assert len(acked) >= 40 * 5 and set(codes) <= {"OK", "UNAVAILABLE"}, codes
        leftovers = sorted(p.name for p in log_dir.glob("*.tmp"))
        # the killed server's open segment, nobody's now; with a torn tail as a crash
        # mid-append leaves one (the kill may or may not have made one)
        torn = sorted(log_dir.glob(f"*{event_journal.SUFFIX}"))[-1]
        with torn.open("ab") as out:
            never_sent = pl.DataFrame([(42_000_099, items[0], "rating", 3.0, NOW)],
                                      schema=tables.EVENTS_SCHEMA, orient="row")
            out.write(event_journal.encode(never_sent)[:-7])

        with caplog.at_level(logging.WARNING, logger="avrec.tables"):
            logged = tables.read_event_log(offline)  # what `avrec features` reads
            events = tables.read_events(offline)
        ids = pl.concat([f.select(tables.EVENT_ID) for f in logged])[tables.EVENT_ID].to_list()
        assert len(ids) == len(set(ids))  # nothing logged twice
        lost = set(acked) - set(ids)
        assert not lost, f"{len(lost)} acknowledged events lost"
        assert events.filter(pl.col("user_id") >= 42_000_000).height == len(ids)
        warned = [r.getMessage() for r in caplog.records]
        assert any(str(torn) in m for m in warned)
        assert all(any(name in m for m in warned) for name in leftovers)

        process, target = start_server(data_dir, stack, url, tmp_path / "serve2.log")
        retried = Counter()
        with RankingClient(target, timeout=60) as client:
            for batch, code in calls:
                reply = client.log_events(batch)
                retried[code, "accepted"] += reply.accepted
                retried[code, "duplicates"] += reply.duplicates
            assert client.rank(42_000_000, items[:20]).items
        assert retried["OK", "accepted"] == 0
        assert retried["OK", "duplicates"] == len(acked)
        after = tables.read_event_log(offline)
        final = pl.concat([f.select(tables.EVENT_ID) for f in after])[tables.EVENT_ID].to_list()
        sent = {e.event_id for batch, _ in calls for e in batch}
        assert len(final) == len(set(final)) and set(final) == sent  # each event once
        serve_log = (tmp_path / "serve2.log").read_text()
        assert "Traceback" not in serve_log and str(torn.name) in serve_log
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        # the orphan compacted at the start, the new server's segment at its stop
        assert not list(log_dir.glob(f"*{event_journal.SUFFIX}"))
        assert tables.event_ids(tables.read_event_log(offline)) == tables.event_ids(after)
        print(f"\nSIGKILL under LogEvents load (6 threads, 5 events a call): {len(calls)} "
              f"calls {dict(codes)} ({answered} answered when the kill was sent); "
              f"{len(acked)} events acknowledged, lost 0; {len(ids)} logged before the "
              f"restart ({len(ids) - len(acked)} of calls that got no answer); "
              f"{len(leftovers)} unfinished *.tmp left by the kill, "
              f"skipped; retries after the restart: {dict(retried)}")
    finally:
        if process is not None and process.poll() is None:
            process.kill()
        os.kill(redis_pid, signal.SIGTERM)
