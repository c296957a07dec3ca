"""Benchmark training-set generation: Feast vs avrec's DuckDB PIT join vs a raw ASOF join.

Data: the real MovieLens (ml-latest-small) labels and behaviour tables, replicated for
larger sizes (replica ``r`` offsets user and item ids by ``r * 10**7`` and shifts every
timestamp of the replica by one random amount, so each replica is a time-shifted copy of
the real world), plus a synthetic 384-d float32 item embedding view (one version per
item). The Feast repo (ranker views cloned from ``feature_repo`` onto the scaled tables,
plus ``item_embedding``) lives in the bench's work directory; the real repo is untouched.

Every engine runs in a fresh subprocess, timed from labels read to Parquet written; peak
RSS is the worker's ``ru_maxrss`` (``import feast`` alone is ~0.6 GB of it). A guard
kills a worker past ``--mem-limit-gb`` or ``--timeout``. Engines:

* ``feast``: ``training_set.join_features_feast`` (``get_historical_features``) + write;
* ``avrec duckdb``: ``pit_join.write_training_set_duckdb`` (COPY ... TO Parquet);
* ``raw asof``: one plain ASOF LEFT JOIN per view, no dedupe, no TTL (the reference);
* ``... versioned``: the same two with the embedding as a version key (+ side table for
  avrec), compared with each other.

Inline engines run with DuckDB ``memory_limit`` ``--inline-memory`` (sorting 1M rows of
inline vectors needs it), versioned ones with ``--versioned-memory``. The 20k size exists
so that Feast finishes and its output can be compared with avrec's.

Usage: ``python bench/training_set_bench.py [--rows 20000 100000 1000000] [--skip-feast]``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import psutil

# Run against this clone's avrec, whatever clone the shared venv's editable install names.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avrec import config, tables

SERVICE = "ranker_features"
EMBEDDING_VIEW = "item_embedding"
EMBEDDING_DIM = 384
ID_OFFSET = 10**7
LABEL_WINDOW = (datetime(1990, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC))
EMBEDDING_TIME = datetime(1995, 1, 1, tzinfo=UTC)
ENGINES = ["feast", "avrec duckdb", "raw asof", "avrec duckdb versioned", "raw asof versioned"]


def build_base(work: Path) -> Path:
    """Ingest MovieLens and build the behaviour tables once under ``work/base``."""
    from avrec import behaviour_features
    from avrec.ingest_movielens import ingest_movielens

    base = work / "base"
    if not (base / "item_behaviour.parquet").exists():
        ml = config.datasets_dir() / "ml-latest-small"
        ingest_movielens(ml, base, config.datasets_dir() / "posters")
        behaviour_features.build(base)
    return base


def _shift(frame: pl.DataFrame, replica: int, shift: timedelta, columns: list[str]) -> pl.DataFrame:
    ids = [c for c in ("user_id", "item_id") if c in frame.columns]
    return frame.with_columns(
        *[pl.col(c) + replica * ID_OFFSET for c in ids],
        *[pl.col(c) + shift for c in columns],
    )


def _replicate(frame: pl.DataFrame, shifts: list[timedelta], columns: list[str]) -> pl.DataFrame:
    return pl.concat([_shift(frame, r, s, columns) for r, s in enumerate(shifts)])


def build_scale(base: Path, work: Path, replicas: int) -> Path:
    """Scaled feature tables, embeddings, all labels and a Feast repo under ``work/x<r>``."""
    from avrec import training_set

    out = work / f"x{replicas}"
    if (out / "registry.db").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(replicas)
    shifts = [timedelta(0)] + [
        timedelta(microseconds=int(rng.integers(1, 30 * 86_400 * 10**6)))
        for _ in range(replicas - 1)
    ]
    user = _replicate(tables.read_table("user_behaviour", base), shifts,
                      ["event_timestamp", "last_interaction_at"])
    item = _replicate(tables.read_table("item_behaviour", base), shifts,
                      ["event_timestamp", "first_interaction_at"])
    user.write_parquet(out / "user_behaviour.parquet")
    item.write_parquet(out / "item_behaviour.parquet")
    items = tables.read_table("items", base).select("item_id")
    emb = _replicate(items, shifts, [])
    vectors = rng.standard_normal((emb.height, EMBEDDING_DIM), dtype=np.float32)
    emb.with_columns(
        pl.lit(EMBEDDING_TIME).dt.cast_time_unit("us").alias("event_timestamp"),
        pl.lit(datetime.now(UTC)).dt.cast_time_unit("us").alias("created_timestamp"),
        pl.Series("embedding", vectors).cast(pl.List(pl.Float32)),
    ).write_parquet(out / "item_embedding.parquet")
    spec = training_set.TrainingSetSpec(*LABEL_WINDOW)
    events, item_table = tables.read_table("events", base), tables.read_table("items", base)
    labels = training_set.build_labels(events, item_table, spec)
    _replicate(labels, shifts, ["label_timestamp"]).write_parquet(out / "all_labels.parquet")
    apply_repo(out)
    return out


def open_store(scale_dir: Path):
    """The bench's FeatureStore on ``scale_dir`` (SQLite registry and online store)."""
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    repo = RepoConfig(
        project="avrec_bench",
        provider="local",
        registry={"registry_type": "sql", "path": f"sqlite:///{scale_dir / 'registry.db'}"},
        offline_store={"type": "duckdb"},
        online_store={"type": "sqlite", "path": str(scale_dir / "online.db")},
        entity_key_serialization_version=3,
    )
    return FeatureStore(config=repo)


