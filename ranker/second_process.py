"""Models evaluated in a second process, beside the others (``avrec evaluate --processes 2``).

The sequential and deep models train single-threaded torch and read nothing of the run's
shared state (the baselines' tuned settings, the hybrids' generator fits), while the baselines
and hybrids keep one core busy for most of a run. On a machine with two cores the independent
models therefore run in a spawned process beside the others instead of after them. The second
process builds its own specs from the same arguments (:class:`SpecArgs`), evaluates them on
the same split with :func:`~avrec.ranker.evaluation.run_model`, and sends each finished
:class:`~avrec.ranker.evaluation.ModelRun` back; every model is seeded and single-threaded, so
the numbers are the ones an inline run gives (``tests/ranker/test_second_process.py``).

Each process runs on its own CPUs with thread pools of that size while both run
(:mod:`avrec.ranker.cpu_share`): the second process on the last CPU, this one on the others.
Spawned, not forked: the parent holds polars' and torch's thread pools, which a fork does not
carry safely.
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from avrec.errors import ModelError
from avrec.ranker.cpu_share import pin, split_cpus
from avrec.ranker.evaluation import ModelRun, run_model
from avrec.ranker.recommender import catalogue
from avrec.ranker.splits import Split
from avrec.ranker.stage_data import stage_data

POLL_SECONDS = 1.0  # how often :meth:`SecondProcess.wait` checks that the process lives


@dataclass(frozen=True)
class SpecArgs:
    """The arguments of :func:`~avrec.ranker.model_registry.model_specs` besides the names."""

    quick: bool = False
    positive_threshold: float = 4.0
    encodings: Path | None = None
    offline: Path | None = None


@dataclass(frozen=True)
class HarnessArgs:
    """What :func:`~avrec.ranker.evaluation.run_model` needs besides the spec and stages."""

    ks: tuple[int, ...]
    seed: int
    short_history: int
    explore_tolerance: float


def _work(out: Any, names: list[str], spec_args: SpecArgs, split: Split, items: pl.DataFrame,
          harness: HarnessArgs, cpus: set[int] | None) -> None:
    """The second process (on ``cpus``): evaluate ``names`` and put ``("run", ModelRun)`` for
    each, then ``("done", None)``; ``("error", traceback)`` on any failure."""
    try:
        with pin(cpus):
            _evaluate(out, names, spec_args, split, items, harness)
        out.put(("done", None))
    except BaseException:  # everything, KeyboardInterrupt too, goes back to the parent
        out.put(("error", traceback.format_exc()))


def _evaluate(out: Any, names: list[str], spec_args: SpecArgs, split: Split,
              items: pl.DataFrame, harness: HarnessArgs) -> None:
    from avrec.ranker.model_registry import model_specs

    specs = model_specs(names, spec_args.quick, spec_args.positive_threshold,
                        spec_args.encodings, spec_args.offline)
    item_ids = catalogue(items)
    validation = stage_data(split.stage("validation"), item_ids)
    test = stage_data(split.stage("test"), item_ids)
    for spec in specs:
        print(f"    {split.kind}: {spec.name} (second process)", flush=True)
        out.put(("run", run_model(spec, validation, test, items, harness.ks, harness.seed,
                                  harness.short_history, harness.explore_tolerance)))


class SecondProcess:
    """Evaluates ``names`` in a spawned process; :meth:`finished` and :meth:`wait` hand the
    runs back as they arrive.

    >>> second = SecondProcess(["sequential-id"], SpecArgs(quick=True))
    >>> second.names
    ('sequential-id',)
    """

    def __init__(self, names: Sequence[str], spec_args: SpecArgs) -> None:
        self.names = tuple(names)
        self.spec_args = spec_args
        self._context = multiprocessing.get_context("spawn")
        self._queue: Any = None
        self._process: Any = None
        self._done = False
        self._pinned = ExitStack()

    def start(self, split: Split, items: pl.DataFrame, harness: HarnessArgs) -> None:
        """Start evaluating on ``split`` (one process per split); this process keeps the
        other CPUs until the second one is through (or :meth:`close`)."""
        self.close()
        self._queue = self._context.Queue()
        self._done = False
        cpus = split_cpus()
        self._process = self._context.Process(
            target=_work, name="avrec-evaluate-second",
            args=(self._queue, list(self.names), self.spec_args, split, items, harness,
                  cpus[1] if cpus else None),
            daemon=True)
        self._process.start()
        self._pinned.enter_context(pin(cpus[0] if cpus else None))

    def finished(self) -> list[ModelRun]:
        """The runs that arrived since the last call, without waiting."""
        runs = []
        while not self._done:
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                break
            runs.extend(self._take(message))
        return runs

    def wait(self) -> list[ModelRun]:
        """Every run still to come (blocks); :class:`ModelError` when the process failed."""
        runs = []
        while not self._done:
            try:
                message = self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self._process.is_alive():
                    raise ModelError(f"the second evaluation process ({', '.join(self.names)})"
                                     f" died with exit code {self._process.exitcode}") from None
                continue
            runs.extend(self._take(message))
        self._process.join()
        return runs

    def _take(self, message: tuple[str, Any]) -> list[ModelRun]:
        kind, value = message
        if kind == "run":
            return [value]
        self._done = True
        self._pinned.close()  # the second process is through: every CPU is this one's again
        if kind == "error":
            raise ModelError(f"the second evaluation process failed:\n{value}")
        return []

    def close(self) -> None:
        """Stop the process if it still runs (after a failure in the parent)."""
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._process = None
        self._pinned.close()
