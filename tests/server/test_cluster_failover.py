"""A Redis Cluster master SIGKILLed under Rank load: its replica is promoted (the session
cluster's ``cluster-node-timeout`` is 1 s), calls in the window fail with UNAVAILABLE only
(never INTERNAL, never an answer that differs from the one before the kill), and the same
server process answers again within 5 s of the promotion. The killed node is restarted at the
end and rejoins as a replica, so the session's cluster keeps three shards with replicas."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta

import grpc
from grpc_health.v1 import health_pb2

from avrec import tables
from avrec.redis_client import connect
from avrec.server.client import RankingClient
from tests.server.conftest import CLOCK, serve_config, stack_env
from tests.server.test_faults import Load
from tests.server.test_robustness import USER, health_status

DEADLINE = 2.0
RECOVERY_S = 5.0


@dataclass(frozen=True)
class Call:
    started: float
    code: str
    seconds: float
    answer: tuple | None  # (cold start, missing features, {item: score}) when OK


def summary(answer) -> tuple:
    return (answer.cold_start_user, answer.items_missing_features,
            {i.item_id: i.score for i in answer.items})


def same_answer(a: tuple, b: tuple) -> bool:
    """Equal flags and items; scores within 1e-4 (the replay clock moves a few seconds)."""
    return (a[0] == b[0] and a[1] == b[1] and a[2].keys() == b[2].keys()
            and all(abs(a[2][i] - b[2][i]) < 1e-4 for i in a[2]))


class RankLoad(Load):
    """test_faults' Load, keeping each call's start, code and answer (:class:`Call`)."""

    def run(self) -> None:
        with RankingClient(self.target, timeout=DEADLINE) as client:
            while not self.stop.is_set():
                started = self.now()
                try:
                    code, answer = "OK", summary(client.rank(USER, self.items))
                except grpc.RpcError as error:
                    code, answer = error.code().name, None
                self.calls.append(Call(started, code, self.now() - started, answer))
                time.sleep(0.01)


def wait_promoted(cluster, replica: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cluster.node(replica).info("replication").get("role") == "master":
                return
        except Exception:  # polling through the failover
            pass
        time.sleep(0.02)
    raise AssertionError(f"replica {replica} not promoted within {timeout} s")


def test_a_killed_master_fails_over_under_load_without_a_restart(
        cluster_stack, redis_cluster) -> None:
    from avrec.redis_cluster import restart_node
    from avrec.server.app import start

    # a day after the stack's clock: rows other tests' LogEvents stamped after it are served
    clock = (CLOCK + timedelta(days=1)).isoformat()
    with stack_env(cluster_stack):
        service = start(serve_config(cluster_stack, hybrid=False, redis_timeout_seconds=0.5,
                                     clock=clock))
    victim = None
    try:
        target = f"127.0.0.1:{service.port}"
        items = tables.read_table("items", cluster_stack.data_dir / "offline")["item_id"][
            :50].to_list()
        with RankingClient(target, timeout=60) as client:
            reference = summary(client.rank(USER, items))  # warm, and the right answer
        assert not reference[0] and reference[2]
        user_key = service.engine.user_reader.key(USER)
        victim = connect(cluster_stack.redis_url).get_node_from_key(user_key).port
        replica = redis_cluster.replica_of(victim)
        assert replica is not None, "the user's master has no replica"
        with RankLoad(target, items) as load:
            time.sleep(1.5)
            killed = load.now()
            os.kill(redis_cluster.pids[victim], signal.SIGKILL)
            wait_promoted(redis_cluster, replica)
            promoted = load.now()
            time.sleep(RECOVERY_S + 1.5)
        calls = sorted(load.calls, key=lambda c: c.started)
        codes = Counter(c.code for c in calls)
        wrong = [c for c in calls if c.code == "OK" and not same_answer(c.answer, reference)]
        window = Counter(c.code for c in calls if killed <= c.started < promoted)
        first_ok = min(c.started for c in calls if c.code == "OK" and c.started >= promoted)
        print(f"\nmaster {victim} SIGKILLed under Rank load: {len(calls)} calls {dict(codes)}; "
              f"replica {replica} promoted {promoted - killed:.2f} s after the kill "
              f"(calls meanwhile: {dict(window)}); first OK {first_ok - promoted:.2f} s after "
              f"the promotion; slowest call {max(c.seconds for c in calls):.3f} s; "
              f"{len(wrong)} wrong answers")
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes  # never INTERNAL or a deadline
        assert not wrong
        assert {c.code for c in calls if c.started + c.seconds < killed} == {"OK"}
        assert window["UNAVAILABLE"] > 0, window  # the window was exercised
        assert first_ok - promoted <= RECOVERY_S
        assert {c.code for c in calls if c.started >= promoted + RECOVERY_S} == {"OK"}
        assert max(c.seconds for c in calls) < DEADLINE
        assert health_status(service.port) == health_pb2.HealthCheckResponse.SERVING
    finally:
        service.stop(0)
        if victim is not None:
            restart_node(redis_cluster, victim)
