"""Property-based fuzzing of every RPC over real gRPC (a small sample; ``bench/fuzz_rpc.py``
runs thousands of calls and prints the codes): extreme ints, NaN/Inf, odd unicode, unset
fields, huge repeated fields, timestamps outside protobuf's range and raw garbage payloads get
documented status codes only (never INTERNAL or UNKNOWN), log no traceback, and leave the
server serving."""

from __future__ import annotations

import logging
from collections import Counter

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings

from avrec import tables
from avrec.server.client import RankingClient
from avrec.server.protocol import ranking_pb2
from tests.fuzzing import ALLOWED, RPCS, call, cases

EXAMPLES = 200
USERS = [*range(1, 611), 100_000]
LOG_USERS = range(20_000_000, 20_000_050)  # users no other test reads


def items_of(stack) -> list[int]:
    return tables.read_table("items", stack.data_dir / "offline")["item_id"].to_list()


def assert_serving(port: int) -> None:
    with RankingClient(f"127.0.0.1:{port}") as client:
        assert client.serving()
        assert client.rank(414, [1, 2, 3]).items
        assert client.recommend(414, top_k=3).items


@pytest.mark.parametrize("rpc", RPCS)
def test_fuzzed_calls_get_documented_codes_only(rpc, stack, hybrid_service, caplog) -> None:
    codes: Counter[str] = Counter()
    strategy = cases(rpc, USERS, items_of(stack), LOG_USERS)
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(f"127.0.0.1:{hybrid_service.port}") as channel:

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def one(request) -> None:
            code = call(channel, rpc, request)
            codes[code] += 1
            assert code in ALLOWED[rpc], f"{rpc} answered {code} to {str(request)[:500]}"

        one()
    assert sum(codes.values()) >= EXAMPLES // 2, codes
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks[:3]]
    assert_serving(hybrid_service.port)


@pytest.mark.parametrize(("seconds", "nanos"), [
    (253_402_300_800, 0), (-62_135_596_801, 0), (2**63 - 1, 0), (0, -1), (0, 1_000_000_000),
    (1_500_000_000, 2**31 - 1), (-86_400, 0),
])
def test_event_timestamps_outside_the_range_are_invalid_argument(client, seconds, nanos) -> None:
    event = ranking_pb2.Event(user_id=LOG_USERS[0], item_id=1, event_type="tag",
                              event_timestamp=Timestamp(seconds=seconds, nanos=nanos))
    with pytest.raises(grpc.RpcError) as caught:
        client.log_events([event])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event_timestamp" in caught.value.details()


def test_garbage_payloads_are_invalid_argument_with_one_log_line(service, caplog) -> None:
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        for rpc in ("Rank", "Recommend", "LogEvents", "Health"):
            caplog.clear()
            assert call(channel, "garbage", (rpc, b"\xff" * 11)) == "INVALID_ARGUMENT"
            lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
            assert len(lines) == 1 and not lines[0].exc_info
            assert not [r for r in caplog.records if r.exc_info]
    assert_serving(service.port)


def test_garbage_in_a_reflection_stream_is_invalid_argument_with_one_log_line(service, caplog):
    caplog.set_level(logging.WARNING)
    path = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        stream = channel.stream_stream(path, request_serializer=None,
                                       response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(iter([b"\xff" * 11]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(lines) == 1 and not lines[0].exc_info
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert_serving(service.port)

