"""The service under failure: Redis going away and coming back, auth and TLS, a serving-only
process without torch, graceful shutdown, and a model that does not match the online store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avrec.online_features import MixedVersionsError
from avrec.server.client import RankingClient
from avrec.server.protocol import SERVICE_NAME
from tests.conftest import free_port
from tests.server.conftest import CLOCK, env_of, serve_config, stack_env

USER = 414


def health_status(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5).status


def test_redis_down_gives_unavailable_then_recovers(stack, tmp_path: Path) -> None:
    from avrec import feature_store
    from avrec.redis_server import start_embedded
    from avrec.server.app import start

    url = f"redis://127.0.0.1:{free_port()}/0"
    pid = start_embedded(url, workdir=tmp_path / "redis")
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    with stack_env(stack, url):
        feature_store.materialize(start=epoch, end=CLOCK, redis_url=url)
        service = start(serve_config(stack, redis_url=url, redis_timeout_seconds=0.5))
    try:
        with RankingClient(f"127.0.0.1:{service.port}") as client:
            assert client.rank(USER, [1, 2, 3]).items
            os.kill(pid, signal.SIGTERM)
            time.sleep(0.5)
            for _ in range(3):  # stays up, answers UNAVAILABLE every time
                with pytest.raises(grpc.RpcError) as caught:
                    client.rank(USER, [1, 2, 3])
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "unreachable" in caught.value.details()
            assert health_status(service.port) == health_pb2.HealthCheckResponse.NOT_SERVING
            pid = start_embedded(url, workdir=tmp_path / "redis")  # empty, as after a crash
            with stack_env(stack, url):
                feature_store.materialize(start=epoch, end=CLOCK, redis_url=url)
            answer = client.rank(USER, [1, 2, 3])
            assert answer.items and not answer.cold_start_user
            assert health_status(service.port) == health_pb2.HealthCheckResponse.SERVING
    finally:
        service.stop(0)
        os.kill(pid, signal.SIGTERM)


def self_signed(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return key, cert


def test_tls_and_bearer_token(stack, tmp_path: Path) -> None:
    from avrec.server.app import start

    key, cert = self_signed(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    metrics_port = free_port()
    with stack_env(stack):
        service = start(serve_config(stack, tls_cert=str(cert), tls_key=str(key),
                                     auth_token_file=str(token_file), metrics_port=metrics_port))
    target = f"127.0.0.1:{service.port}"
    try:
        with RankingClient(target, "s3cret", cert.read_bytes()) as client:
            assert client.rank(USER, [1, 2, 3]).items
            assert client.serving()
        for token in (None, "wrong"):
            with RankingClient(target, token, cert.read_bytes()) as client:
                with pytest.raises(grpc.RpcError) as caught:
                    client.rank(USER, [1, 2, 3])
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert client.serving()  # health stays open to probes
        with RankingClient(target, "s3cret") as plaintext, pytest.raises(grpc.RpcError):
            plaintext.rank(USER, [1, 2, 3], timeout=2)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as reply:
            text = reply.read().decode()
        assert 'avrec_requests_total{code="UNAUTHENTICATED",method="auth"}' in text
        assert "avrec_request_seconds_bucket" in text
    finally:
        service.stop(0)


BLOCKED_MAIN = textwrap.dedent("""
    import importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "transformers", "torchvision"):
                raise ModuleNotFoundError(f"{name} is blocked in this serving-only process")
            return None

    sys.meta_path.insert(0, Blocked())
    from avrec.server.app import main
    rc = main(sys.argv[1:])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
    print("heavy modules:", heavy, flush=True)
    sys.exit(rc)
""")


def test_serves_without_torch_and_stops_gracefully(stack) -> None:
    port = free_port()
    command = [sys.executable, "-c", BLOCKED_MAIN, "--port", str(port), "--clock",
               CLOCK.isoformat(), "--model-dir", str(stack.model_dir),
               "--redis-url", stack.redis_url]
    process = subprocess.Popen(command, env=env_of(stack), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        with RankingClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(180)
            assert client.rank(USER, [1, 2, 3, 50], top_k=2).items
            assert client.recommend(USER, top_k=5).items
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "listening on" in output and "stopping" in output
    assert "heavy modules: []" in output


def test_refuses_to_start_when_online_embeddings_do_not_match_the_model(stack) -> None:
    from avrec.server.app import start

    empty_db = stack.redis_url.rsplit("/", 1)[0] + "/2"
    with stack_env(stack, empty_db), pytest.raises(MixedVersionsError) as caught:
        start(serve_config(stack, redis_url=empty_db))
    assert "test-genre-v1" in str(caught.value) and "None" in str(caught.value)
