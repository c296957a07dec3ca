"""Rank throughput with 1, 2 and 4 stateless replicas (issue 11): a table, not a test.

    python bench/replicas_bench.py --source DIR [--replicas 1,2,4] [--callers 8] [--seconds 15]

Over a sandbox (``bench/sandbox.py``: a copy of ``DIR/offline``, its models, a Redis of its
own, applied and materialized): 1 replica is the sandbox's own ``avrec serve``; N > 1 are
``avrec serve --replicas N --port 0`` over the same data directory and Redis, reached through
their ``ipv4:`` target with ``round_robin`` (``avrec.server.client.channel_options``). Each point is
``bench/load_gen.py``'s closed loop: ``--callers`` callers over ``--processes`` client
processes, ``--warmup`` s excluded, then ``--seconds`` s measured. Server CPU is summed over
the replicas. Client, servers and Redis share this machine's cores.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import load_gen
import load_schedule
import load_stats
from sandbox import CLOCK, items_and_users, sandbox

HEADER = ("| replicas | callers | Rank OK req/s | vs 1 replica | p50 ms | p99 ms | errors "
          "| server CPU % (all replicas) | server CPU ms/call | client CPU % | load avg |")


def start_replicas(n: int, data_dir: Path, redis_url: str, log: Path
                   ) -> tuple[subprocess.Popen, str, list[int]]:
    """``avrec serve --replicas n`` over the sandbox; its target and replica pids once all
    serve."""
    env = {**os.environ, "AVREC_DATA_DIR": str(data_dir), "REDIS_URL": redis_url}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "avrec.cli", "serve", "--replicas", str(n), "--port", "0",
             "--clock", CLOCK], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while "--replicas: target" not in (text := log.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"replicas did not start:\n{text[-3000:]}")
        time.sleep(1)
    target = re.search(r"--replicas: target (\S+)", text).group(1)
    return process, target, [int(p) for p in re.findall(r"replica \d+ pid (\d+)", text)]


def row(n: int, callers: int, stats: dict, point: dict, base: float | None) -> str:
    ratio = f"{stats['achieved'] / base:.2f}" if base else "1.00"
    return (f"| {n} | {callers} | {stats['achieved']:.1f} | {ratio} | {stats['p50']:.1f} "
            f"| {stats['p99']:.1f} | {load_stats.error_text(stats['errors'])} "
            f"| {point['server_cpu']:.0f} | {point['server_ms_per_call']:.1f} "
            f"| {point['client_cpu']:.0f} | {point['loadavg']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="data directory with a trained model")
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--callers", type=int, default=8, help="closed-loop callers")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.schedule = "poisson"  # unused by the closed loop, read by run_point
    mix = load_schedule.parse_mix("rank")
    lines, base = [], None
    print("python bench/replicas_bench.py " + " ".join(argv or sys.argv[1:]), flush=True)
    with sandbox(args.source) as server:
        args.items, args.users = items_and_users(server.data_dir)
        for n in [int(x) for x in args.replicas.split(",")]:
            process = None
            if n == 1:
                target, pids = server.target, server.pid
            else:
                process, target, found = start_replicas(
                    n, server.data_dir, server.redis_url, server.data_dir / f"replicas{n}.log")
                pids = found
            try:
                point, calls = load_gen.run_point(args, target, pids, "closed",
                                                  float(args.callers), mix, args.seconds)
            finally:
                if process is not None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(120)
            stats = load_stats.summarize(calls, "rank")
            base = base or (stats["achieved"] if n == 1 else None)
            lines.append(row(n, args.callers, stats, point, base))
            print(f"  {target}: {lines[-1]}", flush=True)
    print(f"\n{HEADER}\n|" + "---|" * (HEADER.count("|") - 1))
    print("\n".join(lines))
    print(f"\n{os.cpu_count()} cores; Rank 1x{args.candidates} candidates; load average at the "
          f"end {os.getloadavg()[0]:.2f}; CPU in % of one core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
