"""Redis bootstrap: URL conversion, starting the embedded server, refusing remote hosts."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from avrec import redis_server

from .conftest import free_port


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://127.0.0.1:6379/0", "127.0.0.1:6379,db=0"),
        ("redis://localhost:7000", "localhost:7000,db=0"),
        ("redis://:s3cret@10.1.2.3:6380/2", "10.1.2.3:6380,db=2,password=s3cret"),
        ("rediss://cache.example:6390/1", "cache.example:6390,db=1,ssl=true"),
    ],
)
def test_feast_connection_string(url: str, expected: str) -> None:
    assert redis_server.feast_connection_string(url) == expected


def test_not_a_redis_url() -> None:
    with pytest.raises(ValueError, match="not a redis://"):
        redis_server.feast_connection_string("http://127.0.0.1:6379")


def test_ensure_redis_starts_embedded_server_when_none_answers(tmp_path: Path, monkeypatch) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setenv("AVREC_DATA_DIR", str(tmp_path))
    assert not redis_server.ping(url)
    status = redis_server.ensure_redis(url)
    try:
        assert status.started_pid and status.started_pid > 0
        assert redis_server.ping(url)
        again = redis_server.ensure_redis(url)
        assert again.started_pid is None  # already answering: nothing started twice
    finally:
        os.kill(status.started_pid, signal.SIGTERM)


def test_never_starts_a_server_for_a_remote_url() -> None:
    # start_embedded refuses before any connection is attempted (no traffic leaves loopback).
    with pytest.raises(redis_server.StoreUnavailableError, match="loopback"):
        redis_server.start_embedded("redis://192.0.2.1:6379/0")


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://avrec:p%40ss%3Aw0rd@127.0.0.1:6390/1",
         "127.0.0.1:6390,db=1,username=avrec,password=p@ss:w0rd"),
        ("rediss://avrec:pw@cache.example:6390/0",
         "cache.example:6390,db=0,username=avrec,password=pw,ssl=true"),
        ("rediss://h:1/0?ssl_ca_certs=%2Fetc%2Fca.pem&ssl_check_hostname=1&socket_timeout=2",
         "h:1,db=0,ssl=true,ssl_ca_certs=/etc/ca.pem,ssl_check_hostname=true"),
    ],
)
def test_acl_user_and_url_encoded_password(url: str, expected: str) -> None:
    assert redis_server.feast_connection_string(url) == expected


@pytest.mark.parametrize("password", ["a%2Cb", "true", "null", "1e3", "-0", "%5B1%5D"])
def test_passwords_feast_cannot_carry_are_refused(password: str) -> None:
    with pytest.raises(ValueError, match="cannot go into Feast's connection string"):
        redis_server.feast_connection_string(f"redis://:{password}@127.0.0.1:6379/0")
