"""``avrec demo``, the README's main job: the whole pipeline on MovieLens ml-latest-small, then
the ranking service and the web page left running in the background.

It starts every layer's jobs (through :func:`avrec.cli.run_job`), so like :mod:`avrec.cli` it
may import from any layer, and does so only inside the command.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from avrec import config
from avrec.commands import Subparsers
from avrec.data_commands import cmd_online
from avrec.names import (
    BEHAVIOUR_FEATURES,
    DEFAULT_TRAINING_SET_ENGINE,
    ITEM_EMBEDDINGS_TABLE,
    RANKER_FEATURES,
    USER_BEHAVIOUR,
)


def _step(name: str) -> Callable[[], None]:
    started = time.perf_counter()
    print(f"==> {name}", flush=True)
    return lambda: print(f"    {name}: {time.perf_counter() - started:.1f} s", flush=True)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: the whole pipeline on MovieLens ml-latest-small."""
    from avrec import behaviour_features, feature_store, tables, training_set
    from avrec.cli import run_job
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
    embeddings = not args.skip_embed and _has("avrec.encoders.mixed_job")
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
    from avrec.server.client import RankingClient, format_answer

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


def register_demo(sub: Subparsers) -> argparse.ArgumentParser:
    """``avrec demo``."""
    p = sub.add_parser("demo", help="the main job on the embedded default dataset")
    p.add_argument("--engine", choices=["feast", "duckdb"], default=DEFAULT_TRAINING_SET_ENGINE)
    p.add_argument("--skip-embed", action="store_true")
    p.add_argument("--port", type=int, default=50051, help="port of the demo's ranking service")
    p.add_argument("--web-port", type=int, default=8080, help="port of the demo's web page")
    p.set_defaults(func=cmd_demo)
    return p
