"""The serving stack for real, once per test session, shared by ``tests/server`` and
``tests/web`` (``tests/conftest.py`` registers the ``stack`` fixture): MovieLens in its own
data directory, Feast apply + materialize into its own Redis database, a small ranker trained
and exported by ``avrec train``; the suites start the gRPC service on it.

Item vectors are a seeded genre projection (the server treats any vectors alike; encoders have
their own tests), so the fixture costs seconds, not the minutes of the real encoders.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from avrec import behaviour_features, config, tables
from avrec.ingest_movielens import ingest_movielens

CLOCK = datetime(2018, 9, 25, tzinfo=UTC)
# The wall time at which every test server's replay clock reads CLOCK: the servers of one session
# share one replay timeline, so a row one of them writes is never "from the future" to another.
CLOCK_ANCHOR = time.time()
EMBEDDING_VERSION = "test-genre-v1"
VECTOR_DIM = 24


@dataclass
class Stack:
    data_dir: Path
    redis_url: str
    model_dir: Path
    store: object


def genre_embeddings(items: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """An item_embeddings table: seeded genre projection + noise, every 11th item without."""
    vocabulary = behaviour_features.genre_vocabulary(items)
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(len(vocabulary), VECTOR_DIM))
    vectors = []
    for i, genres in enumerate(items["genres"].to_list()):
        onehot = np.zeros(len(vocabulary))
        for genre in genres or []:
            onehot[vocabulary.index(genre)] = 1.0
        vector = onehot @ projection + 0.3 * rng.normal(size=VECTOR_DIM)
        vectors.append(None if i % 11 == 0 else vector.astype(np.float32).tolist())
    return pl.DataFrame({
        "item_id": items["item_id"],
        "event_timestamp": pl.Series([datetime(2017, 1, 1, tzinfo=UTC)] * items.height),
        "embedding": pl.Series(vectors, dtype=pl.List(pl.Float32)),
        "embedding_asum": pl.Series(vectors, dtype=pl.List(pl.Float32)),
        "has_image": pl.Series([False] * items.height),
        "embedding_version": pl.Series([EMBEDDING_VERSION] * items.height),
    }).with_columns(
        pl.col("event_timestamp").cast(tables.TS),
        pl.col("event_timestamp").cast(tables.TS).alias("created_timestamp"),
    )


@pytest.fixture(scope="session")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Data, online store and a trained model, under their own AVREC_DATA_DIR and Redis db 1."""
    from avrec import feature_store
    from avrec.ranker import train_job
    from avrec.ranker.training import TrainConfig

    data_dir = tmp_path_factory.mktemp("serving")
    url = redis_url.rsplit("/", 1)[0] + "/1"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVREC_DATA_DIR", str(data_dir))
        patch.setenv("REDIS_URL", url)
        offline = config.offline_dir()
        datasets = config.datasets_dir()
        ingest_movielens(datasets / "ml-latest-small", offline)
        behaviour_features.build(offline)
        items = tables.read_table("items", offline)
        genre_embeddings(items).write_parquet(tables.table_path("item_embeddings", offline))
        feature_store.apply(url)
        store = feature_store.materialize(end=CLOCK, redis_url=url)
        model_dir = train_job.train(
            vectors="mixed",
            start=datetime(2018, 1, 1, tzinfo=UTC),
            train_config=TrainConfig(epochs=2, negatives=2, progress=False),
            hybrid_quick=True,
        )
    yield Stack(data_dir, url, model_dir, store)


@pytest.fixture(scope="session")
def cluster_stack(stack: Stack, redis_cluster, tmp_path_factory: pytest.TempPathFactory
                  ) -> Stack:
    """The stack's data and model on the session's Redis Cluster: a copy of its offline
    tables (without events logged by tests) under a data directory of its own, applied and
    materialized into the cluster as of CLOCK."""
    import shutil

    from avrec import feature_store

    data_dir = tmp_path_factory.mktemp("serving-cluster")
    shutil.copytree(stack.data_dir / "offline", data_dir / "offline",
                    ignore=shutil.ignore_patterns(tables.EVENT_LOG))
    url = redis_cluster.url
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVREC_DATA_DIR", str(data_dir))
        patch.setenv("REDIS_URL", url)
        feature_store.apply(url)
        store = feature_store.materialize(end=CLOCK, redis_url=url)
    return Stack(data_dir, url, stack.model_dir, store)


def env_of(stack: Stack) -> dict[str, str]:
    """The process environment pointing at the stack (for subprocesses)."""
    return {**os.environ, "AVREC_DATA_DIR": str(stack.data_dir), "REDIS_URL": stack.redis_url}


@contextlib.contextmanager
def stack_env(stack: Stack, redis_url: str | None = None) -> Iterator[None]:
    """AVREC_DATA_DIR and REDIS_URL of the stack, for code that reads them (start, materialize)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AVREC_DATA_DIR", str(stack.data_dir))
        patch.setenv("REDIS_URL", redis_url or stack.redis_url)
        yield


def serve_config(stack: Stack, **overrides: object):
    """The test service's settings: free port, replay clock, the stack's model and Redis."""
    from avrec.server.config import load_config

    settings = {
        "port": 0, "clock": CLOCK.isoformat(), "clock_anchor": CLOCK_ANCHOR,
        "model_dir": str(stack.model_dir),
        "redis_url": stack.redis_url, "max_candidates": 1200,
    }
    return load_config(None, settings | overrides, environ={})