def apply_repo(scale_dir: Path) -> None:
    """Register avrec's ranker views (cloned onto the scaled tables) plus the embedding."""
    from feast import FeatureService, FeatureView, Field, FileSource
    from feast.types import Array, Float32

    sys.path.insert(0, str(config.FEATURE_REPO))
    import entities
    import feature_views

    by_name = {e.name: e for e in (entities.user, entities.item)}

    def clone(view: FeatureView) -> FeatureView:
        source = FileSource(
            name=f"{view.name}_source",
            path=str(scale_dir / f"{view.name}.parquet"),
            timestamp_field="event_timestamp",
            created_timestamp_column="created_timestamp",
        )
        return FeatureView(name=view.name, entities=[by_name[e] for e in view.entities],
                           ttl=view.ttl, schema=view.schema, source=source, online=False)

    user, item = clone(feature_views.user_behaviour), clone(feature_views.item_behaviour)
    embedding = FeatureView(
        name=EMBEDDING_VIEW,
        entities=[entities.item],
        schema=[Field(name="embedding", dtype=Array(Float32))],
        source=FileSource(
            name="item_embedding_source",
            path=str(scale_dir / "item_embedding.parquet"),
            timestamp_field="event_timestamp",
            created_timestamp_column="created_timestamp",
        ),
        online=False,
    )
    service = FeatureService(name=SERVICE, features=[user, item, embedding])
    open_store(scale_dir).apply([entities.user, entities.item, user, item, embedding, service])


def labels_for(scale_dir: Path, rows: int) -> Path:
    """``rows`` labels sampled from the scaled label set, in the training-set order."""
    path = scale_dir / f"labels_{rows}.parquet"
    if not path.exists():
        labels = pl.read_parquet(scale_dir / "all_labels.parquet")
        labels.sample(min(rows, labels.height), seed=0).sort(
            ["label_timestamp", "user_id", "item_id"]
        ).write_parquet(path)
    return path


