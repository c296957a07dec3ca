"""Request payloads that do not parse get INVALID_ARGUMENT, with a one-line log.

grpcio calls a method's ``request_deserializer`` itself and turns any exception it raises into
INTERNAL "Exception deserializing request!", logging a traceback (``grpc/_server.py``,
``_receive_message``); a handler never sees the bytes. :class:`MalformedRequestInterceptor`
swaps each unary-request handler's deserializer for one that never raises: bytes that do not
parse become a :class:`Malformed` value, and the wrapped behaviour answers it with
INVALID_ARGUMENT (counted in ``avrec_requests_total``) before the servicer runs. Streaming
requests (server reflection) keep grpcio's own handling.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from server import metrics

log = logging.getLogger("avrec.server")


@dataclass(frozen=True)
class Malformed:
    """A request payload the method's message type could not parse."""

    error: str
    size: int


def tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer`` that returns :class:`Malformed` instead of raising."""

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
            return Malformed(f"{type(exc).__name__}: {exc}", len(data))

    return parse


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Unparseable unary requests: INVALID_ARGUMENT and a one-line warning, no traceback."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behaviour = getattr(handler, kind)
        method = handler_call_details.method

        def guarded(request, context):
            if isinstance(request, Malformed):
                log.warning("%s: malformed request of %d bytes refused (%s)",
                            method, request.size, request.error)
                metrics.observe(method.rsplit("/", 1)[-1], "INVALID_ARGUMENT", 0.0)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request does not parse as {method}'s message: {request.error}")
            return behaviour(request, context)

        return handler._replace(
            request_deserializer=tolerant(handler.request_deserializer), **{kind: guarded})
