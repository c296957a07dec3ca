"""``LogEvents`` over real gRPC: incremental online rows against the former recompute path.

    python bench/events_bench.py [--single 300] [--batches 5] [--batch-size 2000]
                                 [--modes recompute incremental] [--cluster]
                                 [--threads 8] [--before DIR [--rounds 2]]

Self-contained: in ``--workdir`` (default ``/tmp/avrec-events-bench``) it ingests MovieLens
ml-latest-small, computes the behaviour features, writes seeded genre-projection item vectors
(as ``tests/server``; the service treats any vectors alike), starts a Redis of its own on a
free port, applies and materializes the feature repo into it, trains a small model once
(cached for later runs) and starts the service in its own process, once per path, each with
a replay clock after everything logged before it:

* ``recompute``: the former path (``incremental_events: false``): each touched user's rows
  recomputed from their whole history with the offline code, written through Feast;
* ``incremental``: the default: per-entity states in Redis, users' and items' rows updated
  in one pipelined batch (``server/incremental.py``). Its first batch touches every user and
  finds no state: they are rebuilt from the history (``first touch``); later calls are warm.

With ``--cluster``, the incremental path runs once more on a local Redis Cluster (3 masters +
3 replicas, materialized the same way): one compare-and-set per entity instead of one
``WATCH``/``MULTI`` batch (``server/compare_and_set.py``).

With ``--threads K``, the one-event calls are also sent from K client threads at once
(closed loop), where concurrent calls share the event log's write (group commit): the
``writes`` column counts the event log's durable writes (records of the journal, or files
before it), one per shared write. With ``--before
DIR`` (a copy of an earlier commit's code, e.g. ``git archive COMMIT | tar -x -C DIR``), each
path's server also runs from DIR, alternately with this checkout, ``--rounds`` times. Every
server after the first starts with the incremental states deleted from Redis
(:func:`forget_states`): each finds what the first found, no state another one wrote (it
does find the events the others logged: a few per cent more history).

Nothing outside ``--workdir`` is written (the machine's Redis and ``data/`` are not used).
Per row: client-side p50/p99 per call, calls/s, events/s and the server's CPU seconds. The
client is one Python thread (or ``--threads``) on the same cores as the server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import psutil

CLOCK = datetime(2018, 9, 25, tzinfo=UTC)
MODES = ("recompute", "incremental")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(workdir: Path, redis_url: str) -> Path:
    """Offline tables (cached), Redis applied and materialized, a model (cached)."""
    from avrec import behaviour_features, config, feature_store, tables
    from avrec.ingest_movielens import ingest_movielens
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.*: this checkout's root
    from tests.serving_stack import genre_embeddings

    offline = config.offline_dir()
    if not (offline / "ready").exists():
        ingest_movielens(config.datasets_dir() / "ml-latest-small", offline)
        behaviour_features.build(offline)
        items = tables.read_table("items", offline)
        genre_embeddings(items).write_parquet(tables.table_path("item_embeddings", offline))
        (offline / "ready").write_text("")
    shutil.rmtree(offline / tables.EVENT_LOG, ignore_errors=True)  # earlier runs' events
    started = time.perf_counter()
    feature_store.apply(redis_url)
    feature_store.materialize(end=CLOCK, start=datetime(1970, 1, 1, tzinfo=UTC),
                              redis_url=redis_url)  # whole: the Redis is new
    print(f"  applied and materialized in {time.perf_counter() - started:.0f} s", flush=True)
    models = workdir / "model"
    if not (models / "ready").exists():
        from avrec.ranker import train_job
        from avrec.ranker.training import TrainConfig

        trained = train_job.train(vectors="mixed", start=datetime(2018, 1, 1, tzinfo=UTC),
                                  train_config=TrainConfig(epochs=2, negatives=2, progress=False),
                                  hybrid_quick=True)
        shutil.rmtree(models, ignore_errors=True)
        shutil.copytree(trained, models)
        (models / "ready").write_text(str(trained))
    return models


def serve(mode: str, port: int, clock: str, model_dir: str) -> int:
    """Run one server process until SIGTERM (on ``$REDIS_URL``: a single Redis or a cluster)."""
    from avrec.server.app import start
    from avrec.server.config import ServeConfig, load_config

    settings = {"port": port, "clock": clock, "model_dir": model_dir,
                "redis_url": os.environ["REDIS_URL"], "hybrid": False,
                "incremental_events": mode == "incremental"}
    if "event_journal_events" in ServeConfig.__dataclass_fields__:  # not in code before it
        settings["event_journal_events"] = 10**9  # one segment a run: its records are counted
    service = start(load_config(None, settings, environ={}))
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    service.stop(1)
    return 0


def events_for(rng: np.random.Generator, users: np.ndarray, catalogue: np.ndarray, n: int,
               cover: bool = False) -> list:
    """``n`` events for random users (``cover``: every user once first), half ratings."""
    from avrec.v1 import ranking_pb2

    who = rng.choice(users, n)
    if cover:
        who[: len(users)] = rng.permutation(users)[:n]
    out = []
    for user in who.tolist():
        item = int(rng.choice(catalogue))
        if rng.random() < 0.5:
            out.append(ranking_pb2.Event(user_id=user, item_id=item, event_type="rating",
                                         rating=float(rng.integers(1, 11)) / 2))
        else:
            out.append(ranking_pb2.Event(user_id=user, item_id=item, event_type="tag"))
    return out


def measure(client, calls: list[list]) -> np.ndarray:
    latencies = []
    for events in calls:
        started = time.perf_counter()
        reply = client.log_events(events)
        latencies.append(time.perf_counter() - started)
        assert reply.accepted == len(events)
    return np.asarray(latencies)


def measure_threads(client, calls: list[list], threads: int) -> tuple[np.ndarray, float]:
    """``calls`` sent from ``threads`` closed-loop client threads: latencies, wall seconds."""
    shares = [calls[i::threads] for i in range(threads)]
    results: list[np.ndarray] = [np.empty(0)] * threads

    def work(i: int) -> None:
        results[i] = measure(client, shares[i])

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return np.concatenate(results), time.perf_counter() - started


def log_writes() -> int:
    """Durable writes in the event log so far: a Parquet file each (the code before the
    journal), a record each in a journal segment (a segment compacted meanwhile counts as
    one file: the bench server's segments hold a whole run, ``serve``)."""
    from avrec import config, event_journal, tables

    directory = config.offline_dir() / tables.EVENT_LOG
    return (len(list(directory.glob("*.parquet")))
            + sum(event_journal.count_records(p) for p in directory.glob("*.journal")))


LAYERS = ("encoders", "ranker", "server", "web")  # shipped as avrec.<layer> (setup.py)


def code_view(tree: Path, workdir: Path) -> Path:
    """A directory to put on ``PYTHONPATH`` so that ``avrec`` and its layers are ``tree``'s
    (``git archive COMMIT``'s output, a commit since the layers ship as ``avrec.server``
    etc.). ``PYTHONPATH=tree`` alone would not do: ``avrec.server`` is not under
    ``tree/avrec``, so the editable install would take it from this checkout."""
    view = workdir / "code-before"
    shutil.rmtree(view, ignore_errors=True)
    shutil.copytree(tree / "avrec", view / "avrec", symlinks=True)
    for layer in LAYERS:
        (view / "avrec" / layer).symlink_to((tree / layer).resolve())
    stubs = Path(__file__).resolve().parents[1] / "avrec" / "v1"  # generated, git-ignored
    if not (view / "avrec" / "v1").exists():
        shutil.copytree(stubs, view / "avrec" / "v1")
    (view / "feature_repo").symlink_to((tree / "feature_repo").resolve())
    found = subprocess.run(
        [sys.executable, "-c", "import avrec.server.event_log as m; print(m.__file__)"],
        env={**os.environ, "PYTHONPATH": str(view)}, cwd=view, capture_output=True,
        text=True, check=True).stdout.strip()  # (not run from this checkout's root)
    if not found.startswith(str(view)):
        raise RuntimeError(f"{tree}: avrec.server came from {found}, not from the copy")
    return view


def forget_states() -> int:
    """Delete every incremental state (``_avrec_state:*`` fields) from ``$REDIS_URL``, so
    that the next server starts as the first did (each state rebuilt at its first event);
    the number of hashes that held one."""
    import redis

    from avrec.names import ITEM_BEHAVIOUR, USER_BEHAVIOUR
    from avrec.server.incremental import state_field

    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    fields = [state_field(USER_BEHAVIOUR), state_field(ITEM_BEHAVIOUR)]
    keys = list(client.scan_iter(count=10_000, _type="HASH"))  # (one round trip a page)
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hdel(key, *fields)
        return sum(1 for deleted in pipe.execute() if deleted)


def run_mode(mode: str, clock: datetime, model_dir: Path, args, users: np.ndarray,
             catalogue: np.ndarray, redis_url: str | None = None,
             tree: Path | None = None) -> list[dict]:
    """One path's rows; ``redis_url``: another online store than ``$REDIS_URL`` (a cluster,
    already materialized); ``tree``: run the server from that copy of the code."""
    from avrec.server.client import RankingClient

    port = free_port()
    env = dict(os.environ)
    if redis_url:
        env["REDIS_URL"] = redis_url
    if tree:
        env["PYTHONPATH"] = str(tree)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--port", str(port),
         "--clock", clock.isoformat(), "--model-dir", str(model_dir)],
        stdout=subprocess.PIPE, text=True, env=env)
    label = f"{mode} (cluster)" if redis_url else mode
    label += " (before)" if tree else ""
    rows = []
    try:
        assert server.stdout is not None
        while (line := server.stdout.readline()) and line.strip() != "ready":
            pass
        if line.strip() != "ready":
            raise RuntimeError(f"{mode} server exited with {server.wait()}")
        cpu = psutil.Process(server.pid)
        rng = np.random.default_rng(args.seed)
        slow = mode == "recompute"
        plan = [("one event", args.single // (5 if slow else 1), 1, False),
                ("batch", max(1, args.batches // (2 if slow else 1)), args.batch_size, False)]
        if not slow:  # every user once: no state yet, each rebuilt from the history
            plan.insert(0, ("batch, first touch", 1, args.batch_size, True))
        if args.threads > 1:
            plan.insert(-1, (f"one event, {args.threads} threads",
                             args.single // (5 if slow else 1), 1, False))
        with RankingClient(f"127.0.0.1:{port}", timeout=600) as client:
            measure(client, [events_for(rng, users, catalogue, 1) for _ in range(5)])  # warm
            for what, calls, size, cover in plan:
                work = [events_for(rng, users, catalogue, size, cover) for _ in range(calls)]
                before, writes = sum(cpu.cpu_times()[:2]), log_writes()
                if "threads" in what:
                    latencies, wall = measure_threads(client, work, args.threads)
                else:
                    latencies = measure(client, work)
                    wall = latencies.sum()
                touched = np.mean([len({e.user_id for e in w}) for w in work])
                rows.append({
                    "path": label, "what": what, "calls": calls, "events": size,
                    "users": touched, "p50": np.percentile(latencies, 50) * 1e3,
                    "p99": np.percentile(latencies, 99) * 1e3,
                    "calls_s": calls / wall,
                    "events_s": calls * size / wall,
                    "cpu": (sum(cpu.cpu_times()[:2]) - before) / calls,
                    "writes": log_writes() - writes,
                })
                print(f"  {label:21} {what:18} p50 {rows[-1]['p50']:8.1f} ms", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    return rows


def run_on_cluster(args, model_dir: Path, users: np.ndarray, catalogue: np.ndarray,
                   clock: datetime) -> list[dict]:
    """The incremental path's rows on a local Redis Cluster (started and stopped here)."""
    from avrec import feature_store
    from avrec.redis_cluster import start_cluster, stop_cluster

    shutil.rmtree(args.workdir / "cluster", ignore_errors=True)
    cluster = start_cluster(workdir=args.workdir / "cluster")
    try:
        started = time.perf_counter()
        feature_store.apply(cluster.url)
        feature_store.materialize(end=CLOCK, start=datetime(1970, 1, 1, tzinfo=UTC),
                                  redis_url=cluster.url)
        print(f"  cluster {cluster.url}: applied and materialized in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        return run_mode("incremental", clock, model_dir, args,
                        users, catalogue, redis_url=cluster.url)
    finally:
        stop_cluster(cluster, remove=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--clock", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/avrec-events-bench"))
    parser.add_argument("--single", type=int, default=300,
                        help="one-event calls (the recompute path makes a fifth)")
    parser.add_argument("--batches", type=int, default=5,
                        help="warm batches (the recompute path makes half)")
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="paths to run (default both)")
    parser.add_argument("--threads", type=int, default=1,
                        help="also send the one-event calls from this many client threads")
    parser.add_argument("--before", type=Path,
                        help="a copy of earlier code: each path's server also runs from it")
    parser.add_argument("--rounds", type=int, default=1,
                        help="with --before: alternate the two this many times")
    parser.add_argument("--cluster", action="store_true",
                        help="then the incremental path on a local Redis Cluster (3 masters + "
                             "3 replicas, avrec.redis_cluster), materialized the same way")
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.port, args.clock, args.model_dir)

    from avrec.redis_server import start_embedded

    args.workdir.mkdir(parents=True, exist_ok=True)
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    os.environ.update(AVREC_DATA_DIR=str(args.workdir / "data"), REDIS_URL=redis_url)
    redis_pid = start_embedded(redis_url, workdir=args.workdir / "redis")
    try:
        from avrec import tables

        print(f"workdir {args.workdir}, Redis {redis_url}; load average "
              f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} cores", flush=True)
        model_dir = build(args.workdir, redis_url)
        users = np.unique(tables.read_table("events")["user_id"].to_numpy())
        catalogue = tables.read_table("items")["item_id"].to_numpy()
        rows = []
        before = code_view(args.before, args.workdir) if args.before else None
        trees = [before, None] * args.rounds if before else [None]
        runs = [(mode, tree) for mode in args.modes for tree in trees]
        for i, (mode, tree) in enumerate(runs):  # each clock after everything logged before
            if i:  # each server starts as the first: no state to find
                print(f"  states deleted from {forget_states()} hashes", flush=True)
            rows += run_mode(mode, CLOCK + timedelta(days=i), model_dir, args, users,
                             catalogue, tree=tree)
        if args.cluster:
            rows += run_on_cluster(args, model_dir, users, catalogue,
                                   CLOCK + timedelta(days=len(runs)))
    finally:
        os.kill(redis_pid, signal.SIGTERM)
    print(f"\n{len(users)} users, {len(catalogue)} items; load average "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| path | call | calls | events/call | users/call | p50 ms | p99 ms | calls/s "
          "| events/s | server CPU s/call | writes |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['what']} | {r['calls']} | {r['events']} | "
              f"{r['users']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['calls_s']:.1f} | "
              f"{r['events_s']:,.0f} | {r['cpu']:.3f} | {r['writes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