def raw_asof(
    labels: pl.DataFrame, scale_dir: Path, out: Path, memory_limit: str, versioned: bool
) -> None:
    """Reference: plain ASOF LEFT JOINs on the raw tables (no dedupe, no TTL), COPY TO."""
    import duckdb

    views = {
        "user_behaviour": "user_id",
        "item_behaviour": "item_id",
        EMBEDDING_VIEW: "item_id",
    }
    spill = tempfile.TemporaryDirectory(prefix="raw_asof_")
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(f"SET temp_directory = '{spill.name}'")
    con.register("labels", labels.with_row_index("__row").to_arrow())
    selects, joins = [], []
    for i, (view, key) in enumerate(views.items()):
        path = scale_dir / f"{view}.parquet"
        cols = [c for c in pl.read_parquet_schema(path)
                if c not in (key, "event_timestamp", "created_timestamp")]
        if versioned and view == EMBEDDING_VIEW:
            cols = ["event_timestamp"]
        selects += [f'v{i}."{c}" AS "{view}__{c}"' for c in cols]
        joins.append(
            f"ASOF LEFT JOIN read_parquet('{path}') v{i} "
            f"ON l.{key} = v{i}.{key} AND l.lookup >= v{i}.event_timestamp"
        )
    con.execute(
        "COPY (WITH l AS (SELECT *, label_timestamp - INTERVAL 1 MICROSECOND AS lookup "
        f"FROM labels) SELECT l.* EXCLUDE (__row, lookup), {', '.join(selects)} FROM l "
        f"{' '.join(joins)} ORDER BY l.__row) TO '{out}' (FORMAT parquet, COMPRESSION zstd)"
    )
    con.close()
    spill.cleanup()


def worker(engine: str, scale_dir: Path, labels_path: Path, out: Path, memory: str) -> None:
    """Run one engine and print its timing and peak RSS as JSON."""
    import feast  # noqa: F401  (imported before the clock starts: it costs seconds)

    from avrec import pit_join, training_set

    start = time.perf_counter()
    labels = pl.read_parquet(labels_path)
    versioned = engine.endswith("versioned")
    if engine.startswith("raw asof"):
        raw_asof(labels, scale_dir, out, memory, versioned)
    else:
        store = open_store(scale_dir)
        if engine == "feast":
            frame = training_set.join_features_feast(labels, store, SERVICE)
            training_set.write_training_set(frame, out)
        else:
            pit_join.write_training_set_duckdb(
                labels, store, SERVICE, out, memory_limit=memory,
                versioned_views=[EMBEDDING_VIEW] if versioned else [],
            )
    seconds = time.perf_counter() - start
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_gb": rss_kb / 2**20}))


@dataclass
class Result:
    """One row of the table."""

    rows: int
    engine: str
    seconds: float | None
    peak_gb: float | None
    note: str = ""


