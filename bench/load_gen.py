"""An open- and closed-loop load generator for a running ranking service (issue 14, item 4).

    python bench/load_gen.py --target 127.0.0.1:50051 --closed 1,2,4 --rates 50,100,200
    python bench/load_gen.py --rates 100 --schedule uniform \
        --mix rank=0.7,recommend=0.2,logevents=0.1
    python bench/load_gen.py --closed 1 --rates 50,100,200 --feast-baseline   # + the Feast-SDK row

Each load point runs ``--processes`` client processes (``multiprocessing``, spawned), each with
one ``grpc.aio`` channel, so the Python client is spread over processes rather than being one
GIL-bound thread pool:

* **open loop** (``--rates R1,R2,...``, requests/s in all): every process gets its share of the
  rate as a Poisson (default) or uniform arrival schedule fixed in advance; a call is sent at
  its scheduled time whether or not earlier calls have answered, and its latency is counted
  **from the scheduled time**, so a late send (a busy client) and queueing in the server are
  both in the figures (no coordinated omission). ``send lag p99`` is how late the client sent:
  when it is large, the generator, not the server, is the bottleneck.
* **closed loop** (``--closed N1,N2,...``): N callers spread over the processes, each sending
  its next call when the previous one answered (latency from the send).

The first ``--warmup`` seconds of every point (calls *scheduled* then) are excluded; the
statistics cover the calls scheduled in the next ``--seconds``. Achieved rate = those answered OK /
(last answer - window start): a server that falls behind drains its queue after the window
and the rate shows it. Per point: p50/p90/p99/max ms, errors by status code, the CPU of the
client processes and of the server (user + system, % of one core, over the same window;
the server found by the port it listens on, or ``--server-pid``) and the load average.

RPC mix (``--mix``): ``rank`` (1 x ``--candidates`` random catalogue items for a recently
active user), ``recommend`` (top 20), ``logevents`` (1 to 3 ratings of users in
``LOAD_USERS``, a reserved id range no real user has, so real users' rows are never touched;
their events do go to the serving data directory's event log).

``--feast-baseline`` adds, in the same run, a row for the Feast-SDK online read path:
``bench/serve_bench.py --serve feast-sdk`` (the same service whose Rank reads every feature
through Feast's ``get_online_features``; the deep ranker serves it) started on a free port
over the same data directory and Redis, driven with ``rank`` at 1 closed-loop caller for
``--feast-seconds``; the closed-loop 1-caller Rank row then shows the ratio of its p50 to
that one's.

Catalogue and users come from ``$AVREC_DATA_DIR`` (the service's data directory).
The schedules and mix are in ``load_schedule.py``, a client process in ``load_client.py``,
the figures and the table in ``load_stats.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

from load_client import worker
from load_schedule import METHODS, parse_mix, split
from load_stats import HEADER, Calls, rows, summarize


def server_cpu(pid: int | list[int] | None) -> float:
    """User + system CPU seconds of the server (summed over replicas when a list)."""
    if not pid:
        return math.nan
    import psutil

    total = 0.0
    for one in pid if isinstance(pid, list) else [pid]:
        times = psutil.Process(one).cpu_times()
        total += times.user + times.system
    return total


def target_ports(target: str) -> list[int]:
    """The ports of a target: ``HOST:PORT`` or gRPC's ``ipv4:H:P,H:P`` (replicas)."""
    addresses = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    return [int(a.rsplit(":", 1)[1]) for a in addresses.split(",")]


def pid_on_port(port: int) -> int | None:
    """The process listening on ``port`` (None when not visible)."""
    import psutil

    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None


def run_point(args: argparse.Namespace, target: str, pid: int | list[int] | None, mode: str,
              level: float, mix: tuple[float, float, float], seconds: float
              ) -> tuple[dict, Calls]:
    """One load point: spawn the client processes, run, gather their calls and CPU."""
    ctx = mp.get_context("spawn")
    if mode == "closed":
        shares = [{"callers": n} for n in split(int(level), args.processes)]
    else:
        shares = [{"rate": level / args.processes, "phase": i / args.processes}
                  for i in range(args.processes)]
    base = {"target": target, "mode": mode, "mix": mix, "candidates": args.candidates,
            "items": args.items, "users": args.users, "warmup": args.warmup, "seconds": seconds,
            "schedule": args.schedule, "timeout": args.timeout}
    procs, pipes = [], []
    for i, share in enumerate(shares):
        parent, child = ctx.Pipe()
        spec = {**base, **share, "seed": args.seed * 1000 + i}
        proc = ctx.Process(target=worker, args=(spec, child), daemon=True)
        proc.start()
        child.close()
        procs.append(proc)
        pipes.append(parent)
    try:
        for pipe in pipes:
            if not pipe.poll(120):
                raise RuntimeError("a client process did not get ready in 120 s")
            got = pipe.recv()
            if isinstance(got, Exception):
                raise got
        start = time.time() + 0.2
        for pipe in pipes:
            pipe.send(start)
        time.sleep(max(0.0, start + args.warmup - time.time()))
        window_start, cpu_start = time.perf_counter(), server_cpu(pid)
        calls, client_cpu = Calls(), 0.0
        for pipe in pipes:
            got = pipe.recv()
            if isinstance(got, Exception):
                raise got
            calls.extend(got["calls"])
            client_cpu += got["cpu"]
        window = time.perf_counter() - window_start
        served = server_cpu(pid) - cpu_start
        point = {"path": "avrec", "target": target, "mode": mode, "level": level,
                 "schedule": args.schedule,
                 "mix": dict(zip(METHODS, mix, strict=True)), "candidates": args.candidates,
                 "client_cpu": 100 * client_cpu / window, "server_cpu": 100 * served / window,
                 "server_ms_per_call": 1e3 * served / max(1, len(calls.method)),
                 "loadavg": os.getloadavg()[0]}
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
    return point, calls


