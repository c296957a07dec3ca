"""The Spark session of avrec's offline jobs, and single-file Parquet output.

The master comes from ``--spark-master``, else ``$AVREC_SPARK_MASTER``, else ``local[2]``;
a real cluster is ``spark://host:7077``, ``yarn`` or ``k8s://...``. Timestamps are UTC
and written as Parquet ``TIMESTAMP_MICROS``, so the tables read back exactly as the
polars and DuckDB engines write them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from avrec.errors import InputError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

DEFAULT_MASTER = "local[2]"
MASTER_ENV = "AVREC_SPARK_MASTER"
# What avrec needs of every session, whatever the master (a user's spark-defaults may
# add executors, memory, ...).
REQUIRED_CONF: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}
# Defaults for any master: the jobs hash-partition by entity once and join on (entity, time)
# without a second shuffle.
DEFAULT_CONF: dict[str, str] = {
    "spark.sql.requireAllClusterKeysForCoPartition": "false",
}
# Defaults for a small local master: few shuffle partitions, no UI.
LOCAL_CONF: dict[str, str] = {
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "2",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "2g",
}


def spark_master(master: str | None = None) -> str:
    """``master``, else ``$AVREC_SPARK_MASTER``, else ``local[2]``."""
    return master or os.environ.get(MASTER_ENV) or DEFAULT_MASTER


def missing_requirements() -> str | None:
    """Why Spark cannot run here (no pyspark, no Java), or None when it can."""
    if importlib.util.find_spec("pyspark") is None:
        return "pyspark is not installed (pip install 'avrec[spark]')"
    java_home = os.environ.get("JAVA_HOME")
    if not shutil.which("java") and not (java_home and Path(java_home, "bin", "java").exists()):
        return "no Java runtime (Spark 4 needs Java 17 or newer)"
    return None


def spark_session(master: str | None = None, conf: dict[str, str] | None = None) -> SparkSession:
    """The (shared) session on ``spark_master(master)``; ``conf`` overrides the defaults."""
    reason = missing_requirements()
    if reason:
        raise InputError(f"the Spark engine cannot run: {reason}")
    from pyspark.sql import SparkSession

    master = spark_master(master)
    local = master.startswith("local")
    settings = {**DEFAULT_CONF, **(LOCAL_CONF if local else {}), **REQUIRED_CONF}
    if local:  # the local workers run this interpreter (its pyarrow), not the first
        # `python3` on PATH: the venv need not be activated
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.master(master).appName("avrec")
    for key, value in {**settings, **(conf or {})}.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    for key, value in REQUIRED_CONF.items():  # a session started elsewhere gets them too
        session.conf.set(key, value)
    return session


def write_parquet(frame: DataFrame, path: Path, sort: list[str], drop: list[str] = ()) -> int:
    """Write ``frame`` sorted by ``sort`` (then without the ``drop`` columns) as one Parquet
    file at ``path`` (atomic rename), the layout the Feast sources and the single-machine
    engines read; the row count.

    One file means one final task: fine for feature tables of a few GB. Beyond, point the
    Feast source at a directory of parts instead.
    """
    import pyarrow.parquet as pq

    path = Path(path)
    staging = path.with_name(path.name + ".spark-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    frame.repartition(1).sortWithinPartitions(*sort).drop(*drop).write.parquet(str(staging))
    [part] = staging.glob("part-*.parquet")
    tmp = path.with_suffix(path.suffix + ".tmp")
    shutil.move(part, tmp)
    shutil.rmtree(staging, ignore_errors=True)
    tmp.replace(path)
    return pq.read_metadata(path).num_rows
