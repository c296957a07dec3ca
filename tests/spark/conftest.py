"""One Spark session for every Spark test: ``local[2]``, few shuffle partitions, no UI.

The tests skip, with the reason, where pyspark or Java is missing; with ``avrec[spark]`` and
Java 17 (this machine, CI) they run.
"""

from __future__ import annotations

from collections.abc import Iterator

import polars as pl
import pytest

from avrec.spark.session import missing_requirements, spark_session
from tests.test_pit_join import (  # noqa: F401  (the DuckDB tests' fixtures, shared)
    edge_labels,
    edge_repo,
    real_labels,
)

TEST_CONF = {
    "spark.sql.shuffle.partitions": "2",
    "spark.sql.adaptive.coalescePartitions.enabled": "true",
    "spark.ui.enabled": "false",
    "spark.driver.memory": "1g",
    "spark.python.worker.reuse": "true",
}


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    session = spark_session("local[2]", TEST_CONF)
    yield session
    session.stop()


def assert_same_rows(got: pl.DataFrame, want: pl.DataFrame, keys: list[str],
                     rel: float = 1e-9) -> None:
    """Same columns and dtypes; sorted by ``keys``, row by row: floats within ``rel``
    (relative), everything else (ids, times, lists) equal."""
    assert got.columns == want.columns
    assert got.schema == want.schema, (got.schema, want.schema)
    assert got.height == want.height
    got, want = got.sort(keys), want.sort(keys)
    for name, dtype in want.schema.items():
        a, b = got[name], want[name]
        if dtype.is_float() or (isinstance(dtype, pl.List) and dtype.inner.is_float()):
            if isinstance(dtype, pl.List):
                assert a.list.len().eq_missing(b.list.len()).all(), name
                a, b = a.explode(), b.explode()
            close = (a - b).abs() <= rel * b.abs()
            same = close.fill_null(False) | (a.is_null() & b.is_null())
        else:
            same = a.eq_missing(b)
        if not same.all():
            bad = (~same).arg_true()[:3].to_list()
            raise AssertionError(f"{name}: {(~same).sum()} rows differ, e.g. "
                                 f"got {a.gather(bad).to_list()} want {b.gather(bad).to_list()}")
