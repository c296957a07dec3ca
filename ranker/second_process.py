"""Models evaluated in a second process, beside the others (``avrec evaluate --processes 2``).

The sequential and deep models train single-threaded torch and read nothing of the run's
shared state (the baselines' tuned settings, the hybrids' generator fits), while the baselines
and hybrids keep one core busy for most of a run. On a machine with two cores the independent
models therefore run in a spawned process beside the others instead of after them. The second
process builds its own specs from the same arguments (:class:`SpecArgs`), evaluates them on
the same split with :func:`~avrec.ranker.evaluation.run_model`, and sends each finished
:class:`~avrec.ranker.evaluation.ModelRun` back; every model is seeded and single-threaded, so
the numbers are the ones an inline run gives (``tests/ranker/test_second_process.py``).

Then it helps with the hybrid ablations (``shared``): they keep ``hybrid-mixed``'s settings
and reuse its generator fits, so once that model has run this process sends a copy of the
run's state (:class:`~avrec.ranker.model_registry.RunState`: settings and fits, no models),
and both processes take the ablations one at a time from a shared counter (:func:`claim`)
until none is left: whichever is free first runs the next, with the numbers an inline run
gives.

Each process runs on its own CPUs with thread pools of that size while both work
(:mod:`avrec.ranker.cpu_share`): the second process on the last CPU, this one on the others
(all of them while the second one waits for work).
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
from avrec.ranker.model_registry import RunState
from avrec.ranker.recommender import catalogue
from avrec.ranker.splits import Split
from avrec.ranker.stage_data import StageData, stage_data

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


def _work(out: Any, inbox: Any, claims: Any, names: list[str], shared: list[str],
          spec_args: SpecArgs, split: Split, items: pl.DataFrame, harness: HarnessArgs,
          cpus: set[int] | None) -> None:
    """The second process (on ``cpus``): evaluate ``names`` and put ``("run", ModelRun)`` for
    each, then ``("idle", None)``; then wait on ``inbox`` for the run's state and evaluate the
    ``shared`` models it claims (``claims``) until none is left, or for ``stop``; then
    ``("done", None)``. ``("error", traceback)`` on any failure."""
    try:
        with pin(cpus):
            stages = _stages(split, items)
            _evaluate(out, names, spec_args, None, stages, items, harness)
            out.put(("idle", None))
            state = _wait_for_state(inbox)
            while state is not None and (name := claim(claims, shared)) is not None:
                _evaluate(out, [name], spec_args, state, stages, items, harness)
        out.put(("done", None))
    except BaseException:  # everything, KeyboardInterrupt too, goes back to the parent
        out.put(("error", traceback.format_exc()))


def _stages(split: Split, items: pl.DataFrame) -> tuple[str, StageData, StageData]:
    item_ids = catalogue(items)
    return (split.kind, stage_data(split.stage("validation"), item_ids),
            stage_data(split.stage("test"), item_ids))


def _wait_for_state(inbox: Any) -> RunState | None:
    """The run's state once the parent shares it; None on ``stop`` or when the parent died."""
    parent = multiprocessing.parent_process()
    while True:
        try:
            kind, value = inbox.get(timeout=POLL_SECONDS)
        except queue.Empty:
            if parent is not None and not parent.is_alive():
                return None
            continue
        return value if kind == "share" else None


def claim(claims: Any, shared: Sequence[str]) -> str | None:
    """The next of the ``shared`` models nobody has claimed yet (``claims``: a shared counter
    both processes take from), or None when all are taken."""
    with claims.get_lock():
        index = claims.value
        claims.value += 1
    return shared[index] if index < len(shared) else None


def _evaluate(out: Any, names: list[str], spec_args: SpecArgs, state: RunState | None,
              stages: tuple[str, StageData, StageData], items: pl.DataFrame,
              harness: HarnessArgs) -> None:
    from avrec.ranker.model_registry import model_specs

    specs = model_specs(names, spec_args.quick, spec_args.positive_threshold,
                        spec_args.encodings, spec_args.offline, state)
    kind, validation, test = stages
    for spec in specs:
        print(f"    {kind}: {spec.name} (second process)", flush=True)
        out.put(("run", run_model(spec, validation, test, items, harness.ks, harness.seed,
                                  harness.short_history, harness.explore_tolerance)))


