"""``avrec materialize --engine spark``: Feast's Spark compute engine writes to Redis.

The repo's ``feature_store.yaml`` is used as is, with one change: ``batch_engine`` becomes
Feast's ``spark.engine`` (``SparkComputeEngine``) on avrec's Spark session. Per view,
Feast then runs its materialization DAG on Spark: read the offline rows of
``[start, end]``, keep the latest per entity (row number over event and created time),
and write them to the online store from the executors (``mapInArrow``, one Redis client
per task), so the online store sees exactly the rows the local engine writes.

The read goes through the repo's offline store: with the DuckDB store over Parquet
``FileSource``\\ s (avrec's repo), DuckDB reads the rows on the driver and hands them to
Spark as Arrow; with Feast's Spark offline store (``SparkSource``) the read is distributed
too. Intervals and the materialization counter follow :func:`avrec.feature_store.materialize`.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from avrec import feature_store
from avrec.spark.session import REQUIRED_CONF, spark_master, spark_session

if TYPE_CHECKING:
    from feast import FeatureStore
    from feast.repo_config import RepoConfig


def spark_repo_config(redis_url: str | None = None, master: str | None = None,
                      partitions: int = 0) -> RepoConfig:
    """avrec's repo config with Feast's Spark compute engine as the batch engine.

    ``partitions`` (0: as read) is Feast's: the number of tasks writing to Redis.
    """
    spark_session(master)  # started here, so Feast's engine finds it active
    repo = feature_store.repo_config(redis_url)
    repo.batch_engine_config = {
        "type": "spark.engine",
        "spark_conf": {**REQUIRED_CONF, "spark.master": spark_master(master)},
        "partitions": partitions,
    }
    repo._batch_engine = None  # built lazily from batch_engine_config
    return repo


def materialize(
    end: datetime | None = None,
    start: datetime | None = None,
    views: list[str] | None = None,
    redis_url: str | None = None,
    master: str | None = None,
    partitions: int = 0,
) -> FeatureStore:
    """Load the latest offline row per entity with event time in ``[start, end]`` into the
    online store through Feast's Spark compute engine; incremental without ``start`` (from
    each view's last materialization, the epoch the first time). Bumps the counter."""
    from feast import FeatureStore

    from avrec import config

    store = FeatureStore(repo_path=str(config.FEATURE_REPO),
                         config=spark_repo_config(redis_url, master, partitions))
    return feature_store.materialize(end, start, views, redis_url, store=store)
