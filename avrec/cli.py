"""The ``avrec`` command line: one subcommand per step of the pipeline.

    avrec redis                       make sure Redis answers (start the embedded one if not)
    avrec redis --cluster 3           start a local Redis Cluster (3 masters + 3 replicas)
    avrec ingest                      raw catalogue + events -> offline Parquet tables
    avrec features                    behaviour features (user, item) -> offline tables
    avrec apply                       feast apply on feature_repo/, from any directory
    avrec materialize                 offline -> Redis (incremental, or --start/--end)
    avrec training-set                point-in-time training set -> Parquet
    avrec online                      read a user's online features (TTL enforced)
    avrec embed / neighbours / fuse   item encoders and the mixed embedding (encoders/)
    avrec train / evaluate            the ranker and its offline evaluation (ranker/)
    avrec serve / recommend           the gRPC ranking service and a client of it (server/)
    avrec web                         the web page, a client of the service (web/)
    avrec demo                        all of the above on the embedded default dataset

Heavy imports (feast, torch) happen inside the subcommands, so ``avrec --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

from avrec import commands, config
from avrec.commands import Subparsers, parse_time, subparsers, top_parser
from avrec.names import BEHAVIOUR_FEATURES, ITEM_EMBEDDINGS_TABLE, RANKER_FEATURES, USER_BEHAVIOUR


def _step(name: str) -> Callable[[], None]:
    started = time.perf_counter()
    print(f"==> {name}", flush=True)
    return lambda: print(f"    {name}: {time.perf_counter() - started:.1f} s", flush=True)


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


# The jobs of the other packages: subcommand -> (module with ``register(subparsers)``, its
# line in ``avrec --help``). A module is imported only when its subcommand is run.
JOBS: dict[str, tuple[str, str]] = {
    "embed": ("encoders.embed_job", "item text and poster encodings -> offline table"),
    "neighbours": ("encoders.neighbours", "nearest neighbours of a few items, genre agreement"),
    "fuse": ("encoders.mixed_job", "the mixed item embedding (gated fusion) -> offline table"),
    "train": ("ranker.train_job", "train the rankers, export to ONNX -> data/models"),
    "evaluate": ("ranker.evaluation", "offline evaluation on temporal splits -> a report"),
    "serve": ("server.app", "the gRPC ranking service"),
    "recommend": ("server.client", "ask the ranking service (Recommend, or Rank)"),
    "web": ("web.serve", "the web page, a client of the ranking service"),
}


def job_module(name: str) -> ModuleType:
    """The module of job ``name``, with the extras to install when its imports fail."""
    try:
        return importlib.import_module(JOBS[name][0])
    except ModuleNotFoundError as exc:
        extra = "web" if name == "web" else "train"
        raise SystemExit(f"avrec {name}: {exc} (install the extras: .[{extra}])") from exc


def run_job(name: str, argv: list[str]) -> None:
    """``avrec NAME ARGV...`` from another job (the demo); stops it when the job fails."""
    code = job_module(name).main(argv)
    if code:
        raise SystemExit(code)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: the whole pipeline on MovieLens ml-latest-small."""
    from avrec import behaviour_features, feature_store, tables, training_set
    from avrec.ingest_movielens import ingest_movielens
    from avrec.redis_server import ensure_redis

    replay_now = datetime(2018, 9, 25, tzinfo=UTC)  # the dataset ends 2018-09-24
    done = _step("redis")
    status = ensure_redis(args.redis_url)
    print(f"    Redis at {status.url}" + (" (embedded, started now)" if status.started_pid else ""))
    done()
    done = _step("ingest MovieLens ml-latest-small + posters")
    datasets = config.datasets_dir()
    report = ingest_movielens(
        datasets / "ml-latest-small", config.offline_dir(), datasets / "posters"
    )
    print("    " + report.summary().replace("\n", "\n    "))
    done()
    done = _step("behaviour features")
    print(f"    {behaviour_features.build()}")
    done()
    embeddings = not args.skip_embed and _has("encoders.mixed_job")
    if embeddings:
        done = _step("item encodings: MiniLM text + EfficientNet-Lite0 posters, ONNX")
        run_job("embed", ["--no-progress"])
        done()
        done = _step("mixed item embeddings: weighted sum and learned (gated) fusion")
        # Fusion learns from co-consumption: trained on events before the training set's
        # window and stamped at that cutoff, so no label sees vectors built from its future.
        run_job("fuse", ["--cutoff", "2017-01-01"])
        done()
    done = _step("feast apply + materialize into Redis (as of the replay clock)")
    feature_store.apply(status.url)
    feature_store.reset_online(feature_store.get_store(status.url), status.url)
    feature_store.materialize(start=feature_store.EPOCH, end=replay_now, redis_url=status.url)
    done()
    with_vectors = tables.table_path(ITEM_EMBEDDINGS_TABLE).exists()
    service = RANKER_FEATURES if with_vectors else BEHAVIOUR_FEATURES
    done = _step(f"point-in-time training set 2017-01-01 .. 2018-01-01 ({service})")
    spec = training_set.TrainingSetSpec(
        start=datetime(2017, 1, 1, tzinfo=UTC),
        end=datetime(2018, 1, 1, tzinfo=UTC),
        negatives=4,
        feature_service=service,
    )
    frame = training_set.build_training_set(spec, engine=args.engine)
    out = training_set.write_training_set(
        frame, config.data_dir() / "training_sets" / "demo.parquet"
    )
    print(f"    {frame.height} rows x {frame.width} columns -> {out}")
    done()
    if embeddings:
        done = _step("nearest neighbours of a few films (text, image, mixed)")
        mixed = f"mixed={tables.table_path('item_embeddings')}:embedding"
        run_job("neighbours", ["--source", mixed])
        done()
    print("==> online features from Redis (reader clock 2018-09-25, TTL enforced)")
    cmd_online(
        argparse.Namespace(
            redis_url=status.url, view=USER_BEHAVIOUR, ids=[1, 414, 610], now=replay_now
        )
    )
    if not embeddings:
        return 0
    done = _step("train the hybrid ranker (served), the deep ranker and the retrieval towers, "
                 "export to ONNX")
    run_job("train", ["--epochs", "4", "--no-progress", "--hybrid-grids", "quick"])
    done()
    done = _step("evaluate: full ranking, per-user temporal split, quick grids: baselines "
                 "and the served hybrid pipeline")
    run_job("evaluate", ["--models", "popularity,itemknn,als,ease,served",
                               "--split", "per-user", "--quick",
                               "--out", str(config.data_dir() / "reports" / "demo")])
    done()
    done = _step("ranking service: avrec serve (gRPC) + a client call")
    _demo_service(status.url, replay_now, args.port)
    done()
    done = _step("web page: avrec web (a client of the service)")
    _demo_web(args.port, args.web_port)
    done()
    return 0


