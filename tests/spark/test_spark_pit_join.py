"""The Spark point-in-time join equals the DuckDB engine (itself equal to Feast and to a
brute-force oracle, ``tests/test_pit_join.py``) row by row: hand-built edge cases (TTL
boundaries, created-time ties, aliases, a label at the instant of its own event) and a
sample of real MovieLens labels, in label order, label convention included."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import polars as pl
import pytest

from avrec import cli, pit_join
from avrec import training_set as ts
from avrec.spark import pit_join as spark_pit
from tests.test_pit_join import REAL_SPEC, T0, assert_identical

pytestmark = pytest.mark.slow  # a JVM: kept out of the inner loop


@pytest.mark.parametrize("service", ["edge", "behaviour"])
def test_edge_cases_equal_duckdb(spark, edge_repo, edge_labels, service) -> None:
    labels = edge_labels.reverse()  # label order must survive the shuffles
    if service == "behaviour":
        spec = ts.TrainingSetSpec(start=T0 - timedelta(days=1), end=T0 + timedelta(days=30),
                                  negatives=0, feature_service="behaviour")
        labels = ts.label_events(edge_repo.events, spec)
    want = pit_join.join_features_duckdb(labels, edge_repo.store, service)
    assert_identical(spark_pit.join_features_spark(labels, edge_repo.store, service), want)


def test_label_never_sees_its_own_event(spark, edge_repo) -> None:
    spec = ts.TrainingSetSpec(start=T0 - timedelta(days=1), end=T0 + timedelta(days=30),
                              negatives=0, feature_service="behaviour")
    got = spark_pit.join_features_spark(ts.label_events(edge_repo.events, spec),
                                        edge_repo.store, "behaviour")
    by_label = {(r["user_id"], r["item_id"]): r for r in got.iter_rows(named=True)}
    assert by_label[(7, 100)]["user_behaviour__interactions_all"] is None  # first ever
    assert by_label[(7, 101)]["user_behaviour__recent_items"] == [100]  # not itself
    assert by_label[(7, 101)]["days_since_last_interaction"] == pytest.approx(3 / 24)


def test_alias_join_key_map(spark, edge_repo, edge_labels) -> None:
    labels = edge_labels.with_columns(other_item=pl.col("item_id").reverse())
    want = pit_join.join_features_duckdb(labels, edge_repo.store, "aliased")
    assert_identical(spark_pit.join_features_spark(labels, edge_repo.store, "aliased"), want)


def test_real_data_equal_duckdb(spark, real_labels, feature_store, tmp_path: Path) -> None:
    service = REAL_SPEC.feature_service
    want = pit_join.join_features_duckdb(real_labels, feature_store, service)
    rows = spark_pit.write_training_set_spark(real_labels, feature_store, service,
                                              tmp_path / "train.parquet")
    assert rows == real_labels.height
    assert_identical(pl.read_parquet(tmp_path / "train.parquet"), want)


def test_cli_training_set_engine_spark(spark, feature_store, tmp_path: Path) -> None:
    """``build_training_set(engine="spark")``: labels, negatives, the in-memory join."""
    args = ["training-set", "--start", "2018-01-01", "--end", "2018-04-01", "--negatives", "2",
            "--feature-service", "behaviour_features", "--out"]
    assert cli.main([*args, str(tmp_path / "s.parquet"), "--engine", "spark"]) == 0
    assert cli.main([*args, str(tmp_path / "d.parquet"), "--engine", "duckdb"]) == 0
    got, want = (pl.read_parquet(tmp_path / f) for f in ("s.parquet", "d.parquet"))
    assert want.height > 100
    assert_identical(got, want)
    assert set(got["sample_type"]) == {"positive", "explicit_negative", "sampled_negative"}
