"""A Redis that hangs (SIGSTOP: connections stay open, nothing answers), under Rank load, on
both gRPC servers. The server answers UNAVAILABLE once a read has waited
``redis_timeout_seconds``; ``RankingClient`` retries UNAVAILABLE (its service config), so
its calls end UNAVAILABLE or past their deadline, never INTERNAL or UNKNOWN. The process
stays up and answers again within 2 s of Redis resuming. On the event-loop server (``aio``)
a hung read blocks the loop, so calls wait behind one another (README, Benchmarks, session
19): the counts of both are printed."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from avrec.server.config import GRPC_SERVERS
from tests.server.test_faults import Load, serve_on_own_redis

HANG = 3.0  # seconds Redis is stopped


@pytest.mark.parametrize("server", GRPC_SERVERS)
def test_a_hung_redis_fails_calls_cleanly_and_recovers(stack, tmp_path: Path, server) -> None:
    service, pid, _, items = serve_on_own_redis(stack, tmp_path, grpc_server=server)
    try:
        with Load(f"127.0.0.1:{service.port}", items) as load:
            time.sleep(1.0)
            stopped = load.now()
            os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(HANG)
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed = load.now()
            time.sleep(3.0)
        every = Counter(code for _, code, _ in load.calls)
        assert set(load.codes(0, stopped)) == {"OK"}, load.codes(0, stopped)
        assert set(every) <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, every
        assert set(load.codes(stopped + 1.0, resumed)) - {"OK"}, "no call failed while hung"
        first_ok = min(t for t, code, _ in load.calls if code == "OK" and t > resumed)
        assert first_ok - resumed <= 2.0
        assert set(load.codes(first_ok + 0.5)) == {"OK"}, load.codes(first_ok + 0.5)
        print(f"\n{server}: Redis stopped {HANG} s under 4 callers: "
              f"{dict(load.codes(stopped, resumed))} while hung; first OK "
              f"{first_ok - resumed:.3f} s after it resumed")
    finally:
        service.stop(0)
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGTERM)
