"""The gRPC service over the session's serving stack (:mod:`tests.serving_stack`): the deep
ranker's (``service``) and the hybrid's (``hybrid_service``), started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serving_stack import CLOCK, Stack, env_of, serve_config, stack_env

__all__ = ["CLOCK", "current_snapshot", "env_of", "serve_config", "stack_env"]


@pytest.fixture(scope="session")
def service(stack: Stack) -> Iterator[object]:
    """The gRPC service on a free port, replay clock at CLOCK (env patched while it runs),
    serving the deep ranker (the hybrid has its own fixture, ``hybrid_service``)."""
    from server.app import start

    with stack_env(stack):
        running = start(serve_config(stack, hybrid=False))
    yield running
    running.stop(0)


@pytest.fixture(scope="session")
def hybrid_service(stack: Stack) -> Iterator[object]:
    """The gRPC service serving the model directory's hybrid ranker (the default)."""
    from server.app import start

    with stack_env(stack):
        running = start(serve_config(stack))
    yield running
    running.stop(0)


@pytest.fixture()
def client(service) -> Iterator[object]:
    from server.client import RankingClient

    with RankingClient(f"127.0.0.1:{service.port}") as c:
        yield c


def current_snapshot(service) -> None:
    """Bring the server's item snapshot up to Redis. ``LogEvents`` writes item rows online,
    which a server takes up at its next snapshot reload (``snapshot_refresh_seconds``, or a
    moved materialization counter); an oracle reading Feast's item rows needs them now."""
    engine = service.engine
    engine.client.incr(engine.version_key)  # as `avrec materialize` does
    engine.ensure_snapshot(engine.materialization(), engine.clock.now())  # starts the reload
    assert engine.wait_for_reload(120)
