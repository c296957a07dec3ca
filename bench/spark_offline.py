"""Benchmark the Spark offline engines against the single-machine ones.

Two jobs, each engine in a fresh subprocess, timed from inputs read to Parquet written;
peak memory is the largest RSS of the worker's whole process tree, sampled every 50 ms
(Spark's JVM is a child of the Python driver, so it counts):

* **behaviour features** on MovieLens ml-latest-small (``--feature-replicas`` copies of
  its events, ids offset per copy): ``avrec.behaviour_features`` (polars) vs
  ``avrec.spark.behaviour_features`` (Spark);
* **a training set** of ``--rows`` labels (1M by default) over the user and item behaviour
  views, built as ``bench/training_set_bench.py`` builds its scaled tables:
  ``pit_join.write_training_set_duckdb`` vs ``avrec.spark.pit_join.write_training_set_spark``
  (avrec's as-of join on Spark) vs, with ``--feast-spark``, Feast's own Spark offline store
  (``get_historical_features`` over ``SparkSource`` sources on the same Parquet files, its own
  registry) plus the label join of ``training_set.join_features_feast``.

Spark runs on ``--spark-master`` (default ``local[2]``), JVM start included (a session is
started once per job in production too). The outputs of both engines are compared.

Usage: ``python bench/spark_offline.py [--rows 1000000] [--feature-replicas 1]
[--workdir DIR] [--spark-master local[2]]``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training_set_bench import ID_OFFSET, build_base, build_scale, labels_for, open_store

from avrec import tables

AS_OF = datetime(2018, 9, 25, tzinfo=UTC)
CREATED = datetime(2018, 9, 26, tzinfo=UTC)
SERVICE = "behaviour_only"
FEATURE_TABLES = ["user_behaviour", "item_behaviour", "user_history"]


def feature_input(base: Path, work: Path, replicas: int) -> Path:
    """``replicas`` copies of the MovieLens events and items (ids offset per copy)."""
    out = work / f"features_x{replicas}"
    if not (out / "events.parquet").exists():
        out.mkdir(parents=True, exist_ok=True)
        for name in ("events", "items"):
            frame = tables.read_table(name, base)
            ids = [c for c in ("user_id", "item_id") if c in frame.columns]
            pl.concat([frame.with_columns(pl.col(c) + r * ID_OFFSET for c in ids)
                       for r in range(replicas)]).write_parquet(tables.table_path(name, out))
    return out


def apply_service(scale_dir: Path) -> None:
    """The user and item behaviour views of the bench repo as one service."""
    from feast import FeatureService

    store = open_store(scale_dir)
    views = [store.get_feature_view(v) for v in ("user_behaviour", "item_behaviour")]
    store.apply([FeatureService(name=SERVICE, features=views)])


def feast_spark_store(scale_dir: Path, master: str):
    """The bench's behaviour views over ``SparkSource`` sources: Feast's Spark offline store."""
    from feast import FeatureService, FeatureStore, FeatureView
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import (
        SparkSource,
    )
    from feast.repo_config import RepoConfig

    from avrec import config
    from avrec.spark.session import REQUIRED_CONF

    sys.path.insert(0, str(config.FEATURE_REPO))
    import entities
    import feature_views

    root = scale_dir / "feast_spark"
    root.mkdir(exist_ok=True)
    store = FeatureStore(config=RepoConfig(
        project="avrec_bench_spark",
        provider="local",
        registry={"registry_type": "sql", "path": f"sqlite:///{root / 'registry.db'}"},
        offline_store={"type": "spark", "spark_conf": {
            **REQUIRED_CONF, "spark.master": master, "spark.ui.enabled": "false",
            "spark.sql.shuffle.partitions": "4", "spark.driver.memory": "2g"}},
        online_store={"type": "sqlite", "path": str(root / "online.db")},
        entity_key_serialization_version=3,
    ))
    views = [FeatureView(
        name=view.name, entities=[getattr(entities, e) for e in view.entities], ttl=view.ttl,
        schema=view.schema, online=False,
        source=SparkSource(name=f"{view.name}_spark", path=str(scale_dir / f"{view.name}.parquet"),
                           file_format="parquet", timestamp_field="event_timestamp",
                           created_timestamp_column="created_timestamp"),
    ) for view in (feature_views.user_behaviour, feature_views.item_behaviour)]
    store.apply([entities.user, entities.item, *views,
                 FeatureService(name=SERVICE, features=views)])
    return store


def worker(job: str, engine: str, data: Path, labels: Path | None, out: Path,
           master: str) -> None:
    """Run one job on one engine; print its seconds as JSON."""
    start = time.perf_counter()
    if job == "features" and engine == "polars":
        from avrec import behaviour_features as bf

        built = bf.compute(tables.read_events(data), tables.read_table("items", data),
                           as_of=AS_OF, created=CREATED)
        bf.write(built, out)
    elif job == "features":
        from avrec.spark import behaviour_features as sbf

        sbf.build(data, as_of=AS_OF, master=master, out_dir=out, created=CREATED)
    else:
        assert labels is not None
        frame = pl.read_parquet(labels)
        store = open_store(data)
        if engine == "duckdb":
            from avrec import pit_join

            pit_join.write_training_set_duckdb(frame, store, SERVICE, out / "train.parquet")
        elif engine == "feast-spark":
            import polars.selectors as cs

            from avrec import training_set

            store = feast_spark_store(data, master)
            job = store.get_historical_features(
                entity_df=training_set.entity_frame(frame),
                features=store.get_feature_service(SERVICE), full_feature_names=True)
            got = pl.from_arrow(job.to_arrow())
            assert isinstance(got, pl.DataFrame)
            # Feast's Spark store returns its times naive (UTC) in ns: back to avrec's type.
            got = got.with_columns(cs.datetime().dt.replace_time_zone(None)
                                   .dt.replace_time_zone("UTC").dt.cast_time_unit("us"))
            got = got.with_columns(pl.col("event_timestamp") + training_set.FEATURE_LAG).rename(
                {"event_timestamp": "label_timestamp"})
            joined = frame.join(got, on=["user_id", "item_id", "label_timestamp"], how="left",
                                maintain_order="left")
            training_set.write_training_set(training_set._derive_ages(joined),
                                            out / "train.parquet")
        else:
            from avrec.spark import pit_join as spark_pit

            spark_pit.write_training_set_spark(frame, store, SERVICE, out / "train.parquet",
                                               master=master)
    print(json.dumps({"seconds": time.perf_counter() - start}))


def run(job: str, engine: str, data: Path, labels: Path | None, out: Path,
        master: str) -> tuple[float, float]:
    """(seconds, peak GB of the process tree) of one worker."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--worker", job, engine, "--data", str(data),
           "--out", str(out), "--spark-master", master]
    if labels is not None:
        cmd += ["--labels", str(labels)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        print(f"{job} on {engine} failed:\n{stderr[-3000:]}", file=sys.stderr)
        return math.nan, peak / 2**30
    return json.loads(stdout.strip().splitlines()[-1])["seconds"], peak / 2**30


def same_rows(a: Path, b: Path, keys: list[str]) -> bool:
    """Equal after sorting by ``keys``, floats within 1e-9 relative (lists element-wise)."""
    from tests.spark.conftest import assert_same_rows

    try:
        assert_same_rows(pl.read_parquet(a).sort(keys), pl.read_parquet(b).sort(keys), keys)
    except AssertionError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="training-set labels")
    parser.add_argument("--feature-replicas", type=int, default=1)
    parser.add_argument("--spark-master", default="local[2]")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--feast-spark", action="store_true",
                        help="also Feast's Spark offline store for the training set")
    parser.add_argument("--skip-features", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--labels", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.data, args.labels, args.out, args.spark_master)
        return
    with tempfile.TemporaryDirectory(prefix="avrec_spark_bench_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("preparing MovieLens and scaled tables ...", file=sys.stderr, flush=True)
        base = build_base(work)
        rows: list[tuple[str, str, float, float, str]] = []

        data = feature_input(base, work, args.feature_replicas)
        events = pl.scan_parquet(tables.table_path("events", data)).select(pl.len()).collect()
        job = f"features, {events.item():,} events"
        outs = {}
        for engine in () if args.skip_features else ("polars", "spark"):
            print(f"running {job} on {engine} ...", file=sys.stderr, flush=True)
            outs[engine] = work / f"features_{engine}"
            rows.append((job, engine, *run("features", engine, data, None, outs[engine],
                                          args.spark_master), ""))
        if rows:
            same = all(same_rows(tables.table_path(t, outs["spark"]),
                                 tables.table_path(t, outs["polars"]),
                                 ["user_id" if t != "item_behaviour" else "item_id",
                                  *(["event_timestamp"] if t != "user_history" else [])])
                       for t in FEATURE_TABLES)
            rows[-1] = (*rows[-1][:4], "equal to polars" if same else "DIFFERS FROM POLARS")

        per_replica = pl.scan_parquet(build_scale(base, work, 1) / "all_labels.parquet").select(
            pl.len()).collect().item()
        scale_dir = build_scale(base, work, max(1, math.ceil(args.rows / per_replica)))
        apply_service(scale_dir)
        labels = labels_for(scale_dir, args.rows)
        job = f"training set, {args.rows:,} rows"
        engines = ["duckdb", "spark", *(["feast-spark"] if args.feast_spark else [])]
        first = len(rows)
        for engine in engines:
            print(f"running {job} on {engine} ...", file=sys.stderr, flush=True)
            outs[engine] = work / f"train_{engine}"
            rows.append((job, engine, *run("training-set", engine, scale_dir, labels,
                                          outs[engine], args.spark_master), ""))
            if engine != "duckdb" and (outs[engine] / "train.parquet").exists():
                same = pl.read_parquet(outs[engine] / "train.parquet").equals(
                    pl.read_parquet(outs["duckdb"] / "train.parquet"), null_equal=True)
                rows[-1] = (*rows[-1][:4],
                            "identical to duckdb" if same else "DIFFERS FROM DUCKDB")

        print(f"\nSpark master: {args.spark_master}\n")
        print("| job | engine | seconds | peak memory | Spark / single machine | note |")
        print("| --- | --- | ---: | ---: | ---: | --- |")
        for i, (job, engine, seconds, peak, note) in enumerate(rows):
            single = rows[0 if i < first else first][2]
            ratio = f"{seconds / single:.1f}x" if engine not in ("polars", "duckdb") else ""
            print(f"| {job} | {engine} | {seconds:.1f} | {peak:.2f} GB | {ratio} | {note} |")


if __name__ == "__main__":
    main()
