"""The generated ``avrec.v1`` stubs (made on first import when missing) and the service name.

Clients import this module alone: it pulls in grpc and protobuf, not the serving engine.
"""

from server.stubs import ensure_stubs

ensure_stubs()
from avrec.v1 import ranking_pb2, ranking_pb2_grpc  # noqa: E402

SERVICE_NAME: str = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name

__all__ = ["SERVICE_NAME", "ranking_pb2", "ranking_pb2_grpc"]
