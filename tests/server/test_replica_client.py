"""The client's service config over several servers (fast: tiny in-process gRPC servers, no
model or Redis): round_robin spreads calls, UNAVAILABLE is retried on Rank and Recommend and
never on LogEvents; the pure parts of ``avrec serve --replicas``."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from avrec.server.client import RETRIED_METHODS, RankingClient, service_config
from avrec.server.protocol import ranking_pb2, ranking_pb2_grpc


class Replica(ranking_pb2_grpc.RankingServiceServicer):
    """Answers with its name as the model version; ``down``: aborts with UNAVAILABLE."""

    def __init__(self, name: str, down: bool = False) -> None:
        self.name, self.down, self.calls = name, down, Counter()

    def _answer(self, method: str, context: grpc.ServicerContext) -> ranking_pb2.RankResponse:
        self.calls[method] += 1
        if self.down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        return ranking_pb2.RankResponse(model_version=self.name)

    def Rank(self, request, context):
        return self._answer("Rank", context)

    def Recommend(self, request, context):
        return self._answer("Recommend", context)

    def LogEvents(self, request, context):
        self.calls["LogEvents"] += 1
        if self.down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "going away")
        return ranking_pb2.LogEventsResponse(accepted=len(request.events))


@pytest.fixture()
def two() -> Iterator[tuple[list[Replica], str]]:
    replicas, servers, ports = [Replica("a"), Replica("b")], [], []
    for replica in replicas:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(replica, server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    yield replicas, "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    for server in servers:
        server.stop(0)


def test_service_config_names_round_robin_and_the_retried_methods() -> None:
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert [n["method"] for n in method["name"]] == list(RETRIED_METHODS) == ["Rank",
                                                                             "Recommend"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_round_robin_spreads_calls_over_the_target(two) -> None:
    replicas, target = two
    with RankingClient(target) as client:
        # round_robin alternates over the *ready* subchannels: call until both have answered
        # (on a loaded machine the second one may still be connecting after two calls)
        deadline = time.monotonic() + 10.0
        while not all(r.calls for r in replicas) and time.monotonic() < deadline:
            client.rank(1, [1])
        for replica in replicas:
            replica.calls.clear()
        answers = Counter(client.rank(1, [1]).model_version for _ in range(20))
    assert answers == Counter({"a": 10, "b": 10})


def test_unavailable_is_retried_on_reads_and_not_on_log_events(two) -> None:
    replicas, target = two
    replicas[0].down = True
    with RankingClient(target) as client:
        answers = [client.rank(1, [1]).model_version for _ in range(10)]
        answers += [client.recommend(1).model_version for _ in range(10)]
        assert answers == ["b"] * 20
        assert replicas[0].calls["Rank"] + replicas[0].calls["Recommend"] > 0  # were retried
        codes = Counter()
        for _ in range(10):
            try:
                client.log_events([ranking_pb2.Event(user_id=1, item_id=1, event_type="tag")])
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[error.code().name] += 1
    assert codes["UNAVAILABLE"] == replicas[0].calls["LogEvents"] > 0


def test_replica_ports_targets_and_argv() -> None:
    from avrec.server.replicas import ports_for, replica_command, replica_options, target_of

    assert ports_for(3, 50051) == [50051, 50052, 50053]
    assert len(set(ports_for(4, 0))) == 4
    assert target_of("0.0.0.0", [1, 2]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert target_of("::1", [3]) == "ipv6:[::1]:3"
    argv = replica_options(None, {"clock": "x", "port": 9, "model_watch_seconds": 0.5})
    assert argv == ["--clock", "x", "--port", "9", "--model-watch-seconds", "0.5"]
    assert replica_command(argv, 7, 8)[-4:] == ["--port", "7", "--metrics-port", "8"]


def test_replay_clocks_with_one_anchor_agree() -> None:
    """Replicas started apart share the replay time (``clock_anchor``); without it the later
    one runs behind by the gap."""
    import time
    from datetime import UTC, datetime

    from avrec.server.clock import Clock

    start, anchor = datetime(2018, 9, 25, tzinfo=UTC), time.time()
    first, plain = Clock(start, anchor), Clock(start)
    time.sleep(0.2)
    second, late = Clock(start, anchor), Clock(start)
    assert abs((first.now() - second.now()).total_seconds()) < 0.01
    assert (plain.now() - late.now()).total_seconds() > 0.15
