"""The gRPC service over the session's serving stack (:mod:`tests.serving_stack`): the deep
ranker's (``service``) and the hybrid's (``hybrid_service``), started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serving_stack import CLOCK, Stack, env_of, serve_config, stack_env

__all__ = ["CLOCK", "current_snapshot", "env_of", "serve_config", "stack_env"]


def running(stack: Stack, **overrides: object) -> Iterator[object]:
    """A started service on ``stack`` (env patched while it starts), stopped afterwards."""
    from avrec.server.app import start

    with stack_env(stack):
        service = start(serve_config(stack, **overrides))
    yield service
    service.stop(0)


@pytest.fixture(scope="session")
def service(stack: Stack) -> Iterator[object]:
    """The gRPC service on a free port, replay clock at CLOCK (env patched while it runs),
    serving the deep ranker (the hybrid has its own fixture, ``hybrid_service``)."""
    yield from running(stack, hybrid=False)


@pytest.fixture(scope="session")
def hybrid_service(stack: Stack) -> Iterator[object]:
    """The gRPC service serving the model directory's hybrid ranker (the default)."""
    yield from running(stack)


@pytest.fixture(scope="session")
def cluster_service(cluster_stack: Stack) -> Iterator[object]:
    """``service`` (the deep ranker) on the Redis Cluster's copy of the stack."""
    yield from running(cluster_stack, hybrid=False)


@pytest.fixture(scope="session")
def cluster_hybrid_service(cluster_stack: Stack) -> Iterator[object]:
    """``hybrid_service`` on the Redis Cluster's copy of the stack."""
    yield from running(cluster_stack)


ONLINE_STORES = ("redis", "redis_cluster")


def on_store(request: pytest.FixtureRequest, service: str | None) -> tuple[Stack, object]:
    """``(stack, <service>)`` for the store of ``request.param``: the session's fixtures for a
    single Redis, their ``cluster_`` twins for the Redis Cluster (None: no service)."""
    prefix = "" if request.param == "redis" else "cluster_"
    stack = request.getfixturevalue(f"{prefix}stack")
    return stack, request.getfixturevalue(f"{prefix}{service}") if service else None


@pytest.fixture(params=ONLINE_STORES)
def online_stack(request: pytest.FixtureRequest) -> Stack:
    """The serving stack on a single Redis, then on the Redis Cluster (parity tests run on
    both)."""
    return on_store(request, None)[0]


@pytest.fixture(params=ONLINE_STORES)
def online_service(request: pytest.FixtureRequest) -> tuple[Stack, object]:
    """``(stack, service)`` on a single Redis, then on the Redis Cluster."""
    return on_store(request, "service")


@pytest.fixture(params=ONLINE_STORES)
def online_hybrid(request: pytest.FixtureRequest) -> tuple[Stack, object]:
    """``(stack, hybrid_service)`` on a single Redis, then on the Redis Cluster."""
    return on_store(request, "hybrid_service")


@pytest.fixture()
def client(service) -> Iterator[object]:
    from avrec.server.client import RankingClient

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
