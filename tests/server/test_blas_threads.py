"""A serving process caps numpy's BLAS threads (server/blas_threads.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from avrec.server.blas_threads import limit_blas_threads
from avrec.server.config import ServeConfig

PROBE = """
import json, sys
import numpy
from threadpoolctl import threadpool_info
from avrec.server.blas_threads import limit_blas_threads
limit_blas_threads(int(sys.argv[1]))
print(json.dumps([p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]))
"""


def _blas_threads(limit: int) -> list[int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(limit)], capture_output=True,
                         text=True, check=True, env={"OPENBLAS_NUM_THREADS": "2",
                                                    "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout)


def test_a_server_runs_one_blas_thread_by_default() -> None:
    assert ServeConfig().blas_threads == 1
    assert _blas_threads(1) and set(_blas_threads(1)) == {1}
    assert set(_blas_threads(0)) == {2}  # 0: left as the environment set it


def test_a_negative_count_is_refused() -> None:
    with pytest.raises(ValueError, match="blas_threads"):
        limit_blas_threads(-1)


def test_starting_a_server_caps_the_processs_blas_threads(stack) -> None:
    """``start()`` itself caps them (not only ``avrec serve``): the servers of
    ``serve_bench.py``, ``events_bench.py`` and the tests once ran OpenBLAS's spinning
    threads beside every request (the hybrid's server CPU per Rank 13.3 against 6.9 ms
    capped, session 15's machine, ``bench/serve_bench.py``)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from tests.server.conftest import running

    threadpool_limits(limits=2, user_api="blas")
    assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {2}
    for _service in running(stack, hybrid=False, blas_threads=1):
        assert {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"} == {1}
