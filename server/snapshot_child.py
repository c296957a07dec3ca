"""The entry point of the snapshot loader's child process (:mod:`avrec.server.snapshot_process`).

Only the standard library is imported here, so that the child can keep torch out before Feast
looks for it: Feast imports torch when it is installed (for image search), and a child with
torch held ~800 MB against ~240 without; the child runs server code, which uses no torch.
"""

from __future__ import annotations

import os
import sys
from multiprocessing.connection import Connection

NICENESS = 10  # added to the child's nice value: its reloads yield the CPU to the server's


def child_main(conn: Connection, redis_url: str, redis_timeout: float) -> None:
    """Serve snapshot loads on ``conn`` (:func:`avrec.server.snapshot_process.serve_loads`),
    at a lower CPU priority than the serving process: a reload is background work, and on a
    machine whose cores the server, its clients and Redis already share, the child's ~0.3 s
    of parsing per reload otherwise takes a core from them (open-loop Rank at 100/s over a
    minute with one reload: max 51-75 ms, against 18 ms without the reload)."""
    os.nice(NICENESS)
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` fails
    from avrec.server.snapshot_process import serve_loads

    serve_loads(conn, redis_url, redis_timeout)
