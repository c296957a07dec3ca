"""An optional write token for LogEvents: the read token ranks but cannot write; the write
token does both; with only a write token reads stay open."""

from __future__ import annotations

import grpc
import pytest

from avrec.server.client import RankingClient
from avrec.server.protocol import ranking_pb2
from tests.server.conftest import serve_config, stack_env
from tests.server.test_robustness import USER

EVENT = ranking_pb2.Event(user_id=40_000_000, item_id=1, event_type="tag")  # a user of its own


def code_of(call) -> str:
    try:
        call()
    except grpc.RpcError as error:
        return error.code().name
    return "OK"


@pytest.mark.parametrize("read_token", ["reader", None])
def test_log_events_need_the_write_token(stack, read_token) -> None:
    from avrec.server.app import start

    with stack_env(stack):
        service = start(serve_config(stack, auth_token=read_token, write_token="writer"))
    target = f"127.0.0.1:{service.port}"
    try:
        outcomes = {}
        for token in (None, "wrong", "reader", "writer"):
            with RankingClient(target, token) as client:
                outcomes[token] = (code_of(lambda c=client: c.rank(USER, [1, 2, 3])),
                                   code_of(lambda c=client: c.log_events([EVENT])))
    finally:
        service.stop(0)
    reads_open = read_token is None
    assert outcomes["writer"] == ("OK", "OK")
    assert outcomes["reader"] == ("OK", "UNAUTHENTICATED")
    for token in (None, "wrong"):
        assert outcomes[token] == ("OK" if reads_open else "UNAUTHENTICATED", "UNAUTHENTICATED")
