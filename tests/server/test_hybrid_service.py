"""The hybrid ranker served over real gRPC, against real Redis, Feast and its ONNX scorer.

The oracle reads the user's ``user_history`` row and every item's ``item_behaviour`` and
``item_embedding`` rows through Feast (provider reads with the views' TTLs, not the server's raw
Redis path), binds the saved pipeline to that catalogue and runs
:meth:`avrec.ranker.hybrid_pipeline.HybridPipeline.recommend`: the served answer must be the same.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest

from avrec import online_features, tables
from avrec.ranker.hybrid_pipeline import (
    AGE_COLUMN,
    ITEM_PREFIX,
    SavedPipeline,
    ServedUser,
    item_stats,
)
from avrec.server.protocol import ranking_pb2
from tests.server.conftest import current_snapshot

USER = 599  # rates until 2017-06: fresh at the replay clock, not touched by other tests


def _naive(when: datetime) -> np.datetime64:
    return np.datetime64(when.astimezone(UTC).replace(tzinfo=None), "us")


def oracle(stack, service, user_id: int, now: datetime, top_k: int,
           candidates: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(item ids, probabilities) the hybrid must serve, from Feast reads."""
    store = stack.store
    items = tables.read_table("items", stack.data_dir / "offline")
    ids = items["item_id"].to_list()
    behaviour = online_features.read_view(store, "item_behaviour", ids, now)
    embedding = online_features.read_view(store, "item_embedding", ids, now)
    vectors = [v if v is not None else None for v in embedding["embedding"].to_list()]
    dim = len(next(v for v in vectors if v is not None))
    matrix = np.stack([np.asarray(v if v is not None else np.zeros(dim), np.float32)
                       for v in vectors])
    frame = behaviour.select(
        *[pl.col(c).alias(f"{ITEM_PREFIX}{c}") for c in
          ("popularity_7d", "popularity_30d", "popularity_all", "mean_rating")],
        pl.col("first_interaction_at"),
    )
    firsts = frame["first_interaction_at"].to_list()
    frame = frame.with_columns(pl.Series(AGE_COLUMN, [
        None if f is None else (now - f).total_seconds() / 86400 for f in firsts],
        dtype=pl.Float64))
    history = online_features.read_view(store, "user_history", [user_id], now).row(0, named=True)
    user = ServedUser(np.asarray(history["history_items"] or [], np.int64),
                      np.asarray(history["history_ratings"] or [], np.float64),
                      _naive(history["event_timestamp"]) if history["fresh"] else None)
    saved = SavedPipeline.read(stack.model_dir / "hybrid")
    catalogue = np.asarray(ids, np.int64)
    pipeline = saved.bind(catalogue, matrix, items)
    columns = None
    if candidates is not None:
        order = np.argsort(catalogue)
        columns = order[np.searchsorted(catalogue[order], candidates)]
    answer = pipeline.recommend(user, item_stats(frame), _naive(now), top_k, columns)
    return catalogue[answer.columns].tolist(), answer.probability


def _served(answer) -> tuple[list[int], np.ndarray]:
    return ([i.item_id for i in answer.items],
            np.asarray([i.score for i in answer.items], np.float64))


@pytest.fixture()
def hybrid_client(hybrid_service):
    from avrec.server.client import RankingClient

    with RankingClient(f"127.0.0.1:{hybrid_service.port}") as c:
        yield c


def test_recommend_serves_what_the_pipeline_computes_from_feast_reads(online_hybrid) -> None:
    """On a single Redis and on the Redis Cluster."""
    from avrec.server.client import RankingClient

    stack, hybrid_service = online_hybrid
    current_snapshot(hybrid_service)  # item rows logged by earlier tests
    assert hybrid_service.engine.models.hybrid is not None
    with RankingClient(f"127.0.0.1:{hybrid_service.port}") as client:
        answer = client.recommend(USER, top_k=20)
    assert "+hybrid-" in answer.model_version
    now = answer.served_at.ToDatetime(tzinfo=UTC)
    ids, probability = _served(answer)
    want_ids, want_probability = oracle(stack, hybrid_service, USER, now, 20)
    assert ids == want_ids
    np.testing.assert_allclose(probability, want_probability, rtol=1e-4, atol=1e-6)
    # scores are probabilities over the pool (best first unless exploration slots reorder
    # the end of the list), not 1.0 for everyone
    if not hybrid_service.engine.models.hybrid.config.explore:
        assert (np.diff(probability) <= 1e-12).all()
    assert 0 < probability.sum() < 1 and probability.max() < 0.9


def test_recommend_leaves_out_the_users_history(stack, hybrid_client) -> None:
    answer = hybrid_client.recommend(USER, top_k=50)
    history = tables.read_table("user_history", stack.data_dir / "offline").filter(
        pl.col("user_id") == USER)["history_items"].to_list()[0]
    assert not set(_served(answer)[0]) & set(history)


