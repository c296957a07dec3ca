"""Redis with a password and an ACL user (a redis-server the test starts on a free port):
Feast's materialization and reads, and the server's own raw reads, all authenticate from the
one ``REDIS_URL``; without or with wrong credentials nothing answers."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from avrec.redis_server import embedded_server_binary, ping
from server.client import RankingClient
from tests.conftest import free_port
from tests.server.conftest import CLOCK, serve_config, stack_env
from tests.server.test_faults import EPOCH
from tests.server.test_robustness import USER

USER_NAME, PASSWORD = "avrec", "p@ss:w0rd"  # "@" and ":" travel URL-encoded


@pytest.fixture()
def guarded_redis(tmp_path: Path):
    port = free_port()
    process = subprocess.Popen(
        [str(embedded_server_binary()), "--bind", "127.0.0.1", "--port", str(port),
         "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
         "--requirepass", "the-default-users-password",
         "--user", USER_NAME, "on", f">{PASSWORD}", "~*", "&*", "+@all"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://{USER_NAME}:p%40ss%3Aw0rd@127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not ping(url):
        assert time.monotonic() < deadline and process.poll() is None, "redis did not start"
        time.sleep(0.05)
    yield port, url
    process.terminate()
    process.wait(10)


def test_acl_user_and_password_reach_feast_and_the_server(stack, guarded_redis) -> None:
    from avrec import feature_store
    from server.app import start

    port, url = guarded_redis
    assert not ping(f"redis://127.0.0.1:{port}/0")  # no credentials
    assert not ping(f"redis://{USER_NAME}:wrong@127.0.0.1:{port}/0")
    with stack_env(stack, url):
        store = feature_store.materialize(start=EPOCH, end=CLOCK, redis_url=url)
        row = store.get_online_features(features=["user_behaviour:interactions_all"],
                                        entity_rows=[{"user_id": USER}]).to_dict()
        assert row["interactions_all"][0] > 0
        service = start(serve_config(stack, redis_url=url))
    try:
        with RankingClient(f"127.0.0.1:{service.port}") as client:
            answer = client.rank(USER, [1, 2, 3])
            assert answer.items and not answer.cold_start_user
            assert client.serving()
    finally:
        service.stop(0)
