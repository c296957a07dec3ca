"""The entry point of the snapshot loader's child process (:mod:`avrec.server.snapshot_process`).

Only the standard library is imported here, so that the child can keep torch out before Feast
looks for it: Feast imports torch when it is installed (for image search), and a child with
torch held ~800 MB against ~240 without; the child runs server code, which uses no torch.
"""

from __future__ import annotations

import sys
from multiprocessing.connection import Connection


def child_main(conn: Connection, redis_url: str, redis_timeout: float) -> None:
    """Serve snapshot loads on ``conn`` (:func:`avrec.server.snapshot_process.serve_loads`)."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` fails
    from avrec.server.snapshot_process import serve_loads

    serve_loads(conn, redis_url, redis_timeout)
