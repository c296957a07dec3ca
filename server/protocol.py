"""The generated ``avrec.v1`` stubs and the service name.

The stubs are built by the setup step (``make setup``), never here: when they are missing or
older than the ``.proto`` files, importing this module raises :class:`avrec.errors.SetupError`.
Clients import this module alone: it pulls in grpc and protobuf, not the serving engine.
"""

from avrec.server.stubs import require_stubs

require_stubs()
from avrec.v1 import ranking_pb2, ranking_pb2_grpc  # noqa: E402

SERVICE_NAME: str = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name

__all__ = ["SERVICE_NAME", "ranking_pb2", "ranking_pb2_grpc"]
