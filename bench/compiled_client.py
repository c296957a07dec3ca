"""Rank latency seen by a compiled gRPC client beside the Python one, against a running service.

    python bench/compiled_client.py [--target 127.0.0.1:50051] [--closed 1,16]
                                    [--seconds 10] [--warmup 3] [--candidates 200]

Issue 14 asks for a load generator that is not the bottleneck, "a compiled one if one installs
here". Debian's gRPC C++ does (``apt-get install libgrpc++-dev protobuf-compiler-grpc``):
this script builds ``bench/rank_client.cc`` against ``proto/avrec/v1/ranking.proto`` (once,
into ``~/.cache/avrec/rank_client/<hash of both>``, a few seconds of g++), writes 256 Rank
requests of random active users and ``--candidates`` random catalogue items (as
``bench/load_gen.py`` draws them), and runs each closed-loop point twice, alternately: the C++
client (one thread and channel per caller) and ``bench/load_gen.py``'s Python ``grpc.aio``
client processes (its ``--json`` output). Per row: p50/p90/p99/max, requests/s, the client's
CPU (% of one core) and the server's CPU per call (the process listening on the target's
port; summed over replicas). The difference of the p50s at one caller is what the Python
client adds to the latency it reports.

Needs the README main command's data (users and items) and a running ``avrec serve``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "bench" / "rank_client.cc"
PROTO = ROOT / "proto" / "avrec" / "v1" / "ranking.proto"
TOOLS = ("protoc", "grpc_cpp_plugin", "pkg-config", "g++")
INSTALL = "apt-get install libgrpc++-dev protobuf-compiler-grpc protobuf-compiler pkg-config"
REQUESTS = 256


def build(cache: Path) -> Path:
    """The compiled client, built when its sources changed; SystemExit naming the packages
    when the tools are missing."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode:
        raise SystemExit(f"the C++ gRPC toolchain is missing ({', '.join(missing) or 'grpc++'}"
                         f"): {INSTALL}")
    digest = hashlib.sha256(SOURCE.read_bytes() + PROTO.read_bytes()).hexdigest()[:12]
    out = cache / digest
    binary = out / "rank_client"
    if binary.exists():
        return binary
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["protoc", f"-I{ROOT / 'proto'}", "-I/usr/include", f"--cpp_out={out}",
                    f"--grpc_out={out}", "--plugin=protoc-gen-grpc="
                    + str(shutil.which("grpc_cpp_plugin")), str(PROTO)], check=True)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "grpc++", "protobuf"],
                           check=True, capture_output=True, text=True).stdout.split()
    generated = out / "avrec" / "v1"
    subprocess.run(["g++", "-O2", "-std=c++17", f"-I{out}", str(SOURCE),
                    str(generated / "ranking.pb.cc"), str(generated / "ranking.grpc.pb.cc"),
                    "-o", str(binary), *flags, "-lpthread"], check=True)
    return binary


def write_requests(path: Path, users: list[int], items: list[int], candidates: int,
                   seed: int) -> None:
    """``REQUESTS`` serialized RankRequests, each after its length (little-endian uint32)."""
    from avrec.server.protocol import ranking_pb2

    rng = random.Random(seed)
    with path.open("wb") as out:
        for _ in range(REQUESTS):
            body = ranking_pb2.RankRequest(user_id=rng.choice(users), candidate_item_ids=rng.sample(
                items, candidates)).SerializeToString()
            out.write(struct.pack("<I", len(body)) + body)


def run_compiled(binary: Path, target: str, requests: Path, callers: int, warmup: float,
                 seconds: float, pid: int | list[int] | None) -> dict:
    """One closed-loop point of the C++ client, with the server's CPU per call."""
    from load_gen import server_cpu

    def run(length: float) -> dict:
        done = subprocess.run([str(binary), target, str(requests), str(callers), "0",
                               str(length)], check=True, capture_output=True, text=True)
        return json.loads(done.stdout)

    run(warmup)  # its own process: the server's CPU below counts the measured calls alone
    before = server_cpu(pid)
    row = run(seconds)
    served = server_cpu(pid) - before
    return {"p50": row["p50_ms"], "p90": row["p90_ms"], "p99": row["p99_ms"],
            "max": row["max_ms"], "rate": row["rate"], "calls": row["calls"],
            "errors": row["errors"], "client_cpu": 100 * row["client_cpu_s"] / row["wall_s"],
            "server_ms": 1e3 * served / max(1, row["calls"] + row["errors"])}


def run_python(target: str, callers: int, warmup: float, seconds: float,
               candidates: int) -> dict:
    """The same point from ``bench/load_gen.py``'s Python ``grpc.aio`` client processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "point.json"
        subprocess.run([sys.executable, str(ROOT / "bench" / "load_gen.py"), "--target", target,
                        "--closed", str(callers), "--warmup", str(warmup), "--seconds",
                        str(seconds), "--candidates", str(candidates), "--json", str(out)],
                       check=True, capture_output=True, text=True)
        (point,) = json.loads(out.read_text())
    rank = point["methods"]["rank"]
    return {"p50": rank["p50"], "p90": rank["p90"], "p99": rank["p99"], "max": rank["max"],
            "rate": rank["achieved"], "calls": rank["calls"],
            "errors": sum(rank["errors"].values()), "client_cpu": point["client_cpu"],
            "server_ms": point["server_ms_per_call"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--closed", default="1,16", help="closed-loop caller counts")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1, help="C++ and Python, alternately")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path,
                        default=Path.home() / ".cache" / "avrec" / "rank_client")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from load_gen import pid_on_port, target_ports
    from sandbox import items_and_users

    from avrec import config

    binary = build(args.cache)
    items, users = items_and_users(config.data_dir())
    pids = [pid_on_port(port) for port in target_ports(args.target)]
    pid = pids[0] if len(pids) == 1 else (None if None in pids else pids)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        requests = Path(tmp) / "requests.bin"
        write_requests(requests, users, items, args.candidates, args.seed)
        for _ in range(args.rounds):
            for callers in (int(n) for n in args.closed.split(",") if n.strip()):
                for client in ("C++", "Python aio"):
                    row = (run_compiled(binary, args.target, requests, callers, args.warmup,
                                        args.seconds, pid) if client == "C++"
                           else run_python(args.target, callers, args.warmup, args.seconds,
                                           args.candidates))
                    rows.append({"client": client, "callers": callers, **row})
                    print(f"  {client:10} {callers:3} callers  p50 {row['p50']:7.2f} ms  "
                          f"{row['rate']:7.1f} req/s", flush=True)
    print(f"\nRank 1x{args.candidates} against {args.target} (server pid {pid}); "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}\n")
    print("| client | callers | calls | p50 ms | p90 ms | p99 ms | max ms | req/s | errors "
          "| client CPU % | server CPU ms/call |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['client']} | {r['callers']} | {r['calls']} | {r['p50']:.2f} | "
              f"{r['p90']:.2f} | {r['p99']:.2f} | {r['max']:.1f} | {r['rate']:.0f} | "
              f"{r['errors']} | {r['client_cpu']:.0f} | {r['server_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
