"""Sharing the machine with a second process: CPUs and thread pools while pinned, and back."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from avrec.ranker import cpu_share

needs_affinity = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU affinity and two CPUs")


def _blas_threads() -> list[int]:
    np.ones(2) @ np.ones(2)  # BLAS loaded
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@needs_affinity
def test_pinned_blocks_run_on_their_cpus_with_pools_of_that_size() -> None:
    before_cpus, before_threads = os.sched_getaffinity(0), _blas_threads()
    first, second = cpu_share.split_cpus()  # type: ignore[misc]
    assert first | second == before_cpus and not first & second and len(second) == 1
    with cpu_share.pin(second):
        assert os.sched_getaffinity(0) == second
        assert cpu_share.usable_cpus() == 1
        assert set(_blas_threads()) == {1}
    assert os.sched_getaffinity(0) == before_cpus
    assert _blas_threads() == before_threads


def test_no_cpus_given_keeps_the_affinity() -> None:
    before = cpu_share.usable_cpus()
    with cpu_share.pin(None):
        assert cpu_share.usable_cpus() == before


PINNED_IMPORT = """
import os, sys
from threadpoolctl import threadpool_info
from avrec.ranker import cpu_share
assert "torch" not in sys.modules
with cpu_share.pin({max(os.sched_getaffinity(0))}):
    import torch
    inside = torch.get_num_threads()
print(inside, torch.get_num_threads(), min(p["num_threads"] for p in threadpool_info()))
"""


@needs_affinity
def test_pools_first_loaded_while_pinned_get_every_cpu_after() -> None:
    done = subprocess.run([sys.executable, "-c", PINNED_IMPORT], capture_output=True,
                          text=True, timeout=300, check=True)
    inside, torch_after, smallest_pool = (int(x) for x in done.stdout.split())
    cpus = len(os.sched_getaffinity(0))
    assert (inside, torch_after, smallest_pool) == (1, cpus, cpus)
