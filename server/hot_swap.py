"""Model hot swap: a running server takes up a new ``avrec train`` run without a restart.

A server started without a fixed ``model_dir`` serves the run that the models root's ``LATEST``
file names (``avrec train`` rewrites it after a run). :class:`ModelWatcher` reads that pointer
every ``model_watch_seconds`` (and at once on SIGHUP); when it names another run, a background
thread loads it with every check a start makes (:func:`avrec.server.models.load_serving_models`:
graphs, contracts against the feature services, the one-user graph's parity, the hybrid), binds
it to a fresh item snapshot (embedding version) and swaps the pair in with one reference
assignment (:meth:`avrec.server.engine.RankingEngine.swap_models`). Requests in flight finish with
the pair they started with, so each answer is the old model's or the new one's.

A run that fails any check (corrupt ONNX, contract mismatch, missing files) is refused: one
ERROR line names it and the reason, ``avrec_model_swaps_total{result="refused"}`` counts it,
the old model keeps serving, and the same pointer is not retried until ``LATEST`` changes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from avrec.ranker.contract import ITEM_SERVICE, USER_SERVICE, service_fields
from avrec.ranker.export import LATEST
from avrec.server import metrics
from avrec.server.models import load_serving_models

if TYPE_CHECKING:
    from avrec.server.config import ServeConfig
    from avrec.server.engine import RankingEngine

log = logging.getLogger("avrec.server.hot_swap")


class ModelWatcher:
    """Watches ``root/LATEST`` and hot-swaps the engine's models when it names a new run."""

    def __init__(self, engine: RankingEngine, root: Path, config: ServeConfig) -> None:
        self.engine, self.root, self.config = engine, Path(root), config
        self.serving = engine.models.directory.resolve()
        self.refused: Path | None = None  # the last run refused (not retried while named)
        self.swaps = self.refusals = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one check at a time
        self._thread: threading.Thread | None = None

    def pointed(self) -> Path | None:
        """The run ``LATEST`` names now (None: no pointer, or one being written)."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except OSError:
            return None
        return self.root / name if name else None

    def check(self) -> str:
        """Swap when ``LATEST`` names another run: ``"same"``, ``"swapped"`` or ``"refused"``."""
        with self._lock:
            target = self.pointed()
            if target is None or target.resolve() == self.serving:
                return "same"
            if self.refused is not None and target.resolve() == self.refused:
                return "refused"
            old = self.engine.models.version
            try:
                store = self.engine.store
                fields = service_fields(store, [USER_SERVICE, ITEM_SERVICE])
                models = load_serving_models(target, fields, None,
                                             threads=self.config.ort_threads,
                                             hybrid=self.config.hybrid)
                self.engine.swap_models(models)
            except Exception as exc:  # any failure: the old model keeps serving
                self.refused = target.resolve()
                self.refusals += 1
                metrics.MODEL_SWAPS.labels("refused").inc()
                reason = " ".join(str(exc).split())[:500]
                log.error("model %s refused, %s keeps serving: %s: %s", target, old,
                          type(exc).__name__, reason)
                return "refused"
            self.serving, self.refused = target.resolve(), None
            self.swaps += 1
            metrics.MODEL_SWAPS.labels("swapped").inc()
            log.info("model hot swap: %s -> %s", old, models.version)
            return "swapped"

    def wake(self) -> None:
        """Check now (SIGHUP)."""
        self._wake.set()

    def _run(self, interval: float | None) -> None:
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.check()

    def start(self, interval: float) -> ModelWatcher:
        """Check every ``interval`` seconds (0: only when woken) in a daemon thread."""
        self._thread = threading.Thread(target=self._run, args=(interval or None,),
                                        name="avrec-model-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)
