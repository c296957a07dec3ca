"""Latency and throughput of the ranking service over real gRPC, beside a Feast-SDK server path.

    python bench/serve_bench.py [--requests 500] [--candidates 200 1000] [--concurrency 1 16]

Needs the README main command's data (``make demo``: Redis materialized, a trained model).
Each server runs in its own process on loopback with the replay clock of the demo:

* ``avrec``: the shipped service (one pipelined Redis round trip for the user, their history
  and the materialization counter, candidates from the in-process item snapshot), serving the
  hybrid ranker when the model has one (every generator scored from the history over the whole
  catalogue, features of the candidates, one ONNX run);
* ``avrec-deep``: the same service with ``hybrid: false``, serving the deep ranker (one ONNX
  run over the candidates);
* ``feast-sdk``: the same service and model, but every Rank reads the user's and the
  candidates' features through Feast's ``get_online_features`` (one call, entity rows
  ``{user_id, item_id}``), the way a hand-rolled Feast server would.

Clients are Python gRPC threads in this process (1, or 16 concurrent), each request a random
active user and a random candidate set of the catalogue (seeded). The table gives client-side
p50/p99 latency, requests/s, the ratio of p50 to the Feast-SDK path measured in the same run,
the server process's CPU time per call (user + system, all its threads: a spinning BLAS or
onnxruntime pool shows here) and its resident memory. On a 2-core box the clients share the
cores with the server.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import numpy as np
import polars as pl
import psutil

from avrec import config, tables

CLOCK = datetime(2018, 9, 25, tzinfo=UTC)
PATHS = ("avrec", "avrec-deep", "feast-sdk")


def feast_sdk_engine():
    """RankingEngine whose Rank reads every feature through ``get_online_features``."""
    from avrec.server.answers import Ranked, sigmoid
    from avrec.server.engine import RankingEngine
    from avrec.server.feature_reader import OnlineRow
    from avrec.server.models import UserInputs

    class FeastSdkEngine(RankingEngine):
        def rank(self, user_id, item_ids, top_k=0, explain=False, diversity_lambda=0.0):
            self._check(user_id, top_k, diversity_lambda)
            now = self.clock.now()
            loaded = self.ensure_snapshot(self._loaded.snapshot.materialization, now)
            rows = self.candidate_rows(item_ids, loaded)
            user_f = [f"user_behaviour:{f}" for f in self.user_reader.features]
            item_f = [f"item_behaviour:{f}" for f in self.behaviour_reader.features]
            item_f.append(f"item_embedding:{self.models.vector_field}")
            got = self.store.get_online_features(
                features=user_f + item_f,
                entity_rows=[{"user_id": user_id, "item_id": int(i)} for i in item_ids],
                full_feature_names=True,
            ).to_dict()
            values = {f: got[f"user_behaviour__{f}"][0] for f in self.user_reader.features}
            row = OnlineRow(user_id, None, values["interactions_all"] is not None, False, values)
            user = self.user_inputs(row, loaded, now)
            frame = pl.DataFrame(
                {f"item_behaviour__{f}": got[f"item_behaviour__{f}"]
                 for f in self.behaviour_reader.features},
                strict=False,
            )
            firsts = frame["item_behaviour__first_interaction_at"].to_list()
            ages = [None if f is None else (now - f).total_seconds() / 86400 for f in firsts]
            frame = frame.with_columns(pl.Series("item_age_days", ages, dtype=pl.Float64))
            vectors = got[f"item_embedding__{self.models.vector_field}"]
            has = np.array([v is not None for v in vectors])
            dim = self.models.contract.item_vector_dim
            matrix = np.stack([np.asarray(v if v else np.zeros(dim), np.float32)
                               for v in vectors])
            dense = np.concatenate(
                [self.models.encoder.item_dense(frame), (~has).astype(np.float32)[:, None]], 1)
            inputs = UserInputs(user.dense, user.history, user.mask)
            logits = self.models.score(inputs, matrix, dense.astype(np.float32))
            order = np.argsort(-logits, kind="stable")
            k = len(order) if top_k == 0 else top_k
            snap = loaded.snapshot

            chosen = order[:k]
            return Ranked(rows[chosen], sigmoid(logits[chosen].astype(np.float64)),
                          loaded.records, not row.fresh, row, now, snap.embedding_version)

    return FeastSdkEngine


def serve(path: str, port: int) -> int:
    """Run one server process (``--serve PATH``) until SIGTERM."""
    from avrec.server.app import start
    from avrec.server.config import load_config
    from avrec.server.engine import RankingEngine

    engine_class = feast_sdk_engine() if path == "feast-sdk" else RankingEngine
    settings = {"port": port, "clock": CLOCK.isoformat(), "hybrid": path == "avrec"}
    service = start(load_config(None, settings), engine_class)
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    service.stop(1)
    return 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(process: psutil.Process | None) -> float:
    """User + system CPU time of ``process`` so far (0 without one)."""
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


def run_load(target: str, users: np.ndarray, catalogue: np.ndarray, candidates: int,
             concurrency: int, requests: int, seed: int,
             server: psutil.Process | None = None) -> tuple[np.ndarray, float, float]:
    """Latencies (s) of ``requests`` Rank calls, the wall time they took and the CPU time
    ``server`` spent meanwhile (s; warm-up calls excluded from all three)."""
    from avrec.server.client import RankingClient

    rng = np.random.default_rng(seed)
    work = [(int(rng.choice(users)), rng.choice(catalogue, candidates, replace=False).tolist())
            for _ in range(requests)]
    with RankingClient(target, timeout=30) as client:
        for user, items in work[:20]:  # warm-up
            client.rank(user, items)

        def one(job: tuple[int, list[int]]) -> float:
            started = time.perf_counter()
            client.rank(job[0], job[1])
            return time.perf_counter() - started

        cpu, started = cpu_seconds(server), time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = np.array(list(pool.map(one, work)))
        return latencies, time.perf_counter() - started, cpu_seconds(server) - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--feast-requests", type=int, default=100)
    parser.add_argument("--candidates", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.serve:
        return serve(args.serve, args.port)

    events = tables.read_table("events")
    last = events.group_by("user_id").agg(pl.col("event_timestamp").max())
    active = last.filter(pl.col("event_timestamp") > datetime(2017, 1, 1, tzinfo=UTC))
    users = active["user_id"].to_numpy()
    catalogue = tables.read_table("items")["item_id"].to_numpy()
    print(f"{len(users)} active users, {len(catalogue)} items, load average "
          f"{os.getloadavg()[0]:.2f}, {os.cpu_count()} cores; data {config.data_dir()}")
    results = []
    for path in PATHS:
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", path, "--port", str(port)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            while (line := server.stdout.readline()) and line.strip() != "ready":
                pass
            if server.poll() is not None:
                raise RuntimeError(f"{path} server exited with {server.returncode}")
            memory = psutil.Process(server.pid)
            for candidates in args.candidates:
                for concurrency in args.concurrency:
                    n = args.feast_requests if path == "feast-sdk" else args.requests
                    latencies, wall, cpu = run_load(f"127.0.0.1:{port}", users, catalogue,
                                                    candidates, concurrency, n, args.seed,
                                                    memory)
                    results.append({
                        "path": path, "candidates": candidates, "concurrency": concurrency,
                        "p50": np.percentile(latencies, 50) * 1e3,
                        "p99": np.percentile(latencies, 99) * 1e3,
                        "rps": n / wall, "rss": memory.memory_info().rss / 2**20,
                        "cpu": cpu / n * 1e3,
                    })
                    print(f"  {path:10} 1x{candidates:<5} c={concurrency:<3} "
                          f"p50 {results[-1]['p50']:7.2f} ms", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)

    feast = {(r["candidates"], r["concurrency"]): r for r in results if r["path"] == "feast-sdk"}
    print()
    print(f"{'path':11} {'request':>8} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'req/s':>8} {'p50 vs feast-sdk':>17} {'server CPU ms/call':>19} "
          f"{'server RSS':>11}")
    for r in results:
        ref = feast[(r["candidates"], r["concurrency"])]
        ratio = ref["p50"] / r["p50"]
        print(f"{r['path']:11} {'1x' + str(r['candidates']):>8} {r['concurrency']:>7} "
              f"{r['p50']:8.2f} {r['p99']:8.2f} {r['rps']:8.0f} {ratio:16.1f}x "
              f"{r['cpu']:19.2f} {r['rss']:9.0f}MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

