"""Redis commands sent now, their replies read later: a request works while they travel.

A Rank call's Redis read (the user's rows and the materialization counter) is one round trip
of ~0.05-0.2 ms on loopback during which the request thread only waits; the candidates'
checks (~0.1 ms) do not depend on it. :class:`InFlight` writes the commands on one pooled
connection at once and reads their replies when :meth:`InFlight.replies` is called. A
connection whose replies were not all read (an error, or the caller leaving early) is
disconnected before it goes back to the pool, so no stale reply meets its next user.

A Redis Cluster client has no single connection for keys of several slots: there the
commands run as a pipeline when the replies are asked for (no overlap, same answers).

Example (``client`` a ``redis.Redis``)::

    with InFlight(client, [("GET", b"a"), ("HMGET", b"h", b"f")]) as read:
        work_meanwhile()
        a, (f,) = read.replies()
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis

if TYPE_CHECKING:
    from avrec.redis_client import Client

Command = tuple[Any, ...]


class InFlight:
    """Commands written on one connection; their replies read on demand."""

    def __init__(self, client: Client, commands: Sequence[Command]) -> None:
        self._commands = list(commands)
        self._client = client
        self._pool = None if isinstance(client, redis.RedisCluster) else client.connection_pool
        self._connection: Any = None
        self._read: list[Any] | None = None

    def __enter__(self) -> InFlight:
        if self._pool is None:
            return self
        self._connection = self._pool.get_connection()
        try:
            self._connection.send_packed_command(
                self._connection.pack_commands(self._commands))
        except BaseException:
            self._give_back(failed=True)
            raise
        return self

    def replies(self) -> list[Any]:
        """The commands' replies, in order (read once; an error reply raises)."""
        if self._read is None:
            if self._pool is None:
                with self._client.pipeline(transaction=False) as pipe:
                    for command in self._commands:
                        pipe.execute_command(*command)
                    self._read = pipe.execute()
            else:
                try:
                    self._read = [self._connection.read_response() for _ in self._commands]
                except BaseException:
                    self._give_back(failed=True)
                    raise
        return self._read

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._give_back(failed=self._read is None)

    def _give_back(self, failed: bool) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if failed:  # replies may be unread: a later user of the connection would get them
            connection.disconnect()
        self._pool.release(connection)
