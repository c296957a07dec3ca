"""``avrec materialize --engine spark``: Feast's Spark compute engine writes the same online
store as Feast's local engine, key by key and byte by byte, on the real MovieLens tables."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from avrec import cli, config, feature_store, tables
from avrec.spark import materialize as spark_materialize

pytestmark = pytest.mark.slow  # a JVM: kept out of the inner loop

START = datetime(2018, 3, 1, tzinfo=UTC)  # a recent window: fewer rows, same semantics
CLOCK = datetime(2018, 9, 25, tzinfo=UTC)
VIEWS = ["user_behaviour", "item_behaviour", "user_history"]


def dump(url: str) -> dict[bytes, dict[bytes, bytes]]:
    """Every key of one Redis database: its hash fields, or its value."""
    client = redis.Redis.from_url(url)
    try:
        return {key: (client.hgetall(key) if client.type(key) == b"hash" else client.get(key))
                for key in client.scan_iter(count=1000)}
    finally:
        client.close()


def test_spark_engine_writes_what_the_local_engine_writes(
    spark: object, movielens_offline: Path, redis_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from feast import FeatureStore
    from feast.infra.compute_engines.spark.compute import SparkComputeEngine

    # A data directory (registry, intervals) of its own: the session's stays untouched.
    monkeypatch.setenv("AVREC_DATA_DIR", str(tmp_path))
    for name in VIEWS:
        tables.table_path(name, config.offline_dir()).parent.mkdir(exist_ok=True)
        shutil.copy(tables.table_path(name, movielens_offline),
                    tables.table_path(name, config.offline_dir()))
    base = redis_url.rsplit("/", 1)[0]
    local, spark_url = f"{base}/5", f"{base}/6"
    for url in (local, spark_url):
        redis.Redis.from_url(url).flushdb()
    feature_store.apply(local)
    feature_store.materialize(start=START, end=CLOCK, redis_url=local)
    assert cli.main(["--redis-url", spark_url, "materialize", "--engine", "spark",
                     "--start", START.isoformat(), "--end", CLOCK.isoformat()]) == 0
    engine = FeatureStore(repo_path=str(config.FEATURE_REPO),
                          config=spark_materialize.spark_repo_config(spark_url))
    assert isinstance(engine._get_provider().batch_engine, SparkComputeEngine)
    want, got = dump(local), dump(spark_url)
    assert len(want) > 1000  # users and items
    assert got.keys() == want.keys()
    differ = [key for key in want if got[key] != want[key]]
    assert not differ, f"{len(differ)} keys differ, e.g. {differ[:3]}"