def feast_server(port: int) -> subprocess.Popen:
    """``bench/serve_bench.py --serve feast-sdk`` on ``port``, once it says ready."""
    script = Path(__file__).with_name("serve_bench.py")
    server = subprocess.Popen([sys.executable, str(script), "--serve", "feast-sdk",
                               "--port", str(port)], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    while (line := server.stdout.readline()) and line.strip() != "ready":
        pass
    if server.poll() is not None:
        raise RuntimeError(f"feast-sdk server exited with {server.returncode}")
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051",
                        help="HOST:PORT, or replicas: ipv4:HOST:PORT,HOST:PORT (round_robin)")
    parser.add_argument("--server-pid", type=int, help="default: the process on the port")
    parser.add_argument("--rates", default="", help="open-loop rates, req/s in all: 50,100")
    parser.add_argument("--closed", default="", help="closed-loop caller counts: 1,2,4")
    parser.add_argument("--schedule", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured, per point")
    parser.add_argument("--warmup", type=float, default=3.0, help="excluded, per point")
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--mix", default="rank", help="e.g. rank=0.7,recommend=0.2,logevents=0.1")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline (s)")
    parser.add_argument("--feast-baseline", action="store_true",
                        help="also the Feast-SDK path (bench/serve_bench.py), 1 caller, Rank")
    parser.add_argument("--feast-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every point's figures here")
    args = parser.parse_args(argv)
    mix = parse_mix(args.mix)
    points = [("closed", float(n)) for n in args.closed.split(",") if n.strip()]
    points += [("open", float(r)) for r in args.rates.split(",") if r.strip()]
    if not points:
        parser.error("give --closed and/or --rates")

    from sandbox import free_port, items_and_users

    from avrec import config

    items, users = items_and_users(config.data_dir())
    args.items, args.users = items, users
    pids = [args.server_pid] if args.server_pid else [pid_on_port(p)
                                                      for p in target_ports(args.target)]
    pid = pids[0] if len(pids) == 1 else (None if None in pids else pids)
    print("python bench/load_gen.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"load_gen {args.target} (server pid {pid}): mix {args.mix}, Rank 1x{args.candidates}, "
          f"{args.processes} client processes, {args.warmup:g} s warm-up + {args.seconds:g} s "
          f"per point; {len(items)} items, {len(users)} users; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for mode, level in points:
        point, calls = run_point(args, args.target, pid, mode, level, mix, args.seconds)
        results.append((point, calls))
        print("  " + rows(point, calls, mix, None)[-1], flush=True)

    feast_p50, feast = None, []
    if args.feast_baseline:
        port = free_port()
        print(f"feast-sdk baseline: bench/serve_bench.py --serve feast-sdk on port {port}",
              flush=True)
        server = feast_server(port)
        try:
            rank_only = parse_mix("rank")
            point, calls = run_point(args, f"127.0.0.1:{port}", server.pid, "closed", 1.0,
                                     rank_only, args.feast_seconds)
        finally:
            server.terminate()
            server.wait(60)
        point["path"] = "feast-sdk"
        feast_p50 = summarize(calls, "rank")["p50"]
        feast = [(point, calls)]

    print()
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for point, calls in results:  # the ratio where the load is the baseline's: 1 caller
        same = (point["mode"], point["level"]) == ("closed", 1.0)
        print("\n".join(rows(point, calls, mix, feast_p50 if same else None)))
    for point, calls in feast:
        print("\n".join(rows(point, calls, parse_mix("rank"), None)))
    if args.json:
        args.json.write_text(json.dumps(
            [{**p, "methods": {m: summarize(c, m) for m in METHODS if m in c.method}}
             for p, c in [*results, *feast]], indent=1))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; CPU in % of one core of "
          f"{os.cpu_count()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
