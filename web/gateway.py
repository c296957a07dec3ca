"""The ranking service as the web pages use it: every call timed, every failure a
:class:`ServiceError` whose status and message a person can act on.

The pages read nothing else that the service owns (no Redis, no model): what they show is
what the API serves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from avrec.errors import AvrecError
from avrec.server.client import RankingClient
from avrec.server.protocol import ranking_pb2

DOWN_CODES = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
}


class ServiceError(AvrecError):
    """A failed service call: ``status`` is the HTTP status the page answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(exc: grpc.RpcError) -> ServiceError:
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ServiceError(400, exc.details() or "the service refused the request")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServiceError(503, "The ranking service did not answer in time "
                                 "(DEADLINE_EXCEEDED): it may be overloaded. Reload to try again.")
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return ServiceError(503, f"The ranking service refused this page ({code.name}): "
                                 "start `avrec web` with the service's --token-file.")
    if code in DOWN_CODES:
        return ServiceError(503, f"The ranking service is not answering ({code.name}). "
                                 "Start it with `avrec serve` and reload this page.")
    return ServiceError(502, f"The ranking service failed ({code.name}).")


@dataclass
class Timings:
    """Seconds spent in service calls while one page was built."""

    calls: list[tuple[str, float]] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(seconds for _, seconds in self.calls)


class Gateway:
    """One channel to the ranking service, shared by every request (grpc stubs are
    thread-safe)."""

    def __init__(self, target: str, timeout: float = 5.0, token: str | None = None,
                 root_cert: bytes | None = None) -> None:
        self.target = target
        self.client = RankingClient(target, token=token, root_cert=root_cert, timeout=timeout)

    def close(self) -> None:
        self.client.channel.close()

    def _call(self, name: str, timings: Timings | None, function, *args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            if timings is not None:
                timings.calls.append((name, time.perf_counter() - started))

    def recommend(self, user_id: int, top_k: int, diversity: float = 0.0,
                  timings: Timings | None = None) -> ranking_pb2.RankResponse:
        return self._call("recommend", timings, self.client.recommend, user_id, top_k,
                          explain=True, diversity_lambda=diversity)

    def rank(self, user_id: int, candidates: Sequence[int],
             timings: Timings | None = None) -> ranking_pb2.RankResponse:
        return self._call("rank", timings, self.client.rank, user_id, list(candidates),
                          explain=True)

    def rate(self, user_id: int, item_id: int, rating: float,
             timings: Timings | None = None) -> ranking_pb2.LogEventsResponse:
        """Log one rating at the service's clock (a like is a rating of 5)."""
        event = ranking_pb2.Event(user_id=user_id, item_id=item_id, event_type="rating",
                                  rating=rating)
        return self._call("log_events", timings, self.client.log_events, [event])

    def serving(self) -> bool:
        return self.client.serving()
