"""The ranking engine behind the gRPC service, free of gRPC: features in, ranked items out.

Per request the engine makes one Redis round trip: the user's ``user_behaviour`` hash and the
materialization counter, in one pipeline. Candidates' features come from the in-process
:class:`avrec.server.item_snapshot.ItemSnapshot`, reloaded when the counter moves or the snapshot
expires (with the retrieval index rebuilt from it). The user's inputs are encoded with the
model's own :class:`avrec.ranker.features.FeatureEncoder`, and the ranker scores all candidates in
one ONNX run. Requests are checked by :mod:`avrec.server.request_checks` (errors a caller can fix
raise
:class:`~avrec.server.request_checks.RequestError`) and answers assembled by
:mod:`avrec.server.answers`; Redis failures raise :class:`StoreUnavailableError`.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from avrec.errors import StoreUnavailableError
from avrec.feature_store import materialization_key
from avrec.names import USER_BEHAVIOUR, USER_HISTORY
from avrec.online_features import MixedVersionsError
from avrec.pit_join import DERIVED_AGES
from avrec.ranker.contract import ContractError
from avrec.ranker.features import ItemVectors
from avrec.ranker.hybrid_pipeline import HybridPipeline, ServedUser, item_stats
from avrec.ranker.user_score_cache import UserScoreCache
from avrec.redis_client import STORE_ERRORS, Client
from avrec.server import metrics
from avrec.server.answer_records import AnswerRecords
from avrec.server.answers import Ranked, assemble, history_rows, mmr, sigmoid
from avrec.server.clock import Clock
from avrec.server.feature_reader import OnlineRow, ViewReader
from avrec.server.in_flight import InFlight
from avrec.server.item_snapshot import (
    BEHAVIOUR_VIEW,
    EMBEDDING_VIEW,
    YIELD_SECONDS,
    ItemSnapshot,
    RowCache,
    age_days,
    load_snapshot,
)
from avrec.server.models import ServingModels, UserInputs
from avrec.server.request_checks import RequestError, candidate_rows, check_request
from avrec.server.retrieval import CandidateIndex
from avrec.server.snapshot_process import SnapshotProcess, SnapshotProcessError

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from feast import FeatureStore

    from avrec.server.config import ServeConfig

USER_VIEW = USER_BEHAVIOUR
HISTORY_VIEW = USER_HISTORY
USER_AGE = "days_since_last_interaction"


@dataclass
class _Loaded:
    """What a request is served with: the models and the item snapshot they were bound to.
    A request reads ``engine._loaded`` once; a reload or a model hot swap replaces it whole."""

    snapshot: ItemSnapshot
    vectors: ItemVectors
    unit: np.ndarray
    popular: np.ndarray
    index: CandidateIndex | None
    models: ServingModels  # the models this snapshot was loaded for
    records: AnswerRecords  # the snapshot's items encoded for answers
    pipeline: HybridPipeline | None = None  # the hybrid over the snapshot's rows
    stats: dict[str, np.ndarray] | None = None  # its item statistics, snapshot row order


class _StoreRead(InFlight):
    """An :class:`InFlight` whose failure to send is a :class:`StoreUnavailableError`; it
    keeps the history reader it was sent with (a model hot swap may change the engine's)."""

    def __init__(self, client: Client, commands: Sequence[tuple], history: ViewReader | None
                 ) -> None:
        super().__init__(client, commands)
        self.history = history

    def __enter__(self) -> _StoreRead:
        try:
            super().__enter__()
        except STORE_ERRORS as exc:
            raise StoreUnavailableError(f"online store unreachable: {exc}") from exc
        return self


def keep_out_of_gc() -> None:
    """Move everything alive now (a fresh snapshot: ~100,000 containers) out of the cyclic
    garbage collector, as ``avrec serve`` does with what start loaded.

    Each reload left its snapshot in the oldest generation, and soon a full collection
    traversed it all while holding the interpreter: one ~0.3 s pause every few reloads, felt
    by every request in flight (Rank at 100 req/s: p99 255 ms, max 631 ms over a minute with
    one reload; 16 / 34 ms without). Freezing costs nothing; a snapshot is acyclic, so when
    the next one replaces it reference counting frees it all the same (cyclic garbage frozen
    with it would stay: reloads make none that we know of).
    """
    gc.freeze()


def utc_datetime64(when: datetime) -> np.datetime64:
    """An aware datetime as naive-UTC ``datetime64[us]`` (the hybrid's time type)."""
    return np.datetime64(when.astimezone(UTC).replace(tzinfo=None), "us")


class RankingEngine:
    """Rank, Recommend and user-feature reads over Redis, an item snapshot and ONNX models."""

    def __init__(
        self,
        store: FeatureStore,
        client: Client,
        models: ServingModels,
        catalogue: pl.DataFrame,
        config: ServeConfig,
        clock: Clock,
    ) -> None:
        self.store, self.client, self.models = store, client, models
        self.catalogue, self.config, self.clock = catalogue, config, clock
        self.user_reader = ViewReader.from_store(store, USER_VIEW)
        self.behaviour_reader = ViewReader.from_store(store, BEHAVIOUR_VIEW)
        self.embedding_reader = ViewReader.from_store(store, EMBEDDING_VIEW)
        self.history_reader: ViewReader | None = None
        if models.hybrid is not None:
            try:
                self.history_reader = ViewReader.from_store(store, HISTORY_VIEW)
            except Exception as exc:  # Feast raises FeatureViewNotFoundException
                raise ContractError(str(models.directory), [
                    f"the hybrid reads the {HISTORY_VIEW!r} feature view, which the registry "
                    f"lacks ({exc}); run `avrec features && avrec apply && avrec materialize`"
                ]) from exc
        self.version_key = materialization_key(store.config.project)
        self._loaded: _Loaded | None = None
        # rows parsed by the last snapshot load, reused while their bytes stay the same
        self._row_caches = (RowCache(self.behaviour_reader), RowCache(self.embedding_reader))
        self._reload_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._reloader: threading.Thread | None = None
        self.reloads = 0
        self.snapshot_errors = 0
        self._scoring = threading.BoundedSemaphore(config.scoring_slots())  # compute_slots
        # background reloads read Redis in this child process when set (`avrec serve` sets it)
        self.snapshot_process: SnapshotProcess | None = None

    # -- item snapshot ---------------------------------------------------------------------

    def _load(self, materialization: bytes | None, now: datetime,
              models: ServingModels | None = None, background: bool = False) -> _Loaded:
        """A snapshot bound to ``models`` (default: the serving ones); ``background``: no
        request waits for it, so it reads in pauses (:class:`RowCache`)."""
        models = models or self.models
        snapshot = self._read_snapshot(models, materialization, now, background)
        wanted = models.contract.embedding_version
        if snapshot.embedding_version != wanted:
            raise MixedVersionsError(
                f"the online store serves embedding version {snapshot.embedding_version!r}, "
                f"the model {models.version} was trained on {wanted!r}"
            )
        has = snapshot.has_vector
        vectors = ItemVectors(snapshot.item_ids[has], snapshot.vectors[has], "served")
        # the tower's ANN index serves the deep ranker's Recommend only (the hybrid builds its
        # pool from the whole catalogue); its build holds the GIL for ~0.14 s
        index = (CandidateIndex.build(models, snapshot)
                 if models.user_tower is not None and models.hybrid is None else None)
        pipeline = stats = None
        if models.hybrid is not None:
            pipeline = self._bound_pipeline(models, snapshot)
            stats = item_stats(snapshot.frame)
        return _Loaded(snapshot, vectors, snapshot.unit_vectors(),
                       np.argsort(-snapshot.popularity, kind="stable"), index, models,
                       self._answer_records(snapshot), pipeline, stats)

    def _answer_records(self, snapshot: ItemSnapshot) -> AnswerRecords:
        """The serving snapshot's records again when its items, titles and missing flags are
        the same (most reloads bring new behaviour rows only), else new ones (~30 ms)."""
        loaded = self._loaded
        if loaded is not None:
            records = loaded.records
            if (np.array_equal(records.item_ids, snapshot.item_ids)
                    and np.array_equal(records.missing, snapshot.missing)
                    and records.titles == snapshot.titles):
                return records
        return AnswerRecords.from_items(snapshot.item_ids, snapshot.titles, snapshot.missing)

    def _read_snapshot(self, models: ServingModels, materialization: bytes | None,
                       now: datetime, background: bool) -> ItemSnapshot:
        """The item rows from Redis: in the :attr:`snapshot_process` for a background reload
        when there is one, else here (a background read pausing between chunks)."""
        refresh = timedelta(seconds=self.config.snapshot_refresh_seconds)
        if background and self.snapshot_process is not None:
            try:
                return self.snapshot_process.load(models.encoder, now, refresh,
                                                  models.vector_field, materialization)
            except SnapshotProcessError as exc:
                logger.warning("snapshot process failed, reloading in process: %s", exc)
        return load_snapshot(
            self.client, self.behaviour_reader, self.embedding_reader, self.catalogue,
            models.encoder, now, refresh, models.vector_field, materialization,
            self._row_caches, YIELD_SECONDS if background else 0.0,
        )

    def _bound_pipeline(self, models: ServingModels, snapshot: ItemSnapshot) -> HybridPipeline:
        """The hybrid bound to the snapshot's items and vectors: the serving one again when
        neither changed since (a reload after a materialization mostly brings new behaviour
        rows; item statistics are not part of the binding), else a new binding.

        Binding re-indexes the history scorers' sparse weights: 135-180 ms of each reload
        on session 14's machine, in holds of the interpreter of up to 11 ms, which every
        request in flight during a background reload waited through.
        """
        loaded = self._loaded
        assert models.hybrid is not None
        if (loaded is not None and loaded.pipeline is not None and loaded.models is models
                and np.array_equal(loaded.snapshot.item_ids, snapshot.item_ids)
                and np.array_equal(loaded.snapshot.vectors, snapshot.vectors)):
            return loaded.pipeline
        pipeline = models.hybrid.bind(snapshot.item_ids, snapshot.vectors, self.catalogue)
        pipeline.user_cache = UserScoreCache(self.config.user_cache_entries)
        return pipeline

    def swap_models(self, models: ServingModels) -> None:
        """Serve ``models`` from the next request on (a model hot swap).

        The new models get a snapshot of their own (loaded here, in the caller's thread, while
        requests go on with the old pair); then one reference swap. A request holds the pair
        it started with, so every answer is the old model's or the new one's, never a mix.
        Raises (the old models keep serving) when the online store does not serve what the
        new models need: their embedding version, or the ``user_history`` view of a hybrid.
        """
        history_reader = self.history_reader
        if models.hybrid is not None and history_reader is None:
            try:
                history_reader = ViewReader.from_store(self.store, HISTORY_VIEW)
            except Exception as exc:  # Feast raises FeatureViewNotFoundException
                raise ContractError(str(models.directory), [
                    f"the hybrid reads the {HISTORY_VIEW!r} feature view, which the registry "
                    f"lacks ({exc})"]) from exc
        with self._reload_lock:  # no snapshot reload of the old models in between
            loaded = self._load(self.materialization(), self.clock.now(), models)
            self.history_reader = history_reader
            self.models, self._loaded = models, loaded
            keep_out_of_gc()

    def ensure_snapshot(self, materialization: bytes | None, now: datetime) -> _Loaded:
        """The snapshot to answer with.

        A stale snapshot (the materialization counter moved, or the refresh interval passed)
        is still served while one background thread loads its successor and swaps it in, so
        no request waits for a reload. A request waits only when there is no snapshot yet or
        when the current one holds a row past its TTL (point-in-time correctness comes
        first). A failed reload keeps the old snapshot.
        """
        loaded = self._loaded
        if loaded is not None and self._current(loaded, materialization, now):
            metrics.SNAPSHOT.labels("hit").inc()
            metrics.SNAPSHOT_AGE.set((now - loaded.snapshot.loaded_at).total_seconds())
            return loaded
        expires = loaded.snapshot.expires_at if loaded is not None else None
        if loaded is not None and (expires is None or now < expires):
            metrics.SNAPSHOT.labels("stale").inc()
            self._reload_in_background(materialization, now)
            return loaded
        with self._reload_lock:
            return self._reload(materialization, now)

    @staticmethod
    def _current(loaded: _Loaded, materialization: bytes | None, now: datetime) -> bool:
        return (loaded.snapshot.materialization == materialization
                and now < loaded.snapshot.valid_until)

    def _reload(self, materialization: bytes | None, now: datetime,
                background: bool = False) -> _Loaded:
        """Load and swap in a new snapshot (the caller holds the reload lock)."""
        loaded = self._loaded
        if loaded is not None and self._current(loaded, materialization, now):
            return loaded
        try:
            self._loaded = self._load(materialization, now, background=background)
            keep_out_of_gc()
            self.reloads += 1
            metrics.SNAPSHOT.labels("reload").inc()
        except STORE_ERRORS as exc:
            raise StoreUnavailableError(f"online store unreachable: {exc}") from exc
        except MixedVersionsError:
            self.snapshot_errors += 1
            if loaded is None:
                raise
            loaded.snapshot.materialization = materialization
            loaded.snapshot.valid_until = now + timedelta(
                seconds=self.config.snapshot_refresh_seconds)
        return self._loaded

    def _reload_in_background(self, materialization: bytes | None, now: datetime) -> None:
        """Start a reload thread unless one is running."""
        with self._state_lock:
            if self._reloader is not None and self._reloader.is_alive():
                return
            self._reloader = threading.Thread(
                target=self._background_reload, args=(materialization, now),
                name="avrec-snapshot-reload", daemon=True)
            self._reloader.start()

    def _background_reload(self, materialization: bytes | None, now: datetime) -> None:
        try:
            with self._reload_lock:
                self._reload(materialization, now, background=True)
        except Exception as exc:  # any failure: the old snapshot keeps serving
            self.snapshot_errors += 1
            metrics.SNAPSHOT.labels("failed").inc()
            logger.warning("background snapshot reload failed (the old one serves): %s", exc)

    def wait_for_reload(self, timeout: float | None = None) -> bool:
        """Wait for a running background reload; False if it is still running."""
        reloader = self._reloader
        if reloader is not None:
            reloader.join(timeout)
            return not reloader.is_alive()
        return True

    # -- user --------------------------------------------------------------------------------

    def materialization(self) -> bytes | None:
        """The materialization counter alone (at start; requests read it with the user)."""
        try:
            return self.client.get(self.version_key)
        except STORE_ERRORS as exc:
            raise StoreUnavailableError(f"online store unreachable: {exc}") from exc

    def read_user(self, user_id: int, now: datetime) -> tuple[OnlineRow, bytes | None]:
        """The user's row and the materialization counter, in one pipelined round trip."""
        row, _, version = self._read_user(user_id, now, history=False)
        return row, version

    def _read_user(self, user_id: int, now: datetime, history: bool
                   ) -> tuple[OnlineRow, OnlineRow | None, bytes | None]:
        """The user's ``user_behaviour`` row, their ``user_history`` row (when asked and the
        hybrid serves) and the materialization counter, in one pipelined round trip."""
        with self._send_user_read(user_id, history) as read:
            return self._user_rows(read, user_id, now)

    def _send_user_read(self, user_id: int, history: bool) -> _StoreRead:
        """:meth:`_read_user`'s commands, sent (enter the result; the replies travel)."""
        reader = self.history_reader if history else None
        commands = [self.user_reader.command(user_id)]
        if reader is not None:
            commands.append(reader.command(user_id))
        commands.append(("GET", self.version_key))
        return _StoreRead(self.client, commands, reader)

    def _user_rows(self, read: _StoreRead, user_id: int, now: datetime
                   ) -> tuple[OnlineRow, OnlineRow | None, bytes | None]:
        """The rows of a :meth:`_send_user_read`, decoded at ``now``."""
        try:
            replies = read.replies()
        except STORE_ERRORS as exc:
            raise StoreUnavailableError(f"online store unreachable: {exc}") from exc
        reader = read.history
        row = self.user_reader.decode_one(user_id, replies[0], now)
        history_row = reader.decode_one(user_id, replies[1], now) if reader else None
        return row, history_row, replies[-1]

    def user_inputs(
        self, row: OnlineRow, loaded: _Loaded, now: datetime, tower: bool = False
    ) -> UserInputs:
        """Encode a user's row exactly as the ranker's (or the user tower's) training rows."""
        record = self.user_reader.prefixed(row)
        last = record.get(DERIVED_AGES[USER_AGE])
        (record[USER_AGE],) = age_days(now, [last])
        models = loaded.models
        encoder = models.tower_encoder if tower else models.encoder
        assert encoder is not None
        dense = encoder.user_dense_record(record)
        history_rows = encoder.history_row(row.values.get("recent_items"), loaded.vectors)
        mask = (history_rows >= 0).astype(np.float32)
        history = loaded.vectors.vectors[np.maximum(history_rows, 0)] * mask[..., None]
        return UserInputs(dense.astype(np.float32), history.astype(np.float32), mask)

    # -- requests ----------------------------------------------------------------------------

    def candidate_rows(self, item_ids: Sequence[int], loaded: _Loaded) -> np.ndarray:
        """Snapshot rows of the candidates (:func:`avrec.server.request_checks.candidate_rows`)."""
        return candidate_rows(item_ids, loaded.snapshot, self.config.max_candidates)

    def _check(self, user_id: int, top_k: int, lam: float) -> None:
        check_request(user_id, top_k, lam, self.config.max_top_k)

    def _rank_rows(
        self, user: UserInputs, row: OnlineRow, rows: np.ndarray, loaded: _Loaded, top_k: int,
        explain: bool, lam: float, now: datetime,
    ) -> Ranked:
        snap = loaded.snapshot
        logits = loaded.models.score(user, snap.vectors[rows], snap.dense[rows])
        relevance = sigmoid(logits.astype(np.float64))
        k = len(rows) if top_k == 0 else min(top_k, len(rows))
        if 0.0 < lam < 1.0:
            order = mmr(relevance, loaded.unit[rows], k, lam)
        else:
            order = np.argsort(-relevance, kind="stable")[:k]
        return self._answer(rows[order], relevance[order], row, loaded, explain, now)

    def _hybrid_rows(
        self, history: OnlineRow | None, loaded: _Loaded, top_k: int, lam: float,
        now: datetime, candidates: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(snapshot rows, probabilities) the hybrid serves, best first (see
        :meth:`avrec.ranker.hybrid_pipeline.HybridPipeline.recommend`); MMR re-orders when asked."""
        assert loaded.pipeline is not None and loaded.stats is not None
        values = history.values if history is not None and history.fresh else {}
        stamp = history.event_timestamp if values and history is not None else None
        user = ServedUser(np.asarray(values.get("history_items") or [], dtype=np.int64),
                          np.asarray(values.get("history_ratings") or [], dtype=np.float64),
                          utc_datetime64(stamp) if stamp is not None else None)
        diverse = 0.0 < lam < 1.0
        with self._scoring:
            answer = loaded.pipeline.recommend(user, loaded.stats, utc_datetime64(now),
                                               0 if diverse else top_k, candidates)
        if not diverse:
            return answer.columns, answer.probability
        k = len(answer.columns) if top_k == 0 else min(top_k, len(answer.columns))
        order = mmr(answer.probability, loaded.unit[answer.columns], k, lam)
        return answer.columns[order], answer.probability[order]

    def _answer(
        self, chosen: np.ndarray, scores: np.ndarray, row: OnlineRow, loaded: _Loaded,
        explain: bool, now: datetime,
    ) -> Ranked:
        """The chosen snapshot rows as an answer (:func:`avrec.server.answers.assemble`)."""
        return assemble(chosen, scores, row, loaded.snapshot, loaded.records, loaded.unit,
                        explain, now, loaded.models.version)

    def rank(
        self, user_id: int, item_ids: Sequence[int], top_k: int = 0, explain: bool = False,
        diversity_lambda: float = 0.0,
    ) -> Ranked:
        """Score the caller's candidates for ``user_id`` and return them best first."""
        self._check(user_id, top_k, diversity_lambda)
        now = self.clock.now()
        with self._send_user_read(user_id, history=True) as read:
            # the candidates are checked against the serving snapshot while the read travels
            current, rows, refused = self._loaded, None, None
            if current is not None:
                try:
                    rows = self.candidate_rows(item_ids, current)
                except RequestError as exc:
                    refused = exc
            row, history, version = self._user_rows(read, user_id, now)
        loaded = self.ensure_snapshot(version, now)
        if loaded is not current or rows is None:  # not checked against the snapshot served
            if loaded is current and refused is not None:
                raise refused
            rows = self.candidate_rows(item_ids, loaded)
        if loaded.pipeline is not None:
            chosen, scores = self._hybrid_rows(history, loaded, top_k, diversity_lambda, now,
                                               rows)
            return self._answer(chosen, scores, row, loaded, explain, now)
        user = self.user_inputs(row, loaded, now)
        return self._rank_rows(user, row, rows, loaded, top_k, explain, diversity_lambda, now)

    def recommend(
        self, user_id: int, top_k: int, explain: bool = False, diversity_lambda: float = 0.0
    ) -> Ranked:
        """Retrieve candidates from the whole catalogue (user tower + ANN), then rank them.

        The user's recent items are left out. A cold-start user (no fresh row) gets the
        tower's candidates for a user without history, merged with the most popular items.
        """
        if top_k <= 0:
            raise RequestError("top_k must be positive for Recommend")
        self._check(user_id, top_k, diversity_lambda)
        now = self.clock.now()
        row, history, version = self._read_user(user_id, now, history=True)
        loaded = self.ensure_snapshot(version, now)
        if loaded.pipeline is not None:
            chosen, scores = self._hybrid_rows(history, loaded, top_k, diversity_lambda, now)
            return self._answer(chosen, scores, row, loaded, explain, now)
        user = self.user_inputs(row, loaded, now)
        seen = set(history_rows(row, loaded.snapshot).tolist())
        recent = row.values.get("recent_items") or []
        seen |= {int(r) for r in loaded.snapshot.rows(np.asarray(recent, np.int64)) if r >= 0}
        wanted = max(self.config.retrieval_candidates, top_k)
        pool: list[int] = []
        if loaded.index is not None:
            models = loaded.models
            query = models.user_vector(self.user_inputs(row, loaded, now, tower=True))
            found, _ = loaded.index.search(query, wanted, seen)
            pool = found.tolist()
        if not row.fresh or loaded.index is None:
            popular = [int(r) for r in loaded.popular[: wanted + len(seen)] if int(r) not in seen]
            pool = list(dict.fromkeys(pool + popular[:wanted]))
        rows = np.asarray(pool, dtype=np.int64)
        return self._rank_rows(user, row, rows, loaded, top_k, explain, diversity_lambda, now)
