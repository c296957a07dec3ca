"""Stopping a service waits for a snapshot reload in flight: the reload runs on a daemon
thread inside numpy and onnxruntime, and a process that exits under it aborts
("terminate called without an active exception", once seen in CI as exit -6)."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health

from avrec.server.app import Service
from avrec.server.engine import RankingEngine


class ReloadingEngine:
    """The engine's reload bookkeeping alone (a unit test of the stop path): one reload
    thread in flight, and the engine's own ``wait_for_reload``."""

    wait_for_reload = RankingEngine.wait_for_reload
    snapshot_process = None  # reloads in process

    def __init__(self, seconds: float) -> None:
        self.finished = threading.Event()

        def reload() -> None:
            time.sleep(seconds)
            self.finished.set()

        self._reloader = threading.Thread(target=reload, daemon=True)
        self._reloader.start()


def test_stop_waits_for_a_reload_in_flight() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    engine = ReloadingEngine(0.5)
    Service(server, port, engine, health.HealthServicer()).stop(0)
    assert engine.finished.is_set()
