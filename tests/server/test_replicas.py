"""Stateless replicas: ``avrec serve --replicas 2`` as a process of its own,
its two servers reached through one channel with ``round_robin`` and retries
(``avrec.server.client.RankingClient``), over real loopback gRPC. Slow: the session's ``stack``."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest

from avrec import tables
from avrec.server.client import RankingClient
from tests.server.conftest import CLOCK, env_of
from tests.server.test_robustness import USER

pytestmark = pytest.mark.slow


@dataclass
class Running:
    process: subprocess.Popen
    target: str
    pids: list[int]
    addresses: list[str]
    metrics: list[int]
    items: list[int]


def consecutive_free_ports(n: int) -> int:
    """The first of ``n`` consecutive loopback ports that are free now."""
    for _ in range(200):
        first = random.randint(20_000, 60_000)
        sockets = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(sockets):
                s.bind(("127.0.0.1", first + i))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no run of free ports")


@pytest.fixture(scope="module")
def replicas(stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """``python -m avrec.server.app --replicas 2`` on free ports, metrics on two consecutive
    ones."""
    log_path = tmp_path_factory.mktemp("replicas") / "serve.log"
    metrics = consecutive_free_ports(2)
    command = [sys.executable, "-m", "avrec.server.app", "--replicas", "2", "--port", "0",
               "--metrics-port", str(metrics), "--clock", CLOCK.isoformat(),
               "--model-dir", str(stack.model_dir), "--redis-url", stack.redis_url]
    with log_path.open("w") as out:
        process = subprocess.Popen(command, env=env_of(stack), stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while "--replicas: target" not in (text := log_path.read_text()):
            assert process.poll() is None and time.monotonic() < deadline, text[-3000:]
            time.sleep(0.5)
        started = time.monotonic() + 600 - deadline
        print(f"\navrec serve --replicas 2: serving after {started:.1f} s")
        target = re.search(r"--replicas: target (\S+)", text).group(1)
        found = re.findall(r"replica \d pid (\d+) port (\d+), metrics (\d+)", text)
        items = tables.read_table("items", stack.data_dir / "offline")["item_id"][:50].to_list()
        yield Running(process, target, [int(p) for p, _, _ in found],
                      [f"127.0.0.1:{port}" for _, port, _ in found],
                      [int(m) for _, _, m in found], items)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    text = log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "signal 15, stopping 2 replicas" in text


def rank_calls(metrics_port: int) -> int:
    """``avrec_requests_total{method="Rank",code="OK"}`` of one replica."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if (line.startswith("avrec_requests_total{") and 'method="Rank"' in line
                and 'code="OK"' in line):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_the_target_lists_every_replica(replicas: Running) -> None:
    assert replicas.target == "ipv4:" + ",".join(replicas.addresses)
    assert len(set(replicas.pids)) == 2 and len(replicas.metrics) == 2


def test_events_logged_through_one_replica_are_seen_through_the_other_at_once(
    replicas: Running,
) -> None:
    """LogEvents through replica A, then Recommend and Rank through replica B at once: B
    serves the user's new rows (no longer cold, their history left out), as A does."""
    from avrec.server.protocol import ranking_pb2

    user, run = 43_000_000 + random.randint(0, 99_999), uuid.uuid4().hex[:8]
    first, second = replicas.addresses
    with RankingClient(first) as a, RankingClient(second) as b:
        before = b.recommend(user, top_k=20)
        assert before.cold_start_user
        rated = [item.item_id for item in before.items[:3]]
        events = [ranking_pb2.Event(user_id=user, item_id=item, event_type="rating",
                                    rating=5.0, event_id=f"{run}-{item}") for item in rated]
        assert a.log_events(events).accepted == 3
        after = b.recommend(user, top_k=20)
        ranked = b.rank(user, replicas.items)
        same_on_a = a.recommend(user, top_k=20)
    assert not after.cold_start_user and not ranked.cold_start_user
    assert not set(rated) & {item.item_id for item in after.items}  # history left out
    assert [i.item_id for i in after.items] != [i.item_id for i in before.items]
    stamps = {v.feature_view: v.HasField("event_timestamp") for v in after.user_features}
    assert stamps.get("user_behaviour"), stamps
    assert [i.item_id for i in after.items] == [i.item_id for i in same_on_a.items]


def test_round_robin_spreads_calls_over_the_replicas(replicas: Running) -> None:
    with RankingClient(replicas.target) as client:
        for _ in range(6):  # both subchannels connected
            client.rank(USER, replicas.items)
        before = [rank_calls(m) for m in replicas.metrics]
        for _ in range(40):
            client.rank(USER, replicas.items)
    spread = [rank_calls(m) - b for m, b in zip(replicas.metrics, before, strict=True)]
    assert sum(spread) == 40 and min(spread) >= 10, spread


def test_a_replica_killed_under_load_costs_no_call(replicas: Running) -> None:
    """4 threads call Rank through the two-replica target; one replica is SIGKILLed; the
    calls in flight on it and those picked before its loss was seen are retried on the
    other (UNAVAILABLE is retryable): 0 failed calls."""
    calls: list[tuple[float, str]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def load() -> None:
        with RankingClient(replicas.target, timeout=10) as client:
            while not stop.is_set():
                try:
                    client.rank(USER, replicas.items)
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                calls.append((time.monotonic() - t0, code))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        while len(calls) < 40 and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        before = [rank_calls(m) for m in replicas.metrics]
        killed_at = time.monotonic() - t0
        os.kill(replicas.pids[1], signal.SIGKILL)
        time.sleep(4.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    codes = Counter(code for _, code in calls)
    after_kill = Counter(code for t, code in calls if t >= killed_at)
    print(f"\nreplica kill: {len(calls)} calls {dict(codes)}, after the kill {dict(after_kill)}"
          f"; Rank OK per replica before the kill {before}")
    assert codes == Counter({"OK": len(calls)}), codes
    assert after_kill["OK"] >= 10 and min(before) > 0
