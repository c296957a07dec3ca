"""Fuzz every RPC of the ranking service with Hypothesis and print the status codes per RPC.

    python bench/fuzz_rpc.py --calls 10000                 # a sandboxed server of its own
    python bench/fuzz_rpc.py --target 127.0.0.1:50051 --server-pid PID --data-dir data

The cases are those of ``tests/server/test_fuzz.py`` (``tests/fuzzing.py``): extreme ints,
NaN/Inf, odd unicode, unset fields, candidate lists past ``max_candidates`` and messages past
4 MiB, event timestamps outside protobuf's range, raw garbage payloads; ``--calls`` are split
evenly over Rank, Recommend, LogEvents, Health.Check and garbage, sent in batches of
``--concurrency`` parallel calls. Without ``--target`` the server is a sandbox
(``bench/sandbox.py``: a copy of the data directory, its own Redis), since valid LogEvents
write. Prints calls per status code and RPC, codes outside the documented ones, server RSS and
open fds before and after, and whether it still serves; exits 1 on an undocumented code.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from sandbox import Server, items_and_users, open_fds, rss_mb, sandbox

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fuzzing import ALLOWED, RPCS, call, cases

LOG_USERS = range(20_000_000, 20_001_000)


def one_rpc(channel: grpc.Channel, pool: ThreadPoolExecutor, rpc: str, strategy, calls: int,
            concurrency: int, base_seed: int) -> Counter[str]:
    """``calls`` generated cases of one RPC, sent ``concurrency`` at a time: codes counted."""
    codes: Counter[str] = Counter()
    batch: list[object] = []

    def flush() -> None:
        codes.update(pool.map(lambda request: call(channel, rpc, request), batch))
        batch.clear()

    @seed(base_seed)
    @settings(max_examples=calls, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(request) -> None:
        batch.append(request)
        if len(batch) >= concurrency:
            flush()

    collect()
    flush()
    return codes


def fuzz(server: Server, data_dir: Path, calls: int, concurrency: int,
         base_seed: int) -> int:
    from avrec.server.client import RankingClient

    items, users = items_and_users(data_dir)
    users = sorted(set(users) | {1, 2, 100_000})
    per_rpc = calls // len(RPCS)
    table: dict[str, Counter[str]] = {}
    seconds: dict[str, float] = {}
    before = (rss_mb(server.pid), open_fds(server.pid)) if server.pid else None
    with grpc.insecure_channel(server.target) as channel, ThreadPoolExecutor(concurrency) as pool:
        for rpc in RPCS:
            started = time.perf_counter()
            codes = one_rpc(channel, pool, rpc, cases(rpc, users, items, LOG_USERS), per_rpc,
                            concurrency, base_seed + len(table))
            seconds[rpc] = time.perf_counter() - started
            table[rpc] = codes
            print(f"  {rpc:10} {sum(codes.values()):6} calls in {seconds[rpc]:6.1f} s: "
                  f"{dict(codes)}", flush=True)
    with RankingClient(server.target) as client:
        alive = client.serving() and bool(client.rank(users[-1], items[:200]).items)
    after = (rss_mb(server.pid), open_fds(server.pid)) if server.pid else None

    every = sorted({code for codes in table.values() for code in codes})
    print()
    print("| RPC | calls | " + " | ".join(every) + " | undocumented |")
    print("|---|---|" + "---|" * (len(every) + 1))
    bad_total = 0
    for rpc, codes in table.items():
        bad = sum(n for code, n in codes.items() if code not in ALLOWED[rpc])
        bad_total += bad
        print(f"| {rpc} | {sum(codes.values())} | "
              + " | ".join(str(codes.get(c, 0)) for c in every) + f" | {bad} |")
    total = sum(sum(c.values()) for c in table.values())
    print(f"\n{total} calls in {sum(seconds.values()):.0f} s; undocumented codes: {bad_total}; "
          f"serving afterwards: {alive}")
    if before and after:
        print(f"server RSS {before[0]:.0f} -> {after[0]:.0f} MB "
              f"({100 * (after[0] / before[0] - 1):+.1f}%), open fds {before[1]} -> {after[1]}")
    return 0 if bad_total == 0 and alive else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--target", help="a running server (default: start a sandbox)")
    parser.add_argument("--server-pid", type=int, help="its pid, for RSS and open fds")
    parser.add_argument("--data-dir", type=Path, help="its data directory (items, users)")
    parser.add_argument("--source", type=Path, help="data directory the sandbox copies")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.target:
        from avrec import config

        server = Server(args.target, args.server_pid or 0, None)
        return fuzz(server, args.data_dir or config.data_dir(), args.calls, args.concurrency,
                    args.seed)
    with sandbox(args.source) as server:
        return fuzz(server, server.data_dir, args.calls, args.concurrency, args.seed)


if __name__ == "__main__":
    sys.exit(main())