def run_engine(engine: str, scale_dir: Path, labels: Path, out: Path, args) -> Result:
    """Run ``engine`` in a fresh subprocess under the memory and time guard."""
    rows = pl.scan_parquet(labels).select(pl.len()).collect().item()
    memory = args.versioned_memory if engine.endswith("versioned") else args.inline_memory
    cmd = [sys.executable, __file__, "--worker", engine, "--scale-dir", str(scale_dir),
           "--labels", str(labels), "--out", str(out), "--memory", memory]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, peak, start, killed = psutil.Process(proc.pid), 0, time.monotonic(), ""
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        elapsed = time.monotonic() - start
        if peak > args.mem_limit_gb * 2**30:
            killed = f"killed by the {args.mem_limit_gb:g} GB RSS guard after {elapsed:.0f} s"
        elif elapsed > args.timeout:
            killed = f"killed by the {args.timeout:g} s guard"
        if killed:
            proc.kill()
            break
        time.sleep(0.05)
    stdout, stderr = proc.communicate()
    if killed:
        return Result(rows, engine, None, peak / 2**30, killed)
    if proc.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["?"]
        return Result(rows, engine, None, None, f"failed: {tail[0][:80]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    return Result(rows, engine, report["seconds"], report["peak_gb"])


def identical(a: Path, b: Path) -> bool:
    """Same columns, dtypes, row order and values (lists element by element)."""
    return pl.read_parquet(a).equals(pl.read_parquet(b), null_equal=True)


def restores_inline(versioned: Path, inline: Path) -> bool:
    """The versioned file joined with its side table equals the inline file."""
    from avrec import pit_join

    side = pl.read_parquet(pit_join.side_table_path(versioned, EMBEDDING_VIEW))
    train = pl.read_parquet(versioned)
    version = f"{EMBEDDING_VIEW}__event_timestamp"
    joined = train.join(side, on=["item_id", version], how="left", maintain_order="left")
    expected = pl.read_parquet(inline)
    return joined.select(expected.columns).equals(expected, null_equal=True)


def print_table(results: list[Result]) -> None:
    """The results as a fixed-width table; ratio against the matching raw ASOF reference."""
    raw = {(r.rows, r.engine): r.seconds for r in results if r.engine.startswith("raw")}
    print(f"{'rows':>9} {'engine':<24} {'seconds':>8} {'rows/s':>10} {'peak RSS':>9} "
          f"{'vs raw':>7}  note")
    for r in results:
        ref = raw.get((r.rows, "raw asof versioned" if "versioned" in r.engine else "raw asof"))
        secs = f"{r.seconds:8.2f}" if r.seconds else f"{'-':>8}"
        rate = f"{r.rows / r.seconds:10,.0f}" if r.seconds else f"{'-':>10}"
        peak = f"{r.peak_gb:7.2f}GB" if r.peak_gb else f"{'-':>9}"
        ratio = f"{r.seconds / ref:6.2f}x" if r.seconds and ref else f"{'-':>7}"
        print(f"{r.rows:>9,} {r.engine:<24} {secs} {rate} {peak} {ratio}  {r.note}")


def check(rows: int, results: list[Result], outs: dict[str, Path]) -> None:
    """Equality notes: avrec vs Feast, the versioned file + side table vs the inline file."""
    done = {r.engine: r for r in results if r.rows == rows and r.seconds}
    if "avrec duckdb" in done and "avrec duckdb versioned" in done:
        ok = restores_inline(outs["avrec duckdb versioned"], outs["avrec duckdb"])
        done["avrec duckdb versioned"].note = (
            "+ side table == inline" if ok else "SIDE TABLE MISMATCH"
        )
    if "feast" in done and "avrec duckdb" in done:
        same = identical(outs["feast"], outs["avrec duckdb"])
        done["avrec duckdb"].note = "identical to feast" if same else "DIFFERS FROM FEAST"


def main() -> None:
    """Prepare the data, run every engine per size, check equality, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 100_000, 1_000_000])
    parser.add_argument("--skip-feast", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep data here between runs (default: a temporary directory)")
    parser.add_argument("--mem-limit-gb", type=float, default=10.0,
                        help="kill a worker whose RSS exceeds this")
    parser.add_argument("--timeout", type=float, default=180.0, help="kill a worker after this")
    parser.add_argument("--inline-memory", default="2GB", help="DuckDB memory_limit, inline")
    parser.add_argument("--versioned-memory", default="800MB",
                        help="DuckDB memory_limit, versioned")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--scale-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--labels", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.scale_dir, args.labels, args.out, args.memory)
        return

    with tempfile.TemporaryDirectory(prefix="avrec_bench_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print("preparing MovieLens and scaled tables ...", file=sys.stderr, flush=True)
        base = build_base(work)
        base_labels = pl.scan_parquet(build_scale(base, work, 1) / "all_labels.parquet")
        per_replica = base_labels.select(pl.len()).collect().item()
        results: list[Result] = []
        feast_killed_at = None
        for rows in sorted(args.rows):
            scale_dir = build_scale(base, work, max(1, math.ceil(rows / per_replica)))
            labels = labels_for(scale_dir, rows)
            outs = {e: scale_dir / f"out_{rows}_{e.replace(' ', '_')}.parquet" for e in ENGINES}
            for engine in ENGINES:
                if engine == "feast" and (args.skip_feast or feast_killed_at):
                    if feast_killed_at:
                        note = f"not run: killed by a guard at {feast_killed_at:,} rows"
                        results.append(Result(rows, engine, None, None, note))
                    continue
                print(f"running {engine} on {rows:,} rows ...", file=sys.stderr, flush=True)
                results.append(run_engine(engine, scale_dir, labels, outs[engine], args))
                if engine == "feast" and results[-1].note.startswith("killed"):
                    feast_killed_at = rows
            check(rows, results, outs)
            for out in scale_dir.glob("out_*"):
                out.unlink()
        print_table(results)


if __name__ == "__main__":
    main()