class SecondProcess:
    """Evaluates ``names`` in a spawned process, then takes its share of ``shared`` (models
    both processes may run once the run's state is known: :meth:`share`); :meth:`finished`
    and :meth:`wait` hand the runs back as they arrive, :meth:`claim` gives this process its
    next shared model.

    >>> second = SecondProcess(["sequential-id"], SpecArgs(quick=True))
    >>> second.names, second.shared
    (('sequential-id',), ())
    """

    def __init__(self, names: Sequence[str], spec_args: SpecArgs,
                 shared: Sequence[str] = (), state: RunState | None = None) -> None:
        self.names = tuple(names)
        self.shared = tuple(shared)
        self.state = RunState() if state is None else state  # this process's run state
        self.spec_args = spec_args
        self._context = multiprocessing.get_context("spawn")
        self._queue: Any = None
        self._inbox: Any = None
        self._claims: Any = None
        self._process: Any = None
        self._cpus: tuple[set[int], set[int]] | None = None
        self._idle = self._done = self._shared = False
        self._pinned = ExitStack()

    def start(self, split: Split, items: pl.DataFrame, harness: HarnessArgs) -> None:
        """Start evaluating on ``split`` (one process per split); this process keeps the
        other CPUs while the second one works (until it is idle, through, or :meth:`close`)."""
        self.close()
        self._queue = self._context.Queue()
        self._inbox = self._context.Queue()
        self._claims = self._context.Value("i", 0)
        self._idle = self._done = self._shared = False
        self._cpus = split_cpus()
        self._process = self._context.Process(
            target=_work, name="avrec-evaluate-second",
            args=(self._queue, self._inbox, self._claims, list(self.names), list(self.shared),
                  self.spec_args, split, items, harness,
                  self._cpus[1] if self._cpus else None),
            daemon=True)
        self._process.start()
        self._pin()

    def share(self) -> None:
        """Let the second process take shared models, continuing the run from a copy of
        :attr:`state` (the settings chosen so far and the generator fits; once per split)."""
        if self._shared or not self.shared:
            return
        self._shared = True
        copy = RunState(dict(self.state.tuned), self.state.cache.fits_only())
        self._inbox.put(("share", copy))
        if self._idle:
            self._pin()  # it works again: back to this process's own CPUs

    def claim(self) -> str | None:
        """The next shared model for this process to run, or None when all are taken."""
        if not self.shared:
            return None
        if not self._shared:
            raise RuntimeError("claim() before share(): the second process has no state yet")
        return claim(self._claims, self.shared)

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
        if not self._shared:
            self._inbox.put(("stop", None))
        runs = []
        while not self._done:
            try:
                message = self._queue.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if not self._process.is_alive():
                    names = ", ".join(self.names + self.shared)
                    raise ModelError(f"the second evaluation process ({names})"
                                     f" died with exit code {self._process.exitcode}") from None
                continue
            runs.extend(self._take(message))
        self._process.join()
        return runs

    def _take(self, message: tuple[str, Any]) -> list[ModelRun]:
        kind, value = message
        if kind == "run":
            return [value]
        if kind == "idle":
            self._idle = True
            if not self._shared:
                self._pinned.close()  # nothing to do there for now: every CPU is this one's
            return []
        self._done = True
        self._pinned.close()  # the second process is through: every CPU is this one's again
        if kind == "error":
            raise ModelError(f"the second evaluation process failed:\n{value}")
        return []

    def _pin(self) -> None:
        self._pinned.close()
        self._pinned.enter_context(pin(self._cpus[0] if self._cpus else None))

    def close(self) -> None:
        """Stop the process if it still runs (after a failure in the parent)."""
        if self._process is not None and self._process.is_alive():
            self._process.terminate()
            self._process.join()
        self._process = None
        self._pinned.close()
