"""One contract, both gRPC servers ``avrec serve`` can run (``grpc_server``): ``aio`` (the
default, :mod:`avrec.server.loop_server`) and ``threads`` (grpc's thread-pool server).

The rest of the suite runs on the default; here each server answers Rank and Recommend as
the engine does in process, refuses what it must with the documented codes, serves
concurrent callers and concurrent LogEvents, and runs each call where its design says.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import numpy as np
import pytest

from avrec.server.client import RankingClient
from avrec.server.config import GRPC_SERVERS
from avrec.server.engine import RankingEngine
from avrec.server.protocol import ranking_pb2
from avrec.server.service import to_proto
from tests.server.conftest import serve_config, stack_env
from tests.server.test_write_token import code_of

USERS = (414, 1, 599, 68, 40_000_001)  # active, expired, active, active, unknown (cold)
CANDIDATES = [1, 2, 3, 50, 260, 296, 318, 356, 593, 1196]


class ThreadNoting(RankingEngine):
    """The engine, noting the name of the thread each Rank and Recommend ran on."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threads: list[str] = []

    def rank(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return super().rank(*args, **kwargs)

    def recommend(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return super().recommend(*args, **kwargs)


@pytest.fixture(scope="module", params=GRPC_SERVERS)
def served(request: pytest.FixtureRequest, stack) -> Iterator[object]:
    from avrec.server.app import start

    with stack_env(stack):
        service = start(serve_config(stack, grpc_server=request.param), ThreadNoting)
    service.kind = request.param
    yield service
    service.stop(0)


def items(answer: ranking_pb2.RankResponse) -> list[tuple[int, float, str]]:
    return [(i.item_id, i.score, i.title) for i in answer.items]


def assert_same(got: ranking_pb2.RankResponse, expected: ranking_pb2.RankResponse) -> None:
    """The same items and titles in the same order, scores to float32 rounding (the replay
    clock moves between two calls, and with it a user's days since their last rating)."""
    assert [(i, t) for i, _, t in items(got)] == [(i, t) for i, _, t in items(expected)]
    np.testing.assert_allclose([s for _, s, _ in items(got)],
                               [s for _, s, _ in items(expected)], rtol=1e-5)


def test_answers_equal_the_engine_in_process(served) -> None:
    engine = served.engine
    with RankingClient(f"127.0.0.1:{served.port}") as client:
        for user in USERS:
            assert_same(client.rank(user, CANDIDATES), to_proto(engine.rank(user, CANDIDATES)))
            assert_same(client.recommend(user, 15), to_proto(engine.recommend(user, 15)))


def test_bad_requests_get_their_codes(served) -> None:
    with RankingClient(f"127.0.0.1:{served.port}") as client:
        assert code_of(lambda: client.rank(414, [])) == "INVALID_ARGUMENT"
        assert code_of(lambda: client.rank(414, [1, 1])) == "INVALID_ARGUMENT"
        assert code_of(lambda: client.rank(414, [10**12])) == "INVALID_ARGUMENT"
        assert code_of(lambda: client.recommend(0, 5)) == "INVALID_ARGUMENT"
        garbage = client.channel.unary_unary("/avrec.v1.RankingService/Rank")
        assert code_of(lambda: garbage(b"\xff" * 11, timeout=5)) == "INVALID_ARGUMENT"
        assert code_of(lambda: client.rank(414, CANDIDATES)) == "OK"


def test_concurrent_callers_get_the_sequential_answers(served) -> None:
    calls = [(user, CANDIDATES[k:] + CANDIDATES[:k]) for k in range(4) for user in USERS]
    with RankingClient(f"127.0.0.1:{served.port}") as client:
        alone = [client.rank(user, candidates) for user, candidates in calls]
        with futures.ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda c: client.rank(*c), calls * 4))
    for got, expected in zip(together, alone * 4, strict=True):
        assert_same(got, expected)


def test_concurrent_log_events_are_all_accepted(served) -> None:
    base = 40_100_000 + 1_000 * GRPC_SERVERS.index(served.kind)  # users of this test alone
    events = [ranking_pb2.Event(user_id=base + k, item_id=1 + k, event_type="rating",
                                rating=4.0) for k in range(12)]
    with (RankingClient(f"127.0.0.1:{served.port}") as client,
          futures.ThreadPoolExecutor(12) as pool):
        replies = list(pool.map(lambda e: client.log_events([e]), events))
    assert [r.accepted for r in replies] == [1] * 12


def test_rank_and_recommend_run_where_the_server_runs_them(served) -> None:
    engine = served.engine
    engine.threads.clear()
    with RankingClient(f"127.0.0.1:{served.port}") as client:
        client.rank(414, CANDIDATES)
        client.recommend(414, 5)
    if served.kind == "aio":  # on the event loop's one thread
        assert engine.threads == ["avrec-grpc-loop"] * 2
    else:  # on the pool's threads, never the caller's or a loop
        assert len(engine.threads) == 2
        assert all(t.startswith("ThreadPoolExecutor") for t in engine.threads)
