"""Request payloads that do not parse get INVALID_ARGUMENT, with a one-line log.

grpcio calls a method's ``request_deserializer`` itself and turns any exception it raises into
INTERNAL "Exception deserializing request!", logging a traceback (``grpc/_server.py``,
``_receive_message``); a handler never sees the bytes. :class:`MalformedRequestInterceptor`
swaps each unary-request handler's deserializer for one that never raises: bytes that do not
parse become a :class:`Malformed` value, and the wrapped behaviour answers it with
INVALID_ARGUMENT (counted in ``avrec_requests_total``) before the servicer runs. Streaming
requests (server reflection) are checked message by message as the servicer reads them: the
first one that does not parse ends the call with INVALID_ARGUMENT the same way.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from avrec.server import metrics

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


def _refusal(request: Malformed, method: str) -> str:
    """Log and count a refused payload; the status message."""
    log.warning("%s: malformed request of %d bytes refused (%s)",
                method, request.size, request.error)
    metrics.observe(method.rsplit("/", 1)[-1], "INVALID_ARGUMENT", 0.0)
    return f"the request does not parse as {method}'s message: {request.error}"


def _refuse(request: Malformed, method: str, context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request, method))


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Unparseable requests: INVALID_ARGUMENT and a one-line warning, no traceback.

    Each method's guarded handler is made at its first call and kept (a server's handlers
    do not change); unknown methods are not kept."""

    def __init__(self) -> None:
        self._guarded: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        guarded = self._guarded.get(method)
        if guarded is None:
            guarded = self._guard(continuation(handler_call_details), method)
            if guarded is not None:
                self._guarded[method] = guarded
        return guarded

    def _guard(self, handler: grpc.RpcMethodHandler | None, method: str
               ) -> grpc.RpcMethodHandler | None:
        if handler is None or handler.request_deserializer is None:
            return handler
        kind = (("stream_stream" if handler.response_streaming else "stream_unary")
                if handler.request_streaming
                else ("unary_stream" if handler.response_streaming else "unary_unary"))
        behaviour = getattr(handler, kind)

        def guarded(request, context):
            if isinstance(request, Malformed):
                _refuse(request, method, context)
            return behaviour(request, context)

        async def guarded_on_loop(request, context):  # a coroutine handler (grpc.aio)
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _refusal(request, method))
            return await behaviour(request, context)

        def guarded_stream(requests, context):
            def checked():
                for request in requests:
                    if isinstance(request, Malformed):
                        _refuse(request, method, context)
                    yield request

            return behaviour(checked(), context)

        wrapped = (guarded_stream if handler.request_streaming
                   else guarded_on_loop if inspect.iscoroutinefunction(behaviour) else guarded)
        return handler._replace(
            request_deserializer=tolerant(handler.request_deserializer), **{kind: wrapped})
