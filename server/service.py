"""The gRPC service ``avrec.v1.RankingService``: proto in, :class:`RankingEngine` calls, proto out.

Status codes: INVALID_ARGUMENT for requests the caller must fix (the message says what),
UNAVAILABLE when Redis cannot be read (the process stays up and recovers when Redis returns;
health turns NOT_SERVING meanwhile), DEADLINE_EXCEEDED when the caller's deadline passed before
scoring, FAILED_PRECONDITION when the online embeddings no longer match the model,
UNAUTHENTICATED without the configured bearer token, INTERNAL for anything else (logged).
Every call is counted and timed in Prometheus metrics (:mod:`avrec.server.metrics`).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2

from avrec.errors import AvrecError, StoreUnavailableError
from avrec.names import USER_BEHAVIOUR
from avrec.online_features import MixedVersionsError
from avrec.server import metrics
from avrec.server.answers import Ranked
from avrec.server.engine import RankingEngine
from avrec.server.event_log import EventError, EventLog, EventLogUnavailableError, LoggedEvent
from avrec.server.protocol import SERVICE_NAME, ranking_pb2, ranking_pb2_grpc
from avrec.server.request_checks import RequestError

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger("avrec.server")


UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | None) -> Timestamp | None:
    """``value`` as a protobuf ``Timestamp`` (what ``Timestamp.FromDatetime`` makes of it in
    UTC, at a fifth of its cost); None stays None."""
    if value is None:
        return None
    delta = value.astimezone(UTC) - UNIX_EPOCH
    return Timestamp(seconds=delta.days * 86_400 + delta.seconds,
                     nanos=delta.microseconds * 1000)


def answer_header(answer: Ranked, model_version: str | None = None
                  ) -> ranking_pb2.RankResponse:
    """A :class:`Ranked` answer's ``RankResponse`` without its items (the version of the
    models that answered unless ``model_version`` is given)."""
    row = answer.user_row
    freshness = [ranking_pb2.FeatureFreshness(
        feature_view=USER_BEHAVIOUR, event_timestamp=timestamp(row.event_timestamp),
        expired=row.expired, after_clock=row.future)]
    freshness += [ranking_pb2.FeatureFreshness(feature_view=view, event_timestamp=timestamp(ts))
                  for view, ts in answer.item_freshness.items()]
    return ranking_pb2.RankResponse(
        model_version=model_version or answer.model_version,
        embedding_version=answer.embedding_version or "",
        cold_start_user=answer.cold_start_user,
        user_features=freshness,
        served_at=timestamp(answer.served_at),
        items_missing_features=answer.items_missing_features,
    )


def to_proto(answer: Ranked, model_version: str | None = None) -> ranking_pb2.RankResponse:
    """A :class:`Ranked` answer as a ``RankResponse`` message, built field by field."""
    response = answer_header(answer, model_version)
    add = response.items.add  # built in place: half the cost of messages copied in
    for item in answer.items:
        scored = add(item_id=item.item_id, score=item.score, title=item.title,
                     missing_features=item.missing_features)
        if item.explanation is not None:
            history_id, similarity, title = item.explanation
            scored.explanation.history_item_id = history_id
            scored.explanation.similarity = similarity
            scored.explanation.history_title = title
    return response


def encode_response(answer: Ranked) -> bytes:
    """The ``RankResponse`` bytes of :func:`to_proto`, made from the snapshot's encoded items
    (:mod:`avrec.server.answer_records`) when the answer has no explanations: the items' bytes,
    then the other fields' (a message's fields parse in any order)."""
    if answer.explanations is not None:
        return to_proto(answer).SerializeToString()
    items = answer.records.encode(answer.rows, answer.scores)
    return items + answer_header(answer).SerializeToString()


def response_bytes(response: bytes | Message) -> bytes:
    """The serializer of the service's answers: bytes as they are, messages serialized."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def add_to_server(servicer: RankingServicer, server: Any) -> None:
    """Register the service on ``server``, as ``add_RankingServiceServicer_to_server`` does,
    with Rank and Recommend answering pre-encoded bytes (:func:`encode_response`); on a
    server whose handlers may be coroutines (:class:`avrec.server.loop_server.LoopServer`)
    they are, and run on its event loop."""
    on_loop = getattr(server, "runs_coroutines", False)
    handlers = {
        "Rank": grpc.unary_unary_rpc_method_handler(
            servicer.rank_on_loop if on_loop else servicer.Rank,
            request_deserializer=ranking_pb2.RankRequest.FromString,
            response_serializer=response_bytes),
        "Recommend": grpc.unary_unary_rpc_method_handler(
            servicer.recommend_on_loop if on_loop else servicer.Recommend,
            request_deserializer=ranking_pb2.RecommendRequest.FromString,
            response_serializer=response_bytes),
        "LogEvents": grpc.unary_unary_rpc_method_handler(
            servicer.LogEvents, request_deserializer=ranking_pb2.LogEventsRequest.FromString,
            response_serializer=ranking_pb2.LogEventsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME,
                                                                          handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Adapts :class:`RankingEngine` and :class:`EventLog` to gRPC."""

    def __init__(
        self,
        engine: RankingEngine,
        events: EventLog,
        store: FeatureStore,
        health_servicer: health.HealthServicer | None = None,
    ) -> None:
        self.engine, self.events, self.store = engine, events, store
        self.health = health_servicer
        self._healthy = True

    def _serving(self, ok: bool) -> None:
        """Report the health status, on changes only (a set notifies every watcher)."""
        if self.health is None or ok == self._healthy:
            return
        self._healthy = ok
        status = (health_pb2.HealthCheckResponse.SERVING if ok
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _run(self, method: str, context: Any, work: Callable[[], Any]
             ) -> tuple[Any, grpc.StatusCode, str]:
        """Run ``work``: (its result, OK, "") or (None, the failure's code, its message);
        count and time the call."""
        started = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        try:
            _check_deadline(context, "before the request was handled")
            result = work()
            _check_deadline(context, f"while handling {method}")
            self._serving(True)
            return result, code, message
        except (RequestError, EventError) as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except DeadlinePassedError as exc:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        except EventLogUnavailableError as exc:  # Rank keeps serving: health stays SERVING
            code, message = grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        except StoreUnavailableError as exc:  # (after its event-log subclass above)
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except MixedVersionsError as exc:
            code, message = grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        except Exception as exc:
            if _redis_error(exc):
                code, message = grpc.StatusCode.UNAVAILABLE, f"online store unreachable: {exc}"
            else:
                log.exception("%s failed", method)
                code = grpc.StatusCode.INTERNAL
                message = f"internal error in {method}: {type(exc).__name__}"
        finally:
            metrics.observe(method, code.name, time.perf_counter() - started)
        if code == grpc.StatusCode.UNAVAILABLE:
            self._serving(False)
        return None, code, message

    def _call(self, method: str, context: grpc.ServicerContext, work: Callable[[], Any]) -> Any:
        """:meth:`_run`, a failure aborting the call with its status code."""
        result, code, message = self._run(method, context, work)
        if code != grpc.StatusCode.OK:
            context.abort(code, message)
        return result

    async def _call_on_loop(self, method: str, context: grpc.aio.ServicerContext,
                            work: Callable[[], Any]) -> Any:
        """:meth:`_call` for a coroutine handler (``grpc.aio``'s ``abort`` is awaited)."""
        result, code, message = self._run(method, context, work)
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)
        return result

    def _rank(self, request: ranking_pb2.RankRequest) -> Callable[[], bytes]:
        options = request.options
        return lambda: encode_response(self.engine.rank(
            request.user_id, list(request.candidate_item_ids), request.top_k,
            options.explain, options.diversity_lambda,
        ))

    def _recommend(self, request: ranking_pb2.RecommendRequest) -> Callable[[], bytes]:
        options = request.options
        return lambda: encode_response(self.engine.recommend(
            request.user_id, request.top_k, options.explain, options.diversity_lambda,
        ))

    def Rank(self, request, context):
        return self._call("Rank", context, self._rank(request))

    def Recommend(self, request, context):
        return self._call("Recommend", context, self._recommend(request))

    async def rank_on_loop(self, request, context):
        """Rank as a coroutine handler (:mod:`avrec.server.loop_server`)."""
        return await self._call_on_loop("Rank", context, self._rank(request))

    async def recommend_on_loop(self, request, context):
        """Recommend as a coroutine handler."""
        return await self._call_on_loop("Recommend", context, self._recommend(request))

    def LogEvents(self, request, context):
        def work() -> ranking_pb2.LogEventsResponse:
            events = [
                LoggedEvent(
                    e.user_id, e.item_id, e.event_type,
                    e.rating if e.event_type == "rating" else None,
                    event_time(e.event_timestamp, i) if e.HasField("event_timestamp") else None,
                    e.event_id or None,
                )
                for i, e in enumerate(request.events)
            ]
            if len(events) > self.engine.config.max_candidates:
                raise RequestError(f"{len(events)} events; at most "
                                   f"{self.engine.config.max_candidates} per call")
            result = self.events.log(self.store, events, self.engine.clock.now())
            return ranking_pb2.LogEventsResponse(
                accepted=result.accepted, users_updated=result.users,
                offline_path=str(result.path) if result.path else "",
                duplicates=result.duplicates)
        return self._call("LogEvents", context, work)


# protobuf's Timestamp range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z
TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)
EARLIEST_EVENT = datetime(1970, 1, 1, tzinfo=UTC)


def event_time(stamp: Timestamp, index: int) -> datetime:
    """An event's ``event_timestamp`` as an aware datetime; RequestError when out of range.

    Times before the unix epoch are refused too: no catalogue has such events, and the
    behaviour windows (``t - 730 days``) would leave ``datetime``'s range near year 1.
    """
    low, high = TIMESTAMP_SECONDS
    if not low <= stamp.seconds <= high or not 0 <= stamp.nanos <= 999_999_999:
        raise RequestError(
            f"event {index}: event_timestamp (seconds {stamp.seconds}, nanos {stamp.nanos}) "
            f"outside protobuf's range (seconds in [{low}, {high}], nanos in [0, 999999999])")
    when = stamp.ToDatetime(tzinfo=UTC)
    if when < EARLIEST_EVENT:
        raise RequestError(f"event {index}: event_timestamp {when.isoformat()} is before "
                           f"{EARLIEST_EVENT.isoformat()}")
    return when


class DeadlinePassedError(AvrecError, RuntimeError):
    """The caller's deadline passed (gRPC DEADLINE_EXCEEDED)."""


def _check_deadline(context: grpc.ServicerContext, when: str) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlinePassedError(f"deadline passed {when}")


def _redis_error(exc: Exception) -> bool:
    """A store failure that reached here unwrapped (a down node, a failover in progress)."""
    from avrec.redis_client import STORE_ERRORS

    return isinstance(exc, STORE_ERRORS)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (health checks excepted).

    With a ``write_token``, LogEvents needs that one (the read ``token`` is not enough) and it
    is accepted for reads too; without a read ``token`` reads are open.
    """

    OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")
    WRITES = (f"/{SERVICE_NAME}/LogEvents",)

    def __init__(self, token: str | None, write_token: str | None = None) -> None:
        self.read = [f"Bearer {t}".encode() for t in (token, write_token) if t] if token else []
        self.write = [f"Bearer {write_token}".encode()] if write_token else self.read

        def deny(request, context):
            metrics.observe("auth", grpc.StatusCode.UNAUTHENTICATED.name, 0.0)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(self.OPEN):
            return continuation(handler_call_details)
        needed = self.write if handler_call_details.method in self.WRITES else self.read
        if not needed:
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization")
        # constant time: how much of a wrong token matches must not show in the timing
        if isinstance(given, str) and any(
                hmac.compare_digest(given.encode(), token) for token in needed):
            return continuation(handler_call_details)
        return self._deny
