"""``InFlight`` on a real Redis: the replies a pipeline would give, read after other work; a
connection left with unread replies (early exit, error reply) never hands them to its next user."""

from __future__ import annotations

import uuid

import pytest
import redis

from avrec.server.in_flight import InFlight


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    # one connection in the pool: a stale reply left on it would meet the very next command
    return redis.Redis.from_url(redis_url, max_connections=1)


def key() -> bytes:
    return f"test:in-flight:{uuid.uuid4().hex}".encode()


def test_replies_equal_a_pipelines_and_arrive_while_the_caller_works(client) -> None:
    a, b = key(), key()
    client.hset(a, mapping={"s": b"1", "t": b"x"})
    client.set(b, b"7")
    commands = [("HMGET", a, "s", "t"), ("HMGET", key(), "s"), ("GET", b)]
    with client.pipeline(transaction=False) as pipe:
        for command in commands:
            pipe.execute_command(*command)
        expected = pipe.execute()
    with InFlight(client, commands) as read:
        assert client.connection_pool._created_connections == 1  # sent: its connection taken
        assert read.replies() == expected == [[b"1", b"x"], [None], b"7"]
        assert read.replies() is read.replies()  # read once
    assert client.get(b) == b"7"


def test_leaving_without_reading_leaves_no_reply_for_the_next_user(client) -> None:
    a, b = key(), key()
    client.set(a, b"from a")
    client.set(b, b"from b")
    with InFlight(client, [("GET", a)]):
        pass  # e.g. the candidates were refused meanwhile
    assert client.get(b) == b"from b"  # not a's stale reply
    with pytest.raises(ValueError), InFlight(client, [("GET", a)]):
        raise ValueError("the caller failed meanwhile")
    assert client.get(b) == b"from b"


def test_an_error_reply_raises_and_the_rest_is_not_left_behind(client) -> None:
    text, b, c = key(), key(), key()
    client.set(text, b"a string, not a hash")
    client.set(b, b"from b")
    client.set(c, b"from c")
    with InFlight(client, [("HMGET", text, "s"), ("GET", b)]) as read, \
            pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        read.replies()
    assert client.get(c) == b"from c"  # not the unread reply to GET b
