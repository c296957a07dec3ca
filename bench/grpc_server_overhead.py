"""What gRPC itself costs per Rank call: the sync thread-pool server against ``grpc.aio``.

    python bench/grpc_server_overhead.py [--calls 3000] [--rounds 2] [--items 200]

Each server answers ``Rank`` with one prebuilt ``RankResponse`` of ``--items`` scored items
(titles included), so the figures are the framework's alone: request parsing, response
serialization, the server's threads or event loop, loopback. The server runs in its own
process; one sync client in this process sends ``--calls`` sequential calls of 200
candidates after a warm-up. The table gives client-side p50/p99 and the server process's
CPU time per call (user + system, all threads), for each kind in turn, ``--rounds`` times.

The service runs the sync server (``grpc.server`` with a thread pool, ``server/app.py``);
issue 14 suggested ``grpc.aio``. Measured on session 15's 2-core machine (two runs, four
rounds in all): sync p50 0.54-0.58 ms and 0.43-0.44 ms of server CPU per call; aio 0.58-0.72
ms and 0.46-0.61 ms. The sync server stays.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import time
from concurrent import futures

import grpc
import numpy as np
import psutil

from avrec.server.protocol import ranking_pb2, ranking_pb2_grpc

KINDS = ("sync", "aio")


def answer(items: int) -> ranking_pb2.RankResponse:
    """A response of ``items`` scored items, like the service's."""
    response = ranking_pb2.RankResponse(model_version="bench")
    for i in range(items):
        response.items.add(item_id=i, score=0.5, title="A title of a film (1999)")
    return response


class SyncServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, items: int) -> None:
        self.response = answer(items)

    def Rank(self, request, context):
        return self.response


class AioServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, items: int) -> None:
        self.response = answer(items)

    async def Rank(self, request, context):
        return self.response


def serve(kind: str, port: int, items: int) -> None:
    """Run one server of ``kind`` until terminated."""
    if kind == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(SyncServicer(items), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()
        return

    async def run() -> None:
        server = grpc.aio.server()
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(AioServicer(items), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(run())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(port: int, server: psutil.Process, calls: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, server CPU ms per call) of ``calls`` sequential Rank calls."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        request = ranking_pb2.RankRequest(user_id=1, candidate_item_ids=list(range(200)))
        for _ in range(200):  # warm-up
            stub.Rank(request)
        before = server.cpu_times()
        latencies = []
        for _ in range(calls):
            started = time.perf_counter()
            stub.Rank(request)
            latencies.append(time.perf_counter() - started)
        after = server.cpu_times()
    cpu = (after.user + after.system) - (before.user + before.system)
    p50, p99 = np.percentile(np.asarray(latencies) * 1e3, [50, 99])
    return float(p50), float(p99), cpu / calls * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--items", type=int, default=200)
    args = parser.parse_args()
    print(f"{'server':<8}{'round':>6}{'p50 ms':>9}{'p99 ms':>9}{'server CPU ms/call':>20}")
    for round_ in range(1, args.rounds + 1):
        for kind in KINDS:
            port = free_port()
            process = multiprocessing.Process(target=serve, args=(kind, port, args.items),
                                              daemon=True)
            process.start()
            try:
                assert process.pid is not None
                p50, p99, cpu = measure(port, psutil.Process(process.pid), args.calls)
            finally:
                process.terminate()
                process.join()
            print(f"{kind:<8}{round_:>6}{p50:>9.3f}{p99:>9.3f}{cpu:>20.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
