"""Rank latency of this checkout's service against an earlier commit's, alternately, one machine.

    git archive COMMIT | tar -x -C /tmp/before
    python bench/rank_before_after.py --before /tmp/before [--closed 1,16] [--rounds 3]
                                      [--seconds 8] [--warmup 2]

A shared 2-core machine drifts by a millisecond within minutes, so a latency change is shown
only by the two versions measured turn about. This starts ``avrec serve`` twice on the README
main command's data (replay clock 2018-09-25, the newest model): from ``--before`` (a view of
the copy, :func:`events_bench.code_view`, so that ``avrec.server`` really comes from it) and
from this checkout; then, ``--rounds`` times, each in turn gets every ``--closed`` point from
``bench/compiled_client.py``'s C++ client (the same prebuilt Rank 1x200 requests), with the
server's CPU per call. The table ends with each version's median p50 and their ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLOCK = "2018-09-25T00:00:00+00:00"
START_SECONDS = 180.0


def start_server(code: Path | None, port: int, log: Path) -> subprocess.Popen:
    """``avrec serve`` on ``port`` from ``code`` (a :func:`code_view`) or this checkout."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    env.setdefault("AVREC_DATA_DIR", str(ROOT / "data"))
    return subprocess.Popen(
        [sys.executable, "-m", "avrec.cli", "serve", "--port", str(port), "--metrics-port", "0",
         "--clock", CLOCK], cwd=code or ROOT, env=env, stdout=log.open("w"),
        stderr=subprocess.STDOUT)


def wait_serving(port: int, server: subprocess.Popen, log: Path) -> None:
    """Until the server's health check answers SERVING; SystemExit if it exits first."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + START_SECONDS
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server on {port} exited: {log.read_text()[-2000:]}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise SystemExit(f"the server on {port} did not serve within {START_SECONDS:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True,
                        help="an earlier tree (git archive COMMIT | tar -x -C DIR)")
    parser.add_argument("--closed", default="1,16", help="closed-loop caller counts")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/avrec-rank-before-after"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from compiled_client import build, run_compiled, write_requests
    from events_bench import code_view
    from sandbox import free_port, items_and_users

    from avrec import config

    binary = build(Path.home() / ".cache" / "avrec" / "rank_client")
    items, users = items_and_users(config.data_dir())
    args.workdir.mkdir(parents=True, exist_ok=True)
    versions = {"before": code_view(args.before.resolve(), args.workdir), "this checkout": None}
    servers, ports = {}, {}
    try:
        for name, code in versions.items():
            ports[name] = free_port()
            log = args.workdir / f"{name.replace(' ', '-')}.log"
            servers[name] = start_server(code, ports[name], log)
            wait_serving(ports[name], servers[name], log)
        rows = []
        callers_list = [int(n) for n in args.closed.split(",") if n.strip()]
        with tempfile.TemporaryDirectory() as tmp:
            requests = Path(tmp) / "requests.bin"
            write_requests(requests, users, items, args.candidates, args.seed)
            for round_ in range(1, args.rounds + 1):
                for name in versions:
                    for callers in callers_list:
                        row = run_compiled(binary, f"127.0.0.1:{ports[name]}", requests,
                                           callers, args.warmup, args.seconds,
                                           servers[name].pid)
                        rows.append({"code": name, "round": round_, "callers": callers, **row})
                        print(f"  {name:14} round {round_} {callers:3} callers  p50 "
                              f"{row['p50']:6.2f} ms  {row['rate']:6.0f} req/s", flush=True)
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(60)
    print(f"\nRank 1x{args.candidates}, C++ closed-loop client, {os.cpu_count()} cores, load "
          f"average {os.getloadavg()[0]:.2f}; before: {args.before}\n")
    print("| code | round | callers | p50 ms | p90 ms | p99 ms | req/s | server CPU ms/call |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['code']} | {r['round']} | {r['callers']} | {r['p50']:.2f} | "
              f"{r['p90']:.2f} | {r['p99']:.2f} | {r['rate']:.0f} | {r['server_ms']:.2f} |")
    print()
    for callers in callers_list:
        medians = {name: float(np.median([r["p50"] for r in rows if r["code"] == name
                                          and r["callers"] == callers])) for name in versions}
        rates = {name: float(np.median([r["rate"] for r in rows if r["code"] == name
                                        and r["callers"] == callers])) for name in versions}
        before, now = medians["before"], medians["this checkout"]
        print(f"{callers} callers: median p50 before {before:.2f} ms, this checkout "
              f"{now:.2f} ms (x{now / before:.2f}); "
              f"req/s {rates['before']:.0f} -> {rates['this checkout']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
