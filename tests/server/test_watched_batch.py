"""``WatchedBatch`` on a real Redis: watched reads and writes in two round trips, a write in
between makes the commit refuse, and a batch left by an error leaves no watch behind."""

from __future__ import annotations

import uuid

import pytest
import redis

from avrec.server.watched_batch import WatchedBatch


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, single_connection_client=False)


def key() -> bytes:
    return f"test:watched:{uuid.uuid4().hex}".encode()


def test_reads_then_writes_and_counts_the_round_trips(client, monkeypatch) -> None:
    a, b = key(), key()
    client.hset(a, mapping={"s": b"1", "t": b"x"})
    sent = []
    with WatchedBatch(client) as batch:
        connection = batch._connection
        real = connection.send_packed_command
        monkeypatch.setattr(connection, "send_packed_command",
                            lambda *args, **kw: (sent.append(1), real(*args, **kw))[1])
        replies = batch.watch_and_read([a, b], [("HMGET", a, "s", "t"), ("HMGET", b, "s", "t")])
        assert replies == [[b"1", b"x"], [None, None]]
        assert batch.commit([("HSET", a, "s", b"2"), ("HSET", b, "s", b"3", "t", b"y")])
    assert len(sent) == 2
    assert client.hgetall(a) == {b"s": b"2", b"t": b"x"}
    assert client.hgetall(b) == {b"s": b"3", b"t": b"y"}


def test_a_write_in_between_makes_the_commit_refuse_then_a_redo_goes_through(client) -> None:
    a = key()
    client.hset(a, "s", b"1")
    with WatchedBatch(client) as batch:
        (seen,) = batch.watch_and_read([a], [("HGET", a, "s")])
        client.hset(a, "s", b"another writer")  # another connection
        assert not batch.commit([("HSET", a, "s", seen + b"+1")])
        assert client.hget(a, "s") == b"another writer"
        (seen,) = batch.watch_and_read([a], [("HGET", a, "s")])
        assert batch.commit([("HSET", a, "s", seen + b"+1")])
    assert client.hget(a, "s") == b"another writer+1"


def test_an_error_mid_batch_leaves_no_watch_on_the_pooled_connection(client) -> None:
    a, b = key(), key()
    client.set(b, b"a string, not a hash")
    with pytest.raises(RuntimeError), WatchedBatch(client) as batch:
        batch.watch_and_read([a], [("HGET", a, "s")])
        raise RuntimeError("the caller failed between the read and the commit")
    client.hset(a, "s", b"changed after that watch")
    with WatchedBatch(client) as batch:  # the pool's connection again, without the old watch
        batch.watch_and_read([b"unrelated"], [])
        assert batch.commit([("HSET", a, "s", b"mine")])
    assert client.hget(a, "s") == b"mine"
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"), WatchedBatch(client) as batch:
        batch.watch_and_read([b], [])
        batch.commit([("HSET", a, "s", b"x"), ("HSET", b, "s", b"y")])  # b is no hash
    assert client.ping()
