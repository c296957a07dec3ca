"""An optimistic multi-key transaction on a single Redis in two round trips.

redis-py's ``Pipeline.watch`` sends ``WATCH`` as a round trip of its own before the reads can
go out. Here ``WATCH`` and the reads leave in one write on one connection, and ``MULTI``, the
writes and ``EXEC`` in a second; ``EXEC`` answers nil when a watched key changed in between
(another writer: the caller reads and computes again). The connection is the client's
pool's; after any error it is disconnected before it goes back (replies left unread, or a
``WATCH`` left standing, would otherwise meet its next user).

Example (``client`` a ``redis.Redis``)::

    with WatchedBatch(client) as batch:
        while True:
            (value,) = batch.watch_and_read([b"k"], [("GET", b"k")])
            if batch.commit([("SET", b"k", (value or b"") + b"!")]):
                break
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

if TYPE_CHECKING:
    import redis

Command = tuple[Any, ...]


class WatchedBatch:
    """One pooled connection for a sequence of watched reads and conditional writes."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        self._connection: Any = None

    def __enter__(self) -> WatchedBatch:
        self._connection = self._pool.get_connection()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        connection, self._connection = self._connection, None
        if kind is not None:  # replies may be unread, a WATCH still standing
            connection.disconnect()
        self._pool.release(connection)

    def watch_and_read(self, keys: Sequence[bytes], reads: Sequence[Command]) -> list[Any]:
        """``WATCH keys`` then ``reads``, in one round trip; the reads' replies."""
        return self._run([("WATCH", *keys), *reads])[1:]

    def commit(self, writes: Sequence[Command]) -> bool:
        """``MULTI``, ``writes``, ``EXEC`` in one round trip: True when they ran, False when
        a watched key changed since :meth:`watch_and_read` (nothing written; unwatched)."""
        replies = self._run([("MULTI",), *writes, ("EXEC",)])
        done = replies[-1]
        if done is None:
            return False
        failed = [reply for reply in done if isinstance(reply, ResponseError)]
        if failed:
            raise failed[0]
        return True

    def _run(self, commands: Sequence[Command]) -> list[Any]:
        connection = self._connection
        connection.send_packed_command(connection.pack_commands(commands))
        return [connection.read_response() for _ in commands]
