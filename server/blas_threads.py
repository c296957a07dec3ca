"""numpy's BLAS threads in a serving process: one by default.

A request's matrix products are small (one user's history against ~10,000 items, a pool of
200 against a history of 200), where a second BLAS thread costs more in hand-off than it
saves; under load (gRPC worker threads, other processes on the same cores) OpenBLAS's
spinning threads contend with everything else. ``bench/hybrid_latency.py`` on this 2-core
machine with an evaluation running beside it: the hybrid's feature step 32 ms with
OpenBLAS's default threads, 0.64 ms with one. Scale a server out with processes
(``avrec serve --replicas``), not BLAS threads. Training and evaluation keep the default:
their products (an EASE inversion) are large.
"""

from __future__ import annotations

from threadpoolctl import threadpool_limits


def limit_blas_threads(threads: int) -> None:
    """Cap the BLAS libraries numpy and scipy loaded at ``threads`` for this process
    (0: leave them as they are)."""
    if threads < 0:
        raise ValueError(f"blas_threads must be >= 0, got {threads}")
    if threads:
        threadpool_limits(limits=threads, user_api="blas")
