"""Which CPUs a process may run on, and giving one of them to a second process.

Two processes that each start thread pools for every core (numpy's BLAS, OpenMP in implicit,
torch) fight over a two-core machine: spinning pool threads take each other's time slices
and everything slows (measured: all 17 models of ``avrec evaluate`` took 26.5 minutes in one
process and 30 with an unpinned second one, EASE 71 -> 111 s). So a process that shares the
machine runs on its own CPUs with pools of that size: :func:`pin` sets the CPU affinity and
caps the BLAS/OpenMP pools (and torch, when loaded) at that many threads; :func:`usable_cpus`
tells code that sizes its own pools (implicit's ALS) how many it has.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from threadpoolctl import ThreadpoolController, threadpool_limits


def usable_cpus() -> int:
    """How many CPUs this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def split_cpus() -> tuple[set[int], set[int]] | None:
    """This process's CPUs as (the first process's, the second's: the last one), or None where
    there is no affinity to set or a single CPU."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return set(cpus[:-1]), {cpus[-1]}


@contextmanager
def pin(cpus: set[int] | None) -> Iterator[None]:
    """Run the block on ``cpus`` only (None: where it ran), with thread pools of that size;
    the affinity and pool sizes come back after it."""
    threads = len(cpus) if cpus else usable_cpus()
    before = os.sched_getaffinity(0) if cpus else None
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None
    loaded = _pool_libraries()
    if cpus:
        os.sched_setaffinity(0, cpus)
    limits = threadpool_limits(threads)
    if torch is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        limits.restore_original_limits()
        if torch is not None and torch_threads is not None:
            torch.set_num_threads(torch_threads)
        if before is not None:
            os.sched_setaffinity(0, before)
            _widen_pools_loaded_since(loaded, torch is not None, len(before))


def _pool_libraries() -> set[str]:
    """The thread-pool libraries (BLAS, OpenMP) loaded now, by file."""
    return {lib.filepath for lib in ThreadpoolController().lib_controllers}


def _widen_pools_loaded_since(loaded: set[str], had_torch: bool, threads: int) -> None:
    """Give ``threads`` threads to the pools first loaded while pinned, and to torch when it
    was first imported then: each sized itself to the CPUs it saw at load and would keep that
    after they came back (seen: torch and an OpenMP pool imported in a block pinned to one
    CPU stayed at one thread, so the models after the second process trained on one core)."""
    controller = ThreadpoolController()
    new = [lib.filepath for lib in controller.lib_controllers if lib.filepath not in loaded]
    if new:
        controller.select(filepath=new).limit(limits=threads)
    if not had_torch and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