def test_rank_scores_the_callers_candidates_like_the_oracle(
    stack, hybrid_service, hybrid_client
) -> None:
    current_snapshot(hybrid_service)  # item rows logged by earlier tests
    items = tables.read_table("items", stack.data_dir / "offline")["item_id"].to_list()
    candidates = items[::41][:150]
    answer = hybrid_client.rank(USER, candidates)
    ids, probability = _served(answer)
    assert sorted(ids) == sorted(candidates)
    assert probability.sum() == pytest.approx(1.0, abs=1e-5)
    now = answer.served_at.ToDatetime(tzinfo=UTC)
    want_ids, want_probability = oracle(stack, hybrid_service, USER, now, 0, candidates)
    assert ids == want_ids
    np.testing.assert_allclose(probability, want_probability, rtol=1e-4, atol=1e-7)


def test_unknown_users_get_a_flagged_cold_start_answer(hybrid_client) -> None:
    answer = hybrid_client.recommend(987654321, top_k=10)
    assert answer.cold_start_user and len(answer.items) == 10


def test_a_logged_rating_leaves_the_next_recommendations(stack, hybrid_client) -> None:
    user = 590
    first = _served(hybrid_client.recommend(user, top_k=10))[0]
    event = ranking_pb2.Event(user_id=user, item_id=first[0], event_type="rating", rating=5.0)
    assert hybrid_client.log_events([event]).accepted == 1
    history = stack.store.get_online_features(
        features=["user_history:history_items"], entity_rows=[{"user_id": user}]).to_dict()
    assert history["history_items"][0][-1] == first[0]
    second = _served(hybrid_client.recommend(user, top_k=10))[0]
    assert first[0] not in second


class Overlap:
    """Wraps a function: counts how many calls run it at once (each held ``hold`` seconds)."""

    def __init__(self, function, hold: float) -> None:
        import threading

        self.function, self.hold = function, hold
        self.inside = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        import time

        with self.lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
        try:
            time.sleep(self.hold)
            return self.function(*args, **kwargs)
        finally:
            with self.lock:
                self.inside -= 1


@pytest.mark.parametrize(("server", "slots", "most"),
                         [("threads", 1, 1), ("threads", 2, 2), ("aio", 2, 1)])
def test_at_most_compute_slots_requests_score_at_once(stack, server: str, slots: int,
                                                      most: int) -> None:
    """16 concurrent ``Rank`` calls on the thread-pool server's 8 workers: no more than
    ``compute_slots`` of them run the pipeline at a time (each run is held 20 ms, so unbounded
    calls would overlap); on the aio server's event loop one at a time whatever the slots.
    Every answer is the one a lone call gets (scores to float32 rounding: the replay clock
    moves between calls, and with it the user's days since their last rating)."""
    from concurrent.futures import ThreadPoolExecutor

    from avrec.server.client import RankingClient
    from tests.server.conftest import running

    candidates = list(range(1, 33))
    started = running(stack, compute_slots=slots, workers=8, grpc_server=server)
    service = next(started)
    try:
        pipeline = service.engine.ensure_snapshot(None, service.engine.clock.now()).pipeline
        with RankingClient(f"127.0.0.1:{service.port}") as client:
            alone = [(i.item_id, i.score) for i in client.rank(USER, candidates).items]
            pipeline.recommend = overlap = Overlap(pipeline.recommend, 0.02)
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda _: client.rank(USER, candidates), range(32)))
    finally:
        started.close()
    assert overlap.most == most
    for answer in answers:
        assert [i.item_id for i in answer.items] == [item for item, _ in alone]
        np.testing.assert_allclose([i.score for i in answer.items],
                                   [score for _, score in alone], rtol=1e-5, atol=1e-7)


def test_a_reload_binds_the_hybrid_again_only_when_item_vectors_changed(
    stack, hybrid_service
) -> None:
    """A reload that brings new behaviour rows keeps the pipeline bound to the same items and
    vectors (binding re-indexes every history scorer: it stalled requests); one whose vectors
    differ from the serving snapshot's binds anew, to the vectors Redis serves now."""
    engine = hybrid_service.engine
    current_snapshot(hybrid_service)
    bound = engine._loaded.pipeline
    current_snapshot(hybrid_service)
    assert engine._loaded.pipeline is bound
    served = engine._loaded.snapshot
    served.vectors = served.vectors.copy()
    served.vectors[np.flatnonzero(served.has_vector)[0]] *= -1.0  # unlike Redis's now
    current_snapshot(hybrid_service)
    rebound = engine._loaded.pipeline
    assert rebound is not bound
    fresh = engine._loaded.snapshot
    np.testing.assert_array_equal(rebound.features.vectors, bound.features.vectors)
    assert not np.array_equal(fresh.vectors, served.vectors)
