"""The gRPC server on ``grpc.aio``: Rank and Recommend run on one event loop thread.

The thread-pool server (``grpc.server``) hands every request from its polling thread to a
worker thread, and under concurrent callers its workers take turns on the interpreter lock
around each short numpy call: at 16 callers a hybrid Rank 1x200 cost ~2.7 ms of the
server's CPU against ~1.9 ms at one caller (README, Benchmarks, session 19). Here the
coroutine handlers (Rank and Recommend, :meth:`~avrec.server.service.RankingServicer.rank_on_loop`)
run one after another on the loop's thread, with no handoff and no second Python thread to
contend with; synchronous handlers (LogEvents, whose group commit gathers concurrent calls
and writes to disk; health; reflection) run on the ``migration_thread_pool`` as grpc.aio runs
them.

:class:`LoopServer` gives the aio server the synchronous face of ``grpc.Server`` that
:func:`avrec.server.app.start` and its callers use (ports, handlers, ``start``, ``stop(grace)``
returning an event), and :class:`OnLoop` adapts a synchronous ``grpc.ServerInterceptor``.

A Rank's Redis read blocks the loop while it waits (~0.1-0.2 ms; at most
``redis_timeout_seconds`` when Redis hangs, during which other calls wait too).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc

T = TypeVar("T")


class OnLoop(grpc.aio.ServerInterceptor):
    """A synchronous ``grpc.ServerInterceptor`` on an aio server: the next handler is found
    first, then given to the interceptor as its continuation's answer."""

    def __init__(self, interceptor: grpc.ServerInterceptor) -> None:
        self.interceptor = interceptor

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return self.interceptor.intercept_service(lambda _details: handler,
                                                  handler_call_details)


class LoopServer:
    """A ``grpc.aio`` server on an event loop of its own thread, driven from synchronous code.

    >>> server = LoopServer(workers=2)
    >>> port = server.add_insecure_port("127.0.0.1:0")
    >>> server.start()
    >>> server.stop(0).wait(5)
    True
    """

    runs_coroutines = True  # coroutine handlers run on its loop (avrec.server.service)

    def __init__(self, workers: int = 8, options: Sequence[tuple[str, Any]] = (),
                 interceptors: Sequence[grpc.ServerInterceptor] = ()) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="avrec-grpc-loop",
                                        daemon=True)
        self._thread.start()
        self.pool = futures.ThreadPoolExecutor(max_workers=workers,
                                               thread_name_prefix="avrec-grpc-sync")

        async def make() -> grpc.aio.Server:
            return grpc.aio.server(migration_thread_pool=self.pool, options=list(options),
                                   interceptors=[OnLoop(i) for i in interceptors])

        self.server = self._run(make())
        self._stopped: threading.Event | None = None

    def _run(self, coroutine: Awaitable[T]) -> T:
        """Run ``coroutine`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()  # type: ignore[arg-type]

    def _call(self, function: Callable[..., T], *args: Any) -> T:
        """Call a synchronous method of the aio server on the loop's thread."""

        async def call() -> T:
            return function(*args)

        return self._run(call())

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._call(self.server.add_generic_rpc_handlers, handlers)

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._call(self.server.add_registered_method_handlers, service, handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._call(self.server.add_insecure_port, address)

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int:
        return self._call(self.server.add_secure_port, address, credentials)

    def start(self) -> None:
        self._run(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, give those in flight ``grace`` seconds, then stop the loop and
        its thread; the event is set when all is done (a second call returns the same one)."""
        if self._stopped is not None:
            return self._stopped
        stopped = self._stopped = threading.Event()

        def finish() -> None:
            try:
                asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join()
                self.pool.shutdown(wait=False)
                stopped.set()

        threading.Thread(target=finish, name="avrec-grpc-stop", daemon=True).start()
        return stopped
