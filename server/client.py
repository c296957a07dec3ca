"""A small client of the ranking service, and ``avrec recommend`` / ``avrec rank`` on top of it.

Example::

    with RankingClient("127.0.0.1:50051") as client:
        answer = client.recommend(user_id=414, top_k=10, explain=True)
        for item in answer.items:
            print(item.title, item.score)

Several replicas (``avrec serve --replicas N`` prints the target): one channel over all of
them, ``round_robin`` and retries of UNAVAILABLE for ``Rank`` and ``Recommend``::

    RankingClient("ipv4:127.0.0.1:50051,127.0.0.1:50052")
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from avrec import commands
from avrec.commands import Subparsers
from avrec.server.protocol import SERVICE_NAME, ranking_pb2, ranking_pb2_grpc

# Reads are retried on UNAVAILABLE (a replica gone or going away: the next attempt is picked
# by round_robin among the ones still connected). LogEvents is not: its duplicates are
# dropped by event_id only within one server process (the ids it read at start and accepted
# since), so a retry landing on another replica could count a batch twice.
RETRIED_METHODS = ("Rank", "Recommend")
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.05s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(retry_policy: dict | None = None) -> str:
    """The channel's service config (JSON): ``round_robin`` over every address of the target
    and ``retry_policy`` (default :data:`RETRY_POLICY`) for :data:`RETRIED_METHODS`."""
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [{
            "name": [{"service": SERVICE_NAME, "method": m} for m in RETRIED_METHODS],
            "retryPolicy": retry_policy or RETRY_POLICY,
        }],
    })


def channel_options(retry_policy: dict | None = None) -> list[tuple[str, object]]:
    """gRPC channel options: the service config above with retries enabled explicitly."""
    return [("grpc.service_config", service_config(retry_policy)), ("grpc.enable_retries", 1)]


class RankingClient:
    """A channel to ``avrec.v1.RankingService`` with optional TLS and bearer token.

    ``target`` is one address or several (``ipv4:HOST:PORT,HOST:PORT``, a DNS name with
    several addresses): calls are spread by ``round_robin``; ``Rank`` and ``Recommend`` are
    retried on UNAVAILABLE (``retry_policy``, default :data:`RETRY_POLICY`), ``LogEvents``
    never."""

    def __init__(
        self,
        target: str,
        token: str | None = None,
        root_cert: bytes | None = None,
        timeout: float = 5.0,
        retry_policy: dict | None = None,
    ) -> None:
        options = channel_options(retry_policy)
        if root_cert is not None:
            self.channel = grpc.secure_channel(
                target, grpc.ssl_channel_credentials(root_cert), options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = ranking_pb2_grpc.RankingServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __enter__(self) -> RankingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def rank(
        self, user_id: int, candidates: Sequence[int], top_k: int = 0, explain: bool = False,
        diversity_lambda: float = 0.0, timeout: float | None = None,
    ) -> ranking_pb2.RankResponse:
        request = ranking_pb2.RankRequest(
            user_id=user_id, candidate_item_ids=list(candidates), top_k=top_k,
            options=ranking_pb2.RankOptions(explain=explain, diversity_lambda=diversity_lambda),
        )
        return self.stub.Rank(request, timeout=timeout or self.timeout, metadata=self.metadata)

    def recommend(
        self, user_id: int, top_k: int = 10, explain: bool = False,
        diversity_lambda: float = 0.0, timeout: float | None = None,
    ) -> ranking_pb2.RankResponse:
        request = ranking_pb2.RecommendRequest(
            user_id=user_id, top_k=top_k,
            options=ranking_pb2.RankOptions(explain=explain, diversity_lambda=diversity_lambda),
        )
        return self.stub.Recommend(request, timeout=timeout or self.timeout,
                                   metadata=self.metadata)

    def log_events(self, events: Sequence[ranking_pb2.Event]) -> ranking_pb2.LogEventsResponse:
        request = ranking_pb2.LogEventsRequest(events=list(events))
        return self.stub.LogEvents(request, timeout=self.timeout, metadata=self.metadata)

    def serving(self) -> bool:
        """True when the health service reports SERVING for the ranking service."""
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                                      timeout=self.timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def wait_until_serving(
        self, timeout: float = 120.0, process: subprocess.Popen | None = None
    ) -> None:
        """Poll health until SERVING; TimeoutError, or RuntimeError when ``process`` (the
        server's, if the caller started it) exits first."""
        deadline = time.monotonic() + timeout
        while not self.serving():
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with code {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranking service not serving after {timeout} s")
            time.sleep(0.5)


def format_answer(answer: ranking_pb2.RankResponse) -> str:
    """A readable table of a RankResponse."""
    head = (f"model {answer.model_version}, embeddings {answer.embedding_version}, "
            f"served at {answer.served_at.ToDatetime().isoformat()}Z"
            + (", COLD-START user" if answer.cold_start_user else ""))
    lines = [head]
    if "+hybrid-" in answer.model_version:
        lines.append("  scores: the hybrid's probability that the item is the user's next liked "
                     "one, among its candidate pool")
    for view in answer.user_features:
        stamp = (view.event_timestamp.ToDatetime().isoformat() + "Z"
                 if view.HasField("event_timestamp") else "none")
        lines.append(f"  features {view.feature_view}: row of {stamp}"
                     + (" (expired: not served)" if view.expired else ""))
    for rank, item in enumerate(answer.items, 1):
        line = f"{rank:>3}. {item.score:.3f}  {item.title} [{item.item_id}]"
        if item.HasField("explanation"):
            why = item.explanation
            line += f"  <- because of {why.history_title} ({why.similarity:.2f})"
        lines.append(line)
    return "\n".join(lines)


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """``avrec recommend USER`` or ``avrec recommend USER --candidates ID ...`` (Rank)."""
    parser = subparsers.add_parser("recommend", description=register.__doc__)
    parser.add_argument("user_id", type=int)
    parser.add_argument("--target", default="127.0.0.1:50051",
                        help="HOST:PORT, or several replicas: ipv4:HOST:PORT,HOST:PORT")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--candidates", type=int, nargs="+", help="Rank these instead")
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--diversity", type=float, default=0.0, help="MMR lambda (0 = off)")
    parser.add_argument("--token-file", type=Path)
    parser.add_argument("--root-cert", type=Path, help="CA certificate for TLS")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``avrec recommend`` with its parsed options."""
    token = args.token_file.read_text().strip() if args.token_file else None
    cert = args.root_cert.read_bytes() if args.root_cert else None
    with RankingClient(args.target, token, cert) as client:
        try:
            if args.candidates:
                answer = client.rank(args.user_id, args.candidates, args.top_k, args.explain,
                                     args.diversity)
            else:
                answer = client.recommend(args.user_id, args.top_k, args.explain, args.diversity)
        except grpc.RpcError as exc:
            print(f"avrec recommend: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(format_answer(answer))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``avrec recommend`` from ``argv`` (tests, ``python -m avrec.server.client``)."""
    return commands.main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
