"""Item snapshots read from Redis in a child process, so that the serving interpreter only
unpickles them.

A background snapshot reload reads ~20,000 hashes through redis-py, compares them with the last
read (:class:`~avrec.server.item_snapshot.RowCache`) and builds the item frame: about a second of
Python. In the serving process that second shares one interpreter with the requests: with the
server half busy (hybrid ``Rank`` at 50 req/s on a slow 2-core machine) the requests queued
behind it (p99 139 ms, max 323 ms over a minute with one reload; 47 / 86 ms with the refresh
off). :class:`SnapshotProcess` does that work in a child process, on the other core, with its own
Redis connection and row caches; the server receives the finished
:class:`~avrec.server.item_snapshot.ItemSnapshot` through a pipe.

The child is spawned by :meth:`SnapshotProcess.start` (``avrec serve`` calls it at start) or at
the first background reload, and exits with its parent. When it fails (it died,
timed out, or sent something that does not unpickle) the reload runs in process as before and
the next one starts a new child; Redis errors and mixed embedding versions it meets are raised
as the in-process load raises them.

Example::

    process = SnapshotProcess(url, 1.0, behaviour_reader, embedding_reader, catalogue)
    snapshot = process.load(encoder, now, timedelta(seconds=60), "embedding", counter)
    process.close()
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import sys
import threading
import types
from collections.abc import Iterator
from datetime import datetime, timedelta
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import polars as pl

from avrec.errors import AvrecError
from avrec.server.feature_reader import ViewReader
from avrec.server.item_snapshot import ItemSnapshot, RowCache, load_snapshot
from avrec.server.snapshot_child import child_main

if TYPE_CHECKING:
    from avrec.ranker.features import FeatureEncoder

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_SECONDS = 120.0  # a child silent this long is stopped (the reload runs here)


class SnapshotProcessError(AvrecError, RuntimeError):
    """The child could not deliver a snapshot (it died, timed out or sent garbage)."""


class SnapshotProcess:
    """A child process that loads item snapshots with :func:`load_snapshot`, one at a time."""

    def __init__(self, redis_url: str, redis_timeout: float, behaviour: ViewReader,
                 embedding: ViewReader, catalogue: pl.DataFrame,
                 timeout: float = LOAD_TIMEOUT_SECONDS) -> None:
        self._connection = (redis_url, redis_timeout)
        self._setup = (behaviour, embedding, catalogue)
        self._needs_setup = False  # the running child has not been sent the setup yet
        self.timeout = timeout
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self.loads = 0  # snapshots delivered
        self.started = 0  # children started

    @property
    def pid(self) -> int | None:
        """The child's process id (None while no child runs)."""
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the child now (it imports and connects while the server serves), so that
        the first reload does not pay for that."""
        with self._lock:
            self._running()

    def load(self, encoder: FeatureEncoder, now: datetime, refresh: timedelta,
             vector_field: str, materialization: bytes | None) -> ItemSnapshot:
        """:func:`load_snapshot` run by the child (started if none runs).

        Raises what the load raised there (Redis errors, mixed embedding versions), or
        :class:`SnapshotProcessError` when the child could not answer (it is then stopped).
        """
        with self._lock:
            conn = self._running()
            try:
                if self._needs_setup:
                    conn.send(("setup", *self._setup))
                    self._needs_setup = False
                conn.send(("load", encoder, now, refresh, vector_field, materialization))
                if not conn.poll(self.timeout):
                    raise SnapshotProcessError(f"no snapshot within {self.timeout} s")
                status, payload = conn.recv()
            except (OSError, EOFError, ValueError, TypeError, AttributeError,
                    pickle.PickleError, SnapshotProcessError) as exc:  # pickling, pipe
                self._stop()
                if isinstance(exc, SnapshotProcessError):
                    raise
                raise SnapshotProcessError(f"the snapshot process failed: {exc!r}") from exc
            if status == "error":
                raise payload
            self.loads += 1
            return payload

    def close(self, wait: float = 5.0) -> None:
        """Stop the child (a later :meth:`load` starts another). A load still in flight
        after ``wait`` seconds is cut short: the child is killed, and that load raises
        :class:`SnapshotProcessError` (the reload falls back to the server)."""
        if self._lock.acquire(timeout=wait):
            try:
                self._stop()
            finally:
                self._lock.release()
            return
        process = self._process
        if process is not None:
            process.kill()

    def _running(self) -> Connection:
        if self._process is not None and self._process.is_alive() and self._conn is not None:
            return self._conn
        self._stop()
        context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        parent, child = context.Pipe()
        # the spawn carries only small arguments: the catalogue follows through the pipe
        # with the first load (a parent killed while writing a large spawn payload left the
        # child a truncated pickle, and a traceback on stderr)
        process = context.Process(target=child_main, args=(child, *self._connection),
                                  name="avrec-snapshot-loader", daemon=True)
        with _main_module_hidden():
            process.start()
        child.close()
        self._process, self._conn, self._needs_setup = process, parent, True
        self.started += 1
        return parent

    def _stop(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()  # the child's recv sees EOF and returns
        if process is not None:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Let a spawned child start without importing this process's ``__main__`` module.

    ``spawn`` re-imports the parent's main module in the child before its target runs. A
    server started as ``python -m avrec.server.app`` (as each ``avrec serve --replicas``
    replica is) made every snapshot child import the whole server, Feast and, through it,
    torch, before :func:`~avrec.server.snapshot_child.child_main` could keep torch out: 822
    MB of child against 225 under ``avrec serve``. A bare stand-in module is shown to the
    spawn while it prepares the child; the child's target needs nothing of the main module.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def serve_loads(conn: Connection, redis_url: str, redis_timeout: float) -> None:
    """The child's loop (:func:`avrec.server.snapshot_child.child_main`), until the parent
    closes the pipe or went away (then quietly)."""
    try:
        _serve_loads(conn, redis_url, redis_timeout)
    except (EOFError, OSError, pickle.UnpicklingError):
        return


def _serve_loads(conn: Connection, redis_url: str, redis_timeout: float) -> None:
    """One ``("setup", behaviour, embedding, catalogue)`` message, then per ``("load", ...)``
    message one ``("ok", snapshot)`` or ``("error", exc)`` reply."""
    from avrec.redis_client import connect

    client = connect(redis_url, socket_timeout=redis_timeout,
                     socket_connect_timeout=redis_timeout)
    behaviour: ViewReader | None = None
    embedding: ViewReader | None = None
    catalogue = pl.DataFrame()
    caches: tuple[RowCache, RowCache] | None = None
    while True:
        tag, *message = conn.recv()
        if tag == "setup":
            behaviour, embedding, catalogue = message
            caches = (RowCache(behaviour), RowCache(embedding))
            continue
        encoder, now, refresh, vector_field, materialization = message
        reply: tuple[str, Any]
        try:
            if behaviour is None or embedding is None or caches is None:
                raise SnapshotProcessError("a load before the setup")
            reply = ("ok", load_snapshot(client, behaviour, embedding, catalogue, encoder,
                                         now, refresh, vector_field, materialization, caches))
        except Exception as exc:  # sent to the parent, which raises it
            reply = ("error", exc)
        try:
            conn.send(reply)
        except (OSError, EOFError):
            raise
        except Exception as exc:  # an exception that does not pickle
            conn.send(("error", SnapshotProcessError(f"the snapshot load failed: {exc!r}")))
