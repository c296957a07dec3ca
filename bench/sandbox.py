"""A ranking service of its own for the hardening benches (``fuzz_rpc.py``, ``soak.py``).

Their ``LogEvents`` calls write: records of the event log and the users' online rows. So
that a bench never writes into the shared data directory or the machine's Redis, ``sandbox``
copies ``offline/`` of the data directory into a temporary one (models are linked, read only),
starts its own redis-server on a free loopback port, runs ``avrec apply`` + ``avrec materialize``
there as of the replay clock, and starts ``avrec serve`` on a free port. Everything is stopped
and removed on exit.

Without ``make demo``'s data (no trained model under ``data/models``), ``python
bench/sandbox.py --build-small DIR`` writes a small data directory like the test suite's (a few
minutes) for the benches' ``--source DIR``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from avrec import config, tables

CLOCK = "2018-09-25T00:00:00+00:00"


@dataclass
class Server:
    target: str
    pid: int
    data_dir: Path | None  # None: a server the caller started (its data dir unknown)
    redis_url: str | None = None  # the sandbox's own Redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` (MB), from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def logged_events(data_dir: Path) -> int:
    """Rows in the offline event log (what LogEvents persisted)."""
    return sum(frame.height for frame in tables.read_event_log(data_dir / "offline"))


@contextlib.contextmanager
def sandbox(source: Path | None = None, clock: str = CLOCK,
            serve_args: tuple[str, ...] = ()) -> Iterator[Server]:
    """A running ``avrec serve`` over a copy of ``source`` (default: the data directory)."""
    from avrec.redis_server import start_embedded
    from avrec.server.client import RankingClient

    source = Path(source or config.data_dir())
    root = Path(tempfile.mkdtemp(prefix="avrec-sandbox-"))
    shutil.copytree(source / "offline", root / "offline")
    (root / "models").symlink_to((source / "models").resolve())
    url = f"redis://127.0.0.1:{free_port()}/0"
    redis_pid = start_embedded(url, workdir=root / "redis")
    env = {**os.environ, "AVREC_DATA_DIR": str(root), "REDIS_URL": url}
    cli = [sys.executable, "-m", "avrec.cli"]
    process = None
    # SIGTERM would end this process without the cleanup below, leaving server and Redis behind
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        print(f"sandbox {root}: redis {url}, apply + materialize as of {clock}", flush=True)
        subprocess.run([*cli, "apply"], env=env, check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*cli, "materialize", "--start", "1970-01-01T00:00:00+00:00",
                        "--end", clock], env=env, check=True, stdout=subprocess.DEVNULL)
        port = free_port()
        log = (root / "serve.log").open("w")
        process = subprocess.Popen([*cli, "serve", "--port", str(port), "--clock", clock,
                                    *serve_args], env=env, stdout=log, stderr=subprocess.STDOUT)
        with RankingClient(f"127.0.0.1:{port}") as client:
            try:
                client.wait_until_serving(600, process)
            except (RuntimeError, TimeoutError):
                tail = (root / "serve.log").read_text().splitlines()[-15:]
                print("avrec serve did not start:\n  " + "\n  ".join(tail), file=sys.stderr)
                raise
        yield Server(f"127.0.0.1:{port}", process.pid, root, url)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis_pid, signal.SIGTERM)
        time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def items_and_users(data_dir: Path) -> tuple[list[int], list[int]]:
    """Catalogue ids, and users active in 2018 (fresh at the replay clock)."""
    offline = data_dir / "offline"
    items = tables.read_table("items", offline)["item_id"].to_list()
    events = tables.read_table("events", offline)
    last = events.group_by("user_id").agg(pl.col("event_timestamp").max())
    users = last.sort("event_timestamp")["user_id"].to_list()[-200:]
    return items, users


def build_small(root: Path) -> Path:
    """A small serving data directory like the test suite's stack (``tests/server/conftest.py``):
    MovieLens ingested, genre-projection item vectors, the quick ``avrec train``; for trying the
    benches where ``make demo`` has not run. Returns the model directory."""
    from datetime import UTC, datetime

    from avrec import behaviour_features, feature_store
    from avrec.ingest_movielens import ingest_movielens
    from avrec.ranker import train_job
    from avrec.ranker.training import TrainConfig
    from avrec.redis_server import start_embedded

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.server.conftest import CLOCK, genre_embeddings

    url = f"redis://127.0.0.1:{free_port()}/0"
    os.environ.update(AVREC_DATA_DIR=str(root), REDIS_URL=url)
    redis_pid = start_embedded(url, workdir=root / "redis")
    try:
        offline = config.offline_dir()
        ingest_movielens(config.datasets_dir() / "ml-latest-small", offline)
        behaviour_features.build(offline)
        items = tables.read_table("items", offline)
        genre_embeddings(items).write_parquet(tables.table_path("item_embeddings", offline))
        feature_store.apply(url)
        feature_store.materialize(end=CLOCK, redis_url=url)
        return train_job.train(vectors="mixed", start=datetime(2018, 1, 1, tzinfo=UTC),
                               train_config=TrainConfig(epochs=2, negatives=2, progress=False),
                               hybrid_quick=True)
    finally:
        os.kill(redis_pid, signal.SIGTERM)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--build-small":
        sys.exit("usage: python bench/sandbox.py --build-small DIR")
    print(build_small(Path(sys.argv[2]).resolve()))
