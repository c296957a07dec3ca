"""Feast repo: apply + materialize into a real Redis, read back, TTL enforced on reads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import polars as pl
import pytest
import redis

from avrec import config, online_features, tables
from avrec.redis_server import feast_connection_string

REPLAY_NOW = datetime(2018, 9, 25, tzinfo=UTC)  # MovieLens ends 2018-09-24


def test_materialized_rows_equal_latest_offline_rows(feature_store, movielens_offline) -> None:
    offline = tables.read_table("user_behaviour", movielens_offline)
    users = [1, 2, 414, 599, 610]
    online = online_features.read_view(feature_store, "user_behaviour", users, now=REPLAY_NOW)
    for row in online.iter_rows(named=True):
        latest = offline.filter(pl.col("user_id") == row["user_id"]).sort("event_timestamp")
        latest = latest.row(-1, named=True)
        assert row["event_timestamp"] == latest["event_timestamp"]
        fresh = REPLAY_NOW - latest["event_timestamp"] <= timedelta(days=730)
        assert row["fresh"] is fresh
        if fresh:
            assert row["interactions_all"] == latest["interactions_all"]
            assert row["recent_items"] == latest["recent_items"]
            assert row["genre_affinity"] == pytest.approx(latest["genre_affinity"], rel=1e-6)
    assert online["fresh"].any()


def test_unknown_entity_reads_as_absent(feature_store) -> None:
    frame = online_features.read_view(feature_store, "item_behaviour", [10**12], now=REPLAY_NOW)
    row = frame.row(0, named=True)
    assert row["fresh"] is False and row["event_timestamp"] is None
    assert row["popularity_all"] is None


def small_store(
    tmp_path: Path,
    redis_url: str,
    project: str,
    key: str,
    view_name: str,
    ttl: timedelta,
    fields: list,
    first_row: dict,
):
    """A one-view Feast repo of its own project on the session's real Redis."""
    from feast import Entity, FeatureStore, FeatureView, FileSource, ValueType
    from feast.repo_config import RepoConfig

    source = tmp_path / f"{view_name}.parquet"
    pd.DataFrame({key: [1], **first_row, "event_timestamp": [REPLAY_NOW]}).to_parquet(source)
    store = FeatureStore(
        config=RepoConfig(
            project=project,
            provider="local",
            registry={"registry_type": "sql", "path": f"sqlite:///{tmp_path / 'registry.db'}"},
            offline_store={"type": "duckdb"},
            online_store={"type": "redis", "connection_string": feast_connection_string(redis_url)},
            entity_key_serialization_version=3,
        )
    )
    entity = Entity(name=key.removesuffix("_id"), join_keys=[key], value_type=ValueType.INT64)
    view = FeatureView(
        name=view_name,
        entities=[entity],
        ttl=ttl,
        schema=fields,
        source=FileSource(path=str(source), timestamp_field="event_timestamp"),
    )
    store.apply([entity, view])
    return store


@pytest.fixture()
def ttl_store(tmp_path: Path, redis_url: str):
    """A tiny repo with a 2-day TTL view, on the real Redis, under its own project."""
    from feast import Field
    from feast.types import Int64

    fields = [Field(name="score", dtype=Int64)]
    return small_store(
        tmp_path,
        redis_url,
        "ttl_test",
        "user_id",
        "scores",
        timedelta(days=2),
        fields,
        {"score": [0]},
    )


def test_online_ttl_is_enforced_by_avrec_reader(ttl_store) -> None:
    now = datetime.now(UTC)
    ttl_store.write_to_online_store(
        "scores",
        pd.DataFrame(
            {
                "user_id": [1, 2],
                "score": [10, 20],
                "event_timestamp": [now - timedelta(days=8), now - timedelta(days=1)],
            }
        ),
    )
    feast_answer = ttl_store.get_online_features(
        features=["scores:score"], entity_rows=[{"user_id": 1}, {"user_id": 2}]
    ).to_dict()
    assert feast_answer["score"] == [10, 20]  # Feast serves the 8-day-old row under a 2-day TTL

    ours = online_features.read_view(ttl_store, "scores", [1, 2], now=now)
    assert ours["score"].to_list() == [None, 20]
    assert ours["fresh"].to_list() == [False, True]
    assert ours["event_timestamp"][0] == pytest.approx(
        now - timedelta(days=8), abs=timedelta(milliseconds=1)
    )
    two_days = now - timedelta(days=2)
    assert online_features.read_view(ttl_store, "scores", [2], now=two_days + timedelta(days=1))[
        "fresh"
    ].to_list() == [True]


def test_feast_cli_apply_and_materialize(tmp_path: Path, movielens_offline, redis_url) -> None:
    """`cd feature_repo && feast apply && feast materialize-incremental` as Feast users run it."""
    repo = tmp_path / "feature_repo"
    shutil.copytree(config.FEATURE_REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "data").mkdir()  # a clone has data/ (tracked, contents ignored)
    db = 3
    yaml = (
        (repo / "feature_store.yaml")
        .read_text()
        .replace(
            '"127.0.0.1:6379,db=0"',
            f'"{feast_connection_string(redis_url).replace(",db=0", "")},db={db}"',
        )
    )
    (repo / "feature_store.yaml").write_text(yaml)
    feast = [str(Path(sys.executable).with_name("feast"))]
    run = {"cwd": repo, "capture_output": True, "text": True, "timeout": 300}
    applied = subprocess.run([*feast, "apply"], **run)
    assert applied.returncode == 0, applied.stderr[-2000:]
    assert (tmp_path / "data" / "registry.db").exists()  # ../data relative to the repo
    done = subprocess.run(
        [
            *feast,
            "materialize",
            "1990-01-01T00:00:00",
            REPLAY_NOW.strftime("%Y-%m-%dT%H:%M:%S"),
            "--views",
            "user_behaviour",
            "--views",
            "item_behaviour",
        ],  # no embeddings in this test
        **run,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{db}")
    users = tables.read_table("user_behaviour", movielens_offline)["user_id"].n_unique()
    items = tables.read_table("item_behaviour", movielens_offline)["item_id"].n_unique()
    assert client.dbsize() == users + items


def test_item_embeddings_of_two_versions_are_refused(tmp_path: Path, redis_url: str) -> None:
    from feast import Field
    from feast.types import Array, Float32, String

    fields = [
        Field(name="embedding", dtype=Array(Float32)),
        Field(name="embedding_version", dtype=String),
    ]
    store = small_store(
        tmp_path,
        redis_url,
        "versions_test",
        "item_id",
        "item_embedding",
        timedelta(days=3650),
        fields,
        {"embedding": [[0.0]], "embedding_version": ["a"]},
    )
    now = datetime.now(UTC)
    rows = pd.DataFrame(
        {
            "item_id": [1, 2],
            "embedding": [[0.1, 0.2], [0.3, 0.4]],
            "embedding_version": ["v1", "v1"],
            "event_timestamp": [now, now],
        }
    )
    store.write_to_online_store("item_embedding", rows)
    same = online_features.read_item_embeddings(store, [1, 2], now=now)
    assert same["embedding_version"].to_list() == ["v1", "v1"]
    newer = rows.iloc[[0]].assign(
        embedding_version="v2", event_timestamp=now + timedelta(seconds=1)
    )
    store.write_to_online_store("item_embedding", newer)  # a re-materialization half done
    with pytest.raises(online_features.MixedVersionsError, match="v1"):
        online_features.read_item_embeddings(store, [1, 2], now=now + timedelta(seconds=2))
