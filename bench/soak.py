"""A bounded mixed load against the ranking service, in 10-second windows.

    python bench/soak.py                                    # a sandboxed server of its own
    python bench/soak.py --target 127.0.0.1:50051 --server-pid PID [--data-dir DIR]

``--seconds`` (default 60) of closed-loop load at ``--concurrency`` (default 8) client threads:
Rank of ``--candidates`` (200) random catalogue items for an active user (70%), Recommend top
20 (20%), LogEvents of 1 to 3 ratings of users kept apart for the soak (10%). Per window:
calls, errors by status code, p50/p99 per method (client side, ms), the server's CPU time per
call and the load average (to tell a slower server from a busier machine). The server's RSS and open
file descriptors (``/proc/<pid>``) after a warm-up and at the end, and the events lost: every
event a LogEvents call acknowledged must be in the offline event log afterwards (counted when
the data directory is known: the sandbox's, or ``--data-dir``).

Targets (what a passing soak shows): 0 errors, p99 of the last window <= 1.5x the first,
RSS growth < 5%.
Without ``--target`` the server is a sandbox (``bench/sandbox.py``): a copy of the data
directory and a Redis of its own, so the soak's events never reach shared data.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import numpy as np
from sandbox import Server, items_and_users, logged_events, open_fds, rss_mb, sandbox

from avrec.server.protocol import ranking_pb2, ranking_pb2_grpc

METHODS = ("Rank", "Recommend", "LogEvents")
SOAK_USERS = range(30_000_000, 30_001_000)  # LogEvents users no one else has


class Load:
    """Closed-loop workers; each finished call is ``(t_done, method, code, seconds, events)``."""

    def __init__(self, target: str, items: list[int], users: list[int], candidates: int,
                 mix: tuple[float, float, float], timeout: float) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)
        self.items, self.users, self.candidates = items, users, candidates
        self.mix, self.timeout = mix, timeout
        self.calls: list[tuple[float, str, str, float, int]] = []
        self._lock = threading.Lock()

    def one(self, rng: random.Random) -> tuple[str, str, float, int]:
        method = rng.choices(METHODS, weights=self.mix)[0]
        acked = 0
        started = time.perf_counter()
        try:
            if method == "Rank":
                self.stub.Rank(ranking_pb2.RankRequest(
                    user_id=rng.choice(self.users),
                    candidate_item_ids=rng.sample(self.items, self.candidates)),
                    timeout=self.timeout)
            elif method == "Recommend":
                self.stub.Recommend(ranking_pb2.RecommendRequest(
                    user_id=rng.choice(self.users), top_k=20), timeout=self.timeout)
            else:
                events = [ranking_pb2.Event(
                    user_id=rng.choice(SOAK_USERS), item_id=rng.choice(self.items),
                    event_type="rating", rating=rng.choice([1.0, 2.5, 3.0, 4.0, 4.5, 5.0]))
                    for _ in range(rng.randint(1, 3))]
                reply = self.stub.LogEvents(ranking_pb2.LogEventsRequest(events=events),
                                            timeout=self.timeout)
                acked = reply.accepted
            code = "OK"
        except grpc.RpcError as error:
            code = error.code().name
        return method, code, time.perf_counter() - started, acked

    def run(self, seconds: float, concurrency: int, seed: int, pid: int,
            window: float) -> list[tuple[float, float]]:
        """Run the load; per window the server's CPU seconds and the box's load average."""
        start = time.perf_counter()
        stop = start + seconds
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        last = [cpu_seconds(pid)]

        def sample() -> None:
            now = cpu_seconds(pid)
            samples.append((now - last[0], os.getloadavg()[0]))
            last[0] = now

        def monitor() -> None:
            while not done.wait(window):
                sample()

        def worker(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.perf_counter() < stop:
                method, code, took, acked = self.one(rng)
                with self._lock:
                    self.calls.append((time.perf_counter() - start, method, code, took, acked))

        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(concurrency)]
        watcher = threading.Thread(target=monitor, daemon=True)
        for thread in [*threads, watcher]:
            thread.start()
        for thread in threads:
            thread.join()
        done.set()
        watcher.join()
        if len(samples) < round(seconds / window):  # the last window, cut short by the join
            sample()
        return samples


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (0 when unknown)."""
    if not pid:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(calls: list[tuple[float, str, str, float, int]], seconds: float, window: float,
           samples: list[tuple[float, float]],
           before: tuple[float, int] | None, after: tuple[float, int] | None,
           acked: int, persisted: int | None) -> bool:
    windows = max(1, round(seconds / window))
    by_window: dict[int, list] = defaultdict(list)
    for call in calls:
        by_window[min(int(call[0] // window), windows - 1)].append(call)
    print("\n| window | calls | errors | " + " | ".join(
        f"{m} p50 / p99 ms" for m in METHODS) + " | server CPU ms/call | load avg |")
    print("|---|---|---|" + "---|" * (len(METHODS) + 2))
    p99: dict[str, list[float]] = defaultdict(list)
    errors_total: Counter[str] = Counter()
    for w in range(windows):
        rows = by_window.get(w, [])
        errors = Counter(c[2] for c in rows if c[2] != "OK")
        errors_total.update(errors)
        cells = []
        for method in METHODS:
            took = np.array([c[3] for c in rows if c[1] == method]) * 1e3
            if took.size:
                p99[method].append(float(np.percentile(took, 99)))
                cells.append(f"{np.percentile(took, 50):.1f} / {p99[method][-1]:.1f}")
            else:
                p99[method].append(float("nan"))
                cells.append("-")
        error_text = ", ".join(f"{k} {v}" for k, v in errors.items()) or "0"
        cpu, load = samples[w] if w < len(samples) else (float("nan"), float("nan"))
        print(f"| {w * window:.0f}-{(w + 1) * window:.0f} s | {len(rows)} | {error_text} | "
              + " | ".join(cells) + f" | {1e3 * cpu / max(1, len(rows)):.1f} | {load:.1f} |")
    total = len(calls)
    per_method = Counter(c[1] for c in calls)
    print(f"\n{total} calls in {seconds:.0f} s ({total / seconds:.1f}/s): "
          + ", ".join(f"{m} {per_method[m]}" for m in METHODS)
          + f"; errors {sum(errors_total.values())} {dict(errors_total) or ''}")
    ok = not errors_total
    for method in METHODS:
        first, last = p99[method][0], p99[method][-1]
        ratio = last / first if first else float("nan")
        ok &= not ratio > 1.5
        print(f"{method}: p99 first window {first:.1f} ms, last {last:.1f} ms, ratio "
              f"{ratio:.2f} (target <= 1.5)")
    if before and after:
        growth = 100 * (after[0] / before[0] - 1)
        ok &= growth < 5
        print(f"server RSS {before[0]:.0f} -> {after[0]:.0f} MB ({growth:+.1f}%, target < 5%), "
              f"open fds {before[1]} -> {after[1]}")
    if persisted is not None:
        lost = max(0, acked - persisted)
        ok &= lost == 0
        print(f"LogEvents: {acked} events acknowledged, {persisted} in the offline event log, "
              f"lost {lost}")
    print("targets met" if ok else "targets missed")
    return ok


def soak(server: Server, data_dir: Path, args: argparse.Namespace) -> int:
    items, users = items_and_users(data_dir)
    mix = tuple(float(x) for x in args.mix.split(","))
    load = Load(server.target, items, users, args.candidates, mix, args.timeout)
    warm = random.Random(-1)
    for _ in range(30):
        load.one(warm)
    logged_before = logged_events(server.data_dir or data_dir) if args.count_events else None
    before = (rss_mb(server.pid), open_fds(server.pid)) if server.pid else None
    print(f"soak {server.target}: {args.seconds:.0f} s, {args.concurrency} clients, mix "
          f"Rank/Recommend/LogEvents {args.mix}, Rank 1x{args.candidates}", flush=True)
    samples = load.run(args.seconds, args.concurrency, args.seed, server.pid, args.window)
    after = (rss_mb(server.pid), open_fds(server.pid)) if server.pid else None
    load.channel.close()
    acked = sum(c[4] for c in load.calls)
    persisted = None
    if logged_before is not None:
        persisted = logged_events(server.data_dir or data_dir) - logged_before
    report(load.calls, args.seconds, args.window, samples, before, after, acked, persisted)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--mix", default="0.7,0.2,0.1", help="Rank,Recommend,LogEvents shares")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", help="a running server (default: start a sandbox)")
    parser.add_argument("--server-pid", type=int, help="its pid, for RSS and open fds")
    parser.add_argument("--data-dir", type=Path,
                        help="its data directory (users, items; events lost counted)")
    parser.add_argument("--source", type=Path, help="data directory the sandbox copies")
    parser.add_argument("--model-dir", help="the sandbox serves this model directory "
                        "(default: the LATEST run under its models/ranker)")
    args = parser.parse_args(argv)
    if args.target:
        from avrec import config

        args.count_events = args.data_dir is not None
        server = Server(args.target, args.server_pid or 0, args.data_dir)
        return soak(server, args.data_dir or config.data_dir(), args)
    args.count_events = True
    serve_args = ("--model-dir", args.model_dir) if args.model_dir else ()
    with sandbox(args.source, serve_args=serve_args) as server:
        return soak(server, server.data_dir, args)


if __name__ == "__main__":
    sys.exit(main())
