"""Redis memory per user and per item, on the shared MovieLens data materialized by Feast.

``python bench/redis_memory.py [--dim 128]`` builds a data directory of its own under a
temporary directory (ingest, behaviour features, item vectors of ``--dim`` floats for every
item: the mixed embedding's size, two lists of it per item as ``item_embedding`` holds), starts
its own redis-server on a free loopback port, applies and materializes everything as of the
replay clock, then measures:

* ``MEMORY USAGE`` of every user's and item's Feast hash (users: ``user_behaviour`` and
  ``user_history`` share one hash; items: ``item_behaviour`` and ``item_embedding``);
* ``INFO memory`` ``used_memory`` before and after the materialization, per key;
* the ``LogEvents`` state each hash would carry once a user or an item is touched
  (``_avrec_state:<view>``, its packed bytes as :mod:`avrec.server.incremental` writes them).

It prints one table (markdown). Nothing is written outside the temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
from sandbox import free_port

from avrec import behaviour_features, config, tables
from avrec.ingest_movielens import ingest_movielens

CLOCK = datetime(2018, 9, 25, tzinfo=UTC)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def item_vectors(items: pl.DataFrame, dim: int, seed: int = 0) -> pl.DataFrame:
    """An ``item_embeddings`` table: random unit vectors of ``dim`` floats for every item
    (their bytes online do not depend on the values)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(items.height, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    series = pl.Series(vectors.tolist(), dtype=pl.List(pl.Float32))
    stamp = pl.Series([datetime(2017, 1, 1, tzinfo=UTC)] * items.height).cast(tables.TS)
    return pl.DataFrame({
        "item_id": items["item_id"], "event_timestamp": stamp, "embedding": series,
        "embedding_asum": series, "has_image": [True] * items.height,
        "embedding_version": [f"bench-{dim}"] * items.height, "created_timestamp": stamp,
    })


def build(root: Path, dim: int) -> None:
    """Offline tables of the shared MovieLens data under ``root/offline``."""
    offline = root / "offline"
    ingest_movielens(config.datasets_dir() / "ml-latest-small", offline)
    behaviour_features.build(offline)
    items = tables.read_table("items", offline)
    item_vectors(items, dim).write_parquet(tables.table_path("item_embeddings", offline))


def usage(client, keys: list[bytes]) -> np.ndarray:
    """``MEMORY USAGE key SAMPLES 0`` (exact) of each key, pipelined; 0 for absent keys."""
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
        return np.array([r or 0 for r in pipe.execute()], dtype=np.int64)


def state_sizes(offline: Path) -> tuple[np.ndarray, np.ndarray]:
    """Packed ``LogEvents`` state bytes of every user and item, replayed from their events."""
    from avrec.server.incremental_replay import genre_index, replay
    from avrec.server.incremental_state import micros

    items = tables.read_table("items", offline)
    genres = behaviour_features.genre_vocabulary(items)
    states = replay(tables.read_events(offline), micros(CLOCK), genre_index(items, genres),
                    len(genres))
    return (np.array([len(s.pack()) for s in states.users.values()]),
            np.array([len(s.pack()) for s in states.items.values()]))


def row(name: str, sizes: np.ndarray) -> str:
    sizes = sizes[sizes > 0]
    return (f"| {name} | {sizes.size:,} | {sizes.mean():,.0f} | {np.median(sizes):,.0f} | "
            f"{np.percentile(sizes, 99):,.0f} | {sizes.max():,} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=128, help="floats per item vector")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="avrec-redis-memory-"))
    os.environ["AVREC_DATA_DIR"] = str(root)
    from avrec import feature_store
    from avrec.redis_client import connect
    from avrec.redis_server import start_embedded
    from avrec.server.feature_reader import ViewReader

    url = f"redis://127.0.0.1:{free_port()}/0"
    os.environ["REDIS_URL"] = url
    pid = start_embedded(url, workdir=root / "redis")
    try:
        build(root, args.dim)
        client = connect(url)
        before = client.info("memory")["used_memory"]
        feature_store.apply(url)
        store = feature_store.materialize(start=EPOCH, end=CLOCK, redis_url=url)
        after = client.info("memory")["used_memory"]
        offline = root / "offline"
        users = tables.read_table("user_behaviour", offline)["user_id"].unique().to_list()
        items = tables.read_table("items", offline)["item_id"].to_list()
        user_keys = [ViewReader.from_store(store, "user_behaviour").key(u) for u in users]
        item_keys = [ViewReader.from_store(store, "item_behaviour").key(i) for i in items]
        per_user, per_item = usage(client, user_keys), usage(client, item_keys)
        keys = client.dbsize()
        user_state, item_state = state_sizes(offline)
        print(f"Redis {client.info('server')['redis_version']}, ml-latest-small materialized "
              f"as of {CLOCK:%Y-%m-%d}, item vectors 2 x {args.dim} floats; {keys:,} keys, "
              f"used_memory +{(after - before) / 2**20:,.1f} MiB "
              f"({(after - before) / max(keys, 1):,.0f} B per key)\n")
        print("| hash | entities | mean B | median B | p99 B | max B |")
        print("|---|---|---|---|---|---|")
        print(row("user (user_behaviour + user_history), MEMORY USAGE", per_user))
        print(row("item (item_behaviour + item_embedding), MEMORY USAGE", per_item))
        print(row("+ a user's LogEvents state (packed bytes)", user_state))
        print(row("+ an item's LogEvents state (packed bytes)", item_state))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
