"""The data layer's own subcommands: light ``register_*`` functions with no heavy imports.

    avrec redis / ingest / features / apply / materialize / training-set / online

Each ``register_*`` adds its subparser to ``avrec`` (:func:`avrec.cli.build_parser` lists
them in :data:`REGISTERS`) and its ``cmd_*`` runs it, importing what it needs only then.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from avrec import config
from avrec.commands import Subparsers, parse_time
from avrec.names import (
    DEFAULT_TRAINING_SET_ENGINE,
    RANKER_FEATURES,
    TRAINING_SET_ENGINES,
    USER_BEHAVIOUR,
)


def cmd_redis(args: argparse.Namespace) -> int:
    from avrec.redis_server import ensure_redis

    if args.cluster or args.stop_cluster:
        return _redis_cluster(args)

    status = ensure_redis(args.redis_url)
    started = f"started embedded redis-server (pid {status.started_pid})"
    print(f"Redis answers at {status.url}" + (f"; {started}" if status.started_pid else ""))
    return 0


def _redis_cluster(args: argparse.Namespace) -> int:
    from avrec import redis_cluster

    if args.stop_cluster:
        for url in redis_cluster.stop_local_clusters():
            print(f"stopped {url}")
        return 0
    cluster = redis_cluster.start_cluster(
        masters=args.cluster, replicas=args.replicas, base_port=args.port,
        node_timeout_ms=args.node_timeout_ms)
    print(f"Redis Cluster of {args.cluster} masters x {1 + args.replicas} nodes "
          f"(pids {', '.join(map(str, cluster.pids.values()))}, files in {cluster.workdir})")
    print(f"use it with: export REDIS_URL='{cluster.url}'")
    print("stop it with: avrec redis --stop-cluster")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from avrec import ingest
    from avrec.ingest_movielens import ingest_movielens

    out = Path(args.out) if args.out else config.offline_dir()
    if args.events or args.items:
        if not (args.events and args.items):
            raise SystemExit("avrec ingest: --events and --items go together")
        report = ingest.ingest_generic(Path(args.events), Path(args.items), out)
    else:
        ml = Path(args.movielens) if args.movielens else config.datasets_dir() / "ml-latest-small"
        posters = Path(args.posters) if args.posters else config.datasets_dir() / "posters"
        report = ingest_movielens(ml, out, posters if posters.is_dir() else None)
    print(report.summary())
    print(f"offline tables in {out} (rejects: {out / 'rejects.parquet'})")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    offline = Path(args.offline) if args.offline else None
    if args.engine == "spark":
        from avrec.spark import behaviour_features as spark_features

        counts = spark_features.build(offline, args.as_of, master=args.spark_master)
    else:
        from avrec import behaviour_features

        counts = behaviour_features.build(offline, args.as_of)
    for name, rows in counts.items():
        print(f"{name}: {rows} rows")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from avrec import feature_store

    feature_store.apply(args.redis_url)
    return 0


def cmd_materialize(args: argparse.Namespace) -> int:
    if args.engine == "spark":
        from avrec.spark import materialize as spark_materialize

        spark_materialize.materialize(end=args.end, start=args.start, views=args.views or None,
                                      redis_url=args.redis_url, master=args.spark_master)
        return 0
    from avrec import feature_store

    feature_store.materialize(
        end=args.end, start=args.start, views=args.views or None, redis_url=args.redis_url
    )
    return 0


def cmd_training_set(args: argparse.Namespace) -> int:
    from avrec import training_set

    spec = training_set.TrainingSetSpec(
        start=args.start,
        end=args.end,
        negatives=args.negatives,
        sampling=args.sampling,
        positive_threshold=args.positive_threshold,
        explicit_negatives=not args.no_explicit_negatives,
        seed=args.seed,
        feature_service=args.feature_service,
    )
    frame = training_set.build_training_set(spec, engine=args.engine,
                                            spark_master=args.spark_master)
    path = training_set.write_training_set(frame, Path(args.out))
    counts = frame.group_by("sample_type").len().sort("sample_type").rows()
    print(f"wrote {frame.height} rows x {frame.width} columns to {path}")
    for sample_type, n in counts:
        print(f"  {sample_type}: {n}")
    return 0


def cmd_online(args: argparse.Namespace) -> int:
    import polars as pl

    from avrec import feature_store, online_features

    store = feature_store.get_store(args.redis_url)
    frame = online_features.read_view(store, args.view, args.ids, now=args.now)
    with pl.Config(tbl_cols=-1, tbl_width_chars=200, fmt_table_cell_list_len=5):
        print(frame)
    return 0


def _engine_options(p: argparse.ArgumentParser, engines: list[str], default: str,
                    text: str = "") -> None:
    p.add_argument("--engine", choices=engines, default=default, help=text or None)
    p.add_argument("--spark-master", default=None,
                   help="with --engine spark (default: $AVREC_SPARK_MASTER or local[2])")


def register_redis(sub: Subparsers) -> argparse.ArgumentParser:
    """``avrec redis``."""
    p = sub.add_parser("redis", help="make sure Redis answers, or start a local Redis Cluster")
    p.add_argument("--cluster", type=int, metavar="MASTERS", default=0,
                   help="start a local cluster of MASTERS masters on loopback, print its URL")
    p.add_argument("--replicas", type=int, default=1, help="replicas per master (default 1)")
    p.add_argument("--port", type=int, default=None,
                   help="first port of the cluster's nodes (default: a free range)")
    p.add_argument("--node-timeout-ms", type=int, default=5000,
                   help="cluster-node-timeout: how long a master may be silent before its "
                        "replica takes over (default 5000)")
    p.add_argument("--stop-cluster", action="store_true",
                   help="stop the local clusters started under the data directory")
    p.set_defaults(func=cmd_redis)
    return p


def register_ingest(sub: Subparsers) -> argparse.ArgumentParser:
    """``avrec ingest``."""
    p = sub.add_parser("ingest", help="raw data -> offline tables")
    p.add_argument("--movielens", help="MovieLens-latest directory (default: shared dataset)")
    p.add_argument("--posters", help="directory of <movieId>.jpg posters")
    p.add_argument("--events", help="generic events.csv (with --items)")
    p.add_argument("--items", help="generic items.csv (with --events)")
    p.add_argument("--out", help="offline directory (default: $AVREC_DATA_DIR/offline)")
    p.set_defaults(func=cmd_ingest)
    return p


def register_features(sub: Subparsers) -> argparse.ArgumentParser:
    """``avrec features``."""
    p = sub.add_parser("features", help="behaviour features -> offline tables")
    p.add_argument("--offline", help="offline directory")
    p.add_argument("--as-of", type=parse_time, default=None, help="last change point (default now)")
    _engine_options(p, ["polars", "spark"], "polars")
    p.set_defaults(func=cmd_features)
    return p


def register_apply(sub: Subparsers) -> argparse.ArgumentParser:
    """``avrec apply``."""
    p = sub.add_parser("apply", help="feast apply")
    p.set_defaults(func=cmd_apply)
    return p


def register_materialize(sub: Subparsers) -> argparse.ArgumentParser:
    """``avrec materialize``."""
    p = sub.add_parser("materialize", help="offline -> Redis")
    p.add_argument("--start", type=parse_time, help="default: incremental from last run")
    p.add_argument("--end", type=parse_time, help="default: now")
    p.add_argument("--views", nargs="*", help="feature views (default: all)")
    _engine_options(p, ["local", "spark"], "local",
                    "spark: Feast's Spark compute engine (batch_engine spark.engine)")
    p.set_defaults(func=cmd_materialize)
    return p


def register_training_set(sub: Subparsers) -> argparse.ArgumentParser:
    """``avrec training-set``."""
    p = sub.add_parser("training-set", help="point-in-time training set -> Parquet")
    p.add_argument("--start", type=parse_time, required=True)
    p.add_argument("--end", type=parse_time, required=True)
    p.add_argument("--negatives", type=int, default=4, help="sampled negatives per positive")
    p.add_argument("--sampling", choices=["uniform", "popularity"], default="uniform")
    p.add_argument("--positive-threshold", type=float, default=4.0)
    p.add_argument(
        "--no-explicit-negatives",
        action="store_true",
        help="drop ratings below the threshold instead of labelling them 0",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--feature-service", default=RANKER_FEATURES)
    _engine_options(p, list(TRAINING_SET_ENGINES), DEFAULT_TRAINING_SET_ENGINE,
                    "duckdb: native ASOF joins, identical values to feast, ~20x faster")
    p.add_argument("--out", required=True, help="output .parquet")
    p.set_defaults(func=cmd_training_set)
    return p


def register_online(sub: Subparsers) -> argparse.ArgumentParser:
    """``avrec online``."""
    p = sub.add_parser("online", help="a few entities' online features, TTL enforced")
    p.add_argument("ids", nargs="+", type=int)
    p.add_argument("--view", default=USER_BEHAVIOUR)
    p.add_argument("--now", type=parse_time, default=None, help="reader clock (default now)")
    p.set_defaults(func=cmd_online)
    return p


# in the order of ``avrec --help``
REGISTERS: tuple[Callable[[Subparsers], argparse.ArgumentParser], ...] = (
    register_redis, register_ingest, register_features, register_apply, register_materialize,
    register_training_set, register_online)