def _start_background(name: str, arguments: list[str]):
    """``avrec NAME ARGUMENTS`` in the background, replacing the one an earlier demo started
    (``data/NAME.pid``), its output in ``data/NAME.log``: (process, log)."""
    import signal
    import subprocess

    pid_file = config.data_dir() / f"{name}.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
            time.sleep(2)
    log = config.data_dir() / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "avrec.cli", name, *arguments],
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(process.pid))
    return process, log


def _demo_service(redis_url: str, clock: datetime, port: int) -> None:
    """Start ``avrec serve`` in the background (replacing an earlier demo server), wait until
    it is serving, and ask it for recommendations with titles."""
    from server.client import RankingClient, format_answer

    process, log = _start_background("serve", ["--redis-url", redis_url,
                                               "--clock", clock.isoformat(), "--port", str(port)])
    with RankingClient(f"127.0.0.1:{port}") as client:
        try:
            client.wait_until_serving(300, process)
        except (TimeoutError, RuntimeError) as exc:
            raise SystemExit(f"the ranking service did not start ({exc}); see {log}") from None
        for user in (414, 987654321):
            print(f"    Recommend(user_id={user}, top_k=10, explain=true):")
            answer = client.recommend(user, top_k=10, explain=True)
            print("    " + format_answer(answer).replace("\n", "\n    "))
    print(f"    the service keeps running on 127.0.0.1:{port} (pid {process.pid}, log {log});")
    print(f"    try `avrec recommend 610 --explain`; stop it with `kill {process.pid}`")


def _demo_web(service_port: int, port: int) -> None:
    """Start ``avrec web`` in the background like the service (replacing an earlier demo
    page), wait until it answers, and print its URL."""
    import urllib.request

    process, log = _start_background("web", ["--port", str(port),
                                             "--target", f"127.0.0.1:{service_port}"])
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                print(f"    the web page did not start; see {log}")
                return
            time.sleep(0.5)
    print(f"    open {url} (pid {process.pid}, log {log}): users, likes, neighbours, "
          f"evaluation; stop it with `kill {process.pid}`")


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
    _engine_options(p, ["feast", "duckdb", "spark"], "duckdb",
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


def register_demo(sub: Subparsers) -> argparse.ArgumentParser:
    """``avrec demo``."""
    p = sub.add_parser("demo", help="the main job on the embedded default dataset")
    p.add_argument("--engine", choices=["feast", "duckdb"], default="duckdb")
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--port", type=int, default=50051, help="port of the demo's ranking service")
    p.add_argument("--web-port", type=int, default=8080, help="port of the demo's web page")
    p.set_defaults(func=cmd_demo)
    return p


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``avrec``: every subcommand is listed, but a job's own subparser (its
    module's ``register``) is built only when it is ``command``: the others are placeholders
    that accept any arguments, so listing them imports nothing heavy."""
    parser = top_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = subparsers(parser)
    for register in (register_redis, register_ingest, register_features, register_apply,
                     register_materialize, register_training_set, register_online):
        register(sub)
    for name, (_, text) in JOBS.items():
        if name == command:
            job_module(name).register(sub)
        else:
            sub.add_parser(name, help=text, add_help=False)
    register_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``avrec`` console script.

    Parsed in two steps: the first finds the subcommand, the second parses the whole line
    with that subcommand's own subparser, so global options (before the subcommand) hold for
    every subcommand. Errors a user can fix print one line and exit with 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen, _ = build_parser().parse_known_args(argv)
    return commands.run(build_parser(chosen.command).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
