"""Point-in-time feature joins on Spark, with the semantics of :mod:`avrec.pit_join`.

:func:`join_features_spark` is a drop-in for ``pit_join.join_features_duckdb``: same
columns, names, dtypes, row order and values. Per feature view, an *as-of join as a
window*: the labels (at their lookup time, ``label_timestamp - 1 µs``) and the view's
feature rows are stacked, partitioned by the join keys and ordered by time, feature rows
before labels at the same instant and, among feature rows tied on event time, by created
time (a missing one first); each label takes the last feature row before it
(``last(..., ignorenulls)``). That is one shuffle and one sort per view, it streams, and it
scales with the keys: no range join, no Python. Then, as in DuckDB:

* with a TTL, the view's features are null when ``lookup - feature_ts > ttl``;
* labels without a row get nulls;
* ``days_since_last_interaction`` and ``item_age_days`` are derived as
  ``pit_join.DERIVED_AGES`` says, with the same double arithmetic.

The views are read from the Feast registry (:func:`avrec.pit_join.plan_views`), so only
Parquet ``FileSource`` views are supported, as there.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from avrec.names import DAY_US
from avrec.pit_join import DERIVED_AGES, LABEL_TIME, ViewPlan, _check_labels, plan_views
from avrec.spark.session import spark_session, write_parquet
from avrec.training_set import FEATURE_LAG

if TYPE_CHECKING:
    from feast import FeatureStore
    from pyspark.sql import DataFrame, SparkSession

_ROW = "__row"
_LOOKUP = "__lookup"  # microseconds
_TIME = "__time"  # microseconds: lookup time (labels) or event time (feature rows)
_KIND = "__kind"  # 0: feature row, 1: label (a label sees the rows at its own instant)
_CREATED = "__created"
_FOUND = "__found"
_MIN_LONG = -(2**63)


def _us(column: str):
    from pyspark.sql import functions as F

    return F.unix_micros(F.col(column).cast("timestamp"))


def _feature_rows(spark: SparkSession, plan: ViewPlan) -> DataFrame:
    """The view's rows: join keys (named as the labels name them), time, created time and
    the features packed in one struct column (``__found``), never null."""
    from pyspark.sql import functions as F

    frame = spark.read.parquet(plan.path)
    created = (F.coalesce(_us(plan.source(plan.created_field)), F.lit(_MIN_LONG))
               if plan.created_field else F.lit(_MIN_LONG))
    ts = _us(plan.source(plan.timestamp_field))
    found = F.struct(ts.alias(_TIME), *[F.col(plan.source(f)).alias(f"{plan.prefix}__{f}")
                                        for f in plan.features])
    return frame.where(ts.isNotNull()).select(
        *[F.col(plan.source(key)).alias(label) for key, label in plan.key_map.items()],
        ts.alias(_TIME), F.lit(0).alias(_KIND), created.alias(_CREATED), found.alias(_FOUND))


def _join_view(spark: SparkSession, labels: DataFrame, plan: ViewPlan) -> DataFrame:
    """``labels`` plus the view's columns as of each label's lookup time."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rows = _feature_rows(spark, plan)
    stacked = labels.withColumns({_TIME: F.col(_LOOKUP), _KIND: F.lit(1),
                                  _CREATED: F.lit(_MIN_LONG)}).unionByName(
        rows, allowMissingColumns=True)
    before = (Window.partitionBy(*plan.key_map.values()).orderBy(_TIME, _KIND, _CREATED)
              .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    joined = (stacked.withColumn(_FOUND, F.last(_FOUND, ignorenulls=True).over(before))
              .where(F.col(_KIND) == 1))
    fresh = F.lit(True)
    if plan.ttl is not None:
        ttl_us = plan.ttl // timedelta(microseconds=1)
        fresh = F.col(_LOOKUP) - F.col(f"{_FOUND}.{_TIME}") <= ttl_us
    columns = {f"{plan.prefix}__{f}": F.when(fresh, F.col(f"{_FOUND}.{plan.prefix}__{f}"))
               for f in plan.features}
    return joined.withColumns(columns).drop(_TIME, _KIND, _CREATED, _FOUND)


def features_frame(spark: SparkSession, labels: DataFrame, plans: list[ViewPlan]) -> DataFrame:
    """``labels`` (with ``__row``) joined to every view, then the derived ages; lazy."""
    from pyspark.sql import functions as F

    lag_us = FEATURE_LAG // timedelta(microseconds=1)
    frame = labels.withColumn(_LOOKUP, _us(LABEL_TIME) - lag_us)
    for plan in plans:
        frame = _join_view(spark, frame, plan)
    for age, source in DERIVED_AGES.items():
        if source in frame.columns:
            since = (_us(LABEL_TIME) - _us(source)).cast("double")
            frame = frame.withColumn(age, since * F.lit(1 / DAY_US))
    return frame.drop(_LOOKUP)


def _labels_frame(spark: SparkSession, labels: pl.DataFrame) -> DataFrame:
    return spark.createDataFrame(labels.with_row_index(_ROW).with_columns(
        pl.col(_ROW).cast(pl.Int64)).to_arrow())


def join_features_spark(
    labels: pl.DataFrame, store: FeatureStore, service: str, master: str | None = None,
) -> pl.DataFrame:
    """Features of ``service`` as of each label, in label order (cf.
    ``pit_join.join_features_duckdb``): the labels, then ``<view>__<feature>`` per view in
    the service's order, then the derived ages."""
    plans = plan_views(store, service)
    _check_labels(labels, plans)
    spark = spark_session(master)
    keys = sorted({LABEL_TIME} | {c for p in plans for c in p.key_map.values()})
    frame = features_frame(spark, _labels_frame(spark, labels.select(keys)), plans)
    produced = [c for c in frame.columns if c not in keys and c != _ROW]
    table = frame.orderBy(_ROW).select(*produced).toArrow()
    features = pl.from_arrow(table)
    assert isinstance(features, pl.DataFrame)
    return pl.concat([labels, features], how="horizontal")


def write_training_set_spark(
    labels: pl.DataFrame, store: FeatureStore, service: str, path: Path,
    master: str | None = None,
) -> int:
    """Write the training set from Spark to one Parquet file in label order (the rows never
    pass through Python); the row count. Same columns as :func:`join_features_spark`."""
    plans = plan_views(store, service)
    _check_labels(labels, plans)
    spark = spark_session(master)
    frame = features_frame(spark, _labels_frame(spark, labels), plans)
    return write_parquet(frame, Path(path), [_ROW], drop=[_ROW])
