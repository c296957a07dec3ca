"""The ranking service over real gRPC on loopback, against real Redis, Feast and ONNX models.

The oracle for scores reads the same entities through Feast's ``get_online_features`` (not the
server's raw Redis path), encodes them with the model's FeatureEncoder and runs the ONNX ranker.
"""

from __future__ import annotations

import math
import os
import uuid
from datetime import UTC, timedelta
from pathlib import Path

import grpc
import numpy as np
import polars as pl
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from avrec import event_journal, online_features, tables
from avrec.server.models import encoder_from_contract
from avrec.server.protocol import SERVICE_NAME, ranking_pb2
from tests.server.conftest import CLOCK, current_snapshot

USER = 414  # active until 2018: fresh at the replay clock
IDLE_USER = 1  # last rated in 2000: expired under the 730-day TTL


def catalogue(stack) -> np.ndarray:
    return tables.read_table("items", stack.data_dir / "offline")["item_id"].to_numpy()


def oracle_scores(stack, service, user_id: int, items: list[int], now) -> np.ndarray:
    """Scores from Feast's SDK reads + the model's encoder + the ONNX ranker.

    Feast serves rows of any age; the view TTLs are applied here with avrec's provider-level
    reader (:func:`avrec.online_features.read_view`), as the training sets' joins apply them.
    """
    store, models = stack.store, service.engine.models
    encoder = encoder_from_contract(models.contract)
    user_refs = [f"user_behaviour:{f}" for f in service.engine.user_reader.features]
    user = store.get_online_features(features=user_refs, entity_rows=[{"user_id": user_id}])
    record = {f"user_behaviour__{k}": v[0] for k, v in user.to_dict().items() if k != "user_id"}
    last = record["user_behaviour__last_interaction_at"]
    record["days_since_last_interaction"] = (now - last).total_seconds() / 86400
    user_frame = pl.DataFrame([record], strict=False)
    item_refs = [f"item_behaviour:{f}" for f in service.engine.behaviour_reader.features]
    item_refs += ["item_embedding:embedding"]
    recent = [i for i in record["user_behaviour__recent_items"] or []]
    every = list(dict.fromkeys(items + recent))
    got = store.get_online_features(
        features=item_refs, entity_rows=[{"item_id": i} for i in every]
    ).to_dict()
    for view in ("item_behaviour", "item_embedding"):
        fresh = online_features.read_view(store, view, every, now)["fresh"].to_list()
        for ref in (r for r in item_refs if r.startswith(view)):
            name = ref.split(":")[1]
            got[name] = [v if ok else None for v, ok in zip(got[name], fresh, strict=True)]
    vector_of = {i: v for i, v in zip(every, got["embedding"], strict=True) if v}
    frame = pl.DataFrame(
        {f"item_behaviour__{k}": got[k] for k in service.engine.behaviour_reader.features},
        strict=False,
    )
    firsts = frame["item_behaviour__first_interaction_at"].to_list()
    frame = frame.with_columns(pl.Series(
        "item_age_days", [None if f is None else (now - f).total_seconds() / 86400 for f in firsts],
        dtype=pl.Float64))
    has = np.array([i in vector_of for i in every])
    dense = np.concatenate([encoder.item_dense(frame), (~has).astype(np.float32)[:, None]], 1)
    dim = models.contract.item_vector_dim
    vectors = np.stack([np.asarray(vector_of.get(i, np.zeros(dim)), np.float32) for i in every])
    history = np.zeros((1, models.contract.history, dim), np.float32)
    mask = np.zeros((1, models.contract.history), np.float32)
    for j, i in enumerate([i for i in recent if i in vector_of][: models.contract.history]):
        history[0, j], mask[0, j] = vector_of[i], 1.0
    n = len(items)
    feeds = {
        "user_dense": np.repeat(encoder.user_dense(user_frame), n, 0),
        "history": np.repeat(history, n, 0), "history_mask": np.repeat(mask, n, 0),
        "item_vector": vectors[:n], "item_dense": dense[:n].astype(np.float32),
    }
    logits = models.ranker.run({k: np.ascontiguousarray(v, np.float32) for k, v in feeds.items()})
    return 1 / (1 + np.exp(-logits.astype(np.float64)))


def test_rank_equals_the_feast_sdk_oracle(online_service) -> None:
    """On a single Redis and on the Redis Cluster."""
    from avrec.server.client import RankingClient

    stack, service = online_service
    current_snapshot(service)  # item rows logged by earlier tests
    items = catalogue(stack)[::31][:300].tolist()
    with RankingClient(f"127.0.0.1:{service.port}") as client:
        answer = client.rank(USER, items)
    assert [i.item_id for i in answer.items] != items
    assert sorted(i.item_id for i in answer.items) == sorted(items)
    now = answer.served_at.ToDatetime(tzinfo=UTC)
    expected = dict(zip(items, oracle_scores(stack, service, USER, items, now), strict=True))
    got = {i.item_id: i.score for i in answer.items}
    worst = max(abs(got[i] - expected[i]) for i in items)
    print(f"max |server - oracle| over {len(items)} items: {worst:.2e}")
    assert worst < 1e-4
    scores = [i.score for i in answer.items]
    assert scores == sorted(scores, reverse=True)
    assert any(i.missing_features for i in answer.items)  # every 11th item has no vector
    assert answer.items_missing_features == sum(i.missing_features for i in answer.items)


def test_answer_metadata_and_freshness(stack, service, client) -> None:
    answer = client.rank(USER, catalogue(stack)[:50].tolist(), top_k=5)
    assert len(answer.items) == 5
    assert answer.model_version == service.engine.models.version
    assert answer.embedding_version == "test-genre-v1"
    assert not answer.cold_start_user
    served = answer.served_at.ToDatetime(tzinfo=UTC)
    assert CLOCK <= served < CLOCK + timedelta(hours=1)
    user_view = next(v for v in answer.user_features if v.feature_view == "user_behaviour")
    assert not user_view.expired
    row_time = user_view.event_timestamp.ToDatetime(tzinfo=UTC)
    assert served - timedelta(days=730) <= row_time <= served
    assert {v.feature_view for v in answer.user_features} >= {"item_behaviour", "item_embedding"}
    assert all(i.title for i in answer.items)


def test_expired_and_unknown_users_get_a_flagged_cold_start_answer(stack, client) -> None:
    items = catalogue(stack)[:100].tolist()
    idle = client.rank(IDLE_USER, items, top_k=10)
    assert idle.cold_start_user and len(idle.items) == 10
    view = next(v for v in idle.user_features if v.feature_view == "user_behaviour")
    assert view.expired and view.HasField("event_timestamp")
    unknown = client.recommend(987654321, top_k=10)
    assert unknown.cold_start_user and len(unknown.items) == 10
    view = next(v for v in unknown.user_features if v.feature_view == "user_behaviour")
    assert not view.expired and not view.HasField("event_timestamp")


def test_recommend_retrieves_unseen_items_and_explains(stack, client) -> None:
    answer = client.recommend(USER, top_k=20, explain=True)
    ids = [i.item_id for i in answer.items]
    assert len(ids) == 20 == len(set(ids))
    recent = stack.store.get_online_features(
        features=["user_behaviour:recent_items"], entity_rows=[{"user_id": USER}]
    ).to_dict()["recent_items"][0]
    assert not set(ids) & set(recent)
    explained = [i for i in answer.items if i.HasField("explanation")]
    assert explained and all(i.explanation.history_item_id in recent for i in explained)
    assert all(-1.0 <= i.explanation.similarity <= 1.0 for i in explained)


def test_diversity_reranks_towards_dissimilar_items(stack, service, client) -> None:
    items = catalogue(stack)[:600].tolist()
    plain = client.rank(USER, items, top_k=10)
    diverse = client.rank(USER, items, top_k=10, diversity_lambda=0.3)
    assert [i.item_id for i in plain.items] != [i.item_id for i in diverse.items]
    loaded = service.engine.ensure_snapshot(
        service.engine.read_user(USER, service.engine.clock.now())[1],
        service.engine.clock.now())

    def mean_similarity(answer) -> float:
        rows = loaded.snapshot.rows(np.array([i.item_id for i in answer.items]))
        unit = loaded.unit[rows]
        sims = unit @ unit.T
        return float(sims[np.triu_indices(len(rows), 1)].mean())

    assert mean_similarity(diverse) < mean_similarity(plain)


@pytest.mark.parametrize(
    ("user", "candidates", "top_k", "lam", "message"),
    [
        (USER, [], 0, 0.0, "empty"),
        (USER, list(range(1, 1300)), 0, 0.0, "at most 1200"),
        (USER, [1, 2, 2], 0, 0.0, "duplicate"),
        (USER, [1, 424242424], 0, 0.0, "unknown item"),
        (USER, [1, -5], 0, 0.0, "positive"),
        (0, [1, 2], 0, 0.0, "user_id"),
        (-3, [1, 2], 0, 0.0, "user_id"),
        (USER, [1, 2], -1, 0.0, "top_k"),
        (USER, [1, 2], 0, math.nan, "diversity_lambda"),
        (USER, [1, 2], 0, 1.5, "diversity_lambda"),
    ],
)
def test_bad_rank_requests_are_invalid_argument(client, user, candidates, top_k, lam, message):
    with pytest.raises(grpc.RpcError) as caught:
        client.rank(user, candidates, top_k, diversity_lambda=lam)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_oversized_message_and_deadline(client) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.rank(USER, [10**15 + i for i in range(700_000)])  # ~5.6 MB > 4 MiB
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as caught:
        client.recommend(USER, top_k=10, timeout=1e-6)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert client.recommend(USER, top_k=3).items  # the service is fine afterwards


def user_row_time(answer):
    return next(v.event_timestamp.ToDatetime()
                for v in answer.user_features if v.feature_view == "user_behaviour")


def scores_of(answer) -> dict[int, float]:
    return {i.item_id: i.score for i in answer.items}


def test_log_events_update_the_next_rank(stack, service, client) -> None:
    before = stack.store.get_online_features(
        features=["user_behaviour:interactions_all", "user_behaviour:recent_items"],
        entity_rows=[{"user_id": USER}],
    ).to_dict()
    items = catalogue(stack)[:200].tolist()
    first = client.rank(USER, items)
    item = next(i for i in items if i not in before["recent_items"][0])
    event = ranking_pb2.Event(user_id=USER, item_id=item, event_type="rating", rating=5.0)
    reply = client.log_events([event])
    assert reply.accepted == 1 and list(reply.users_updated) == [USER]
    logged, _ = event_journal.read_segment(Path(reply.offline_path))  # the newest record
    assert logged.select("user_id", "item_id", "value").rows()[-1] == (USER, item, 5.0)
    after = stack.store.get_online_features(
        features=["user_behaviour:interactions_all", "user_behaviour:recent_items"],
        entity_rows=[{"user_id": USER}],
    ).to_dict()
    assert after["interactions_all"][0] == before["interactions_all"][0] + 1
    assert after["recent_items"][0][0] == item
    second = client.rank(USER, items)
    assert user_row_time(second) > user_row_time(first)
    assert scores_of(second) != scores_of(first)
    events = tables.read_events(stack.data_dir / "offline")
    assert events.filter((pl.col("user_id") == USER) & (pl.col("item_id") == item)).height >= 1


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (dict(user_id=USER, item_id=424242424, event_type="rating", rating=4.0), "catalogue"),
        (dict(user_id=USER, item_id=1, event_type="rating", rating=math.nan), "rating"),
        (dict(user_id=USER, item_id=1, event_type="rating", rating=7.0), "rating"),
        (dict(user_id=USER, item_id=1, event_type="purchase"), "event_type"),
        (dict(user_id=0, item_id=1, event_type="tag"), "positive"),
    ],
)
def test_bad_events_are_refused_and_nothing_is_written(stack, client, event, message) -> None:
    offline = stack.data_dir / "offline"
    logged = tables.read_events(offline).height
    good = ranking_pb2.Event(user_id=USER, item_id=1, event_type="tag")
    with pytest.raises(grpc.RpcError) as caught:
        client.log_events([good, ranking_pb2.Event(**event)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert tables.read_events(offline).height == logged


def test_future_events_and_empty_batches_are_refused(client) -> None:
    future = ranking_pb2.Event(user_id=USER, item_id=1, event_type="tag")
    future.event_timestamp.FromDatetime(CLOCK + timedelta(days=30))
    for events in ([future], []):
        with pytest.raises(grpc.RpcError) as caught:
            client.log_events(events)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_reflection(service) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        assert reply.file_descriptor_response.file_descriptor_proto


def test_metrics_count_calls_by_status(client) -> None:
    from prometheus_client import REGISTRY

    def count(code: str) -> float:
        return REGISTRY.get_sample_value(
            "avrec_requests_total", {"method": "Rank", "code": code}) or 0.0

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    client.rank(USER, [1, 2, 3])
    with pytest.raises(grpc.RpcError):
        client.rank(USER, [])
    assert count("OK") == ok + 1 and count("INVALID_ARGUMENT") == bad + 1
    assert REGISTRY.get_sample_value("avrec_request_seconds_count", {"method": "Rank"}) > 0
    assert REGISTRY.get_sample_value("avrec_item_snapshot_total", {"result": "hit"}) > 0


def test_an_event_log_that_cannot_be_written_refuses_the_batch_and_rank_goes_on(
    stack, service, client, monkeypatch
) -> None:
    """Disk full (the journal's sync fails with ENOSPC, a fake for this one error path):
    LogEvents answers RESOURCE_EXHAUSTED, nothing is acknowledged or kept, health and Rank
    stay up, and the next batch is accepted once the disk has room again."""
    import errno

    offline = stack.data_dir / "offline"

    def logged() -> list[str]:
        return tables.event_ids(tables.read_event_log(offline))

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    client.log_events([ranking_pb2.Event(user_id=USER, item_id=2, event_type="tag",
                                         event_id=f"before-{uuid.uuid4().hex}")])
    before = logged()  # the open segment holds a record already
    monkeypatch.setattr(os, "fdatasync", disk_full)
    event = ranking_pb2.Event(user_id=USER, item_id=1, event_type="tag",
                              event_id=f"refused-{uuid.uuid4().hex}")
    with pytest.raises(grpc.RpcError) as caught:
        client.log_events([event])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "event log cannot be written" in caught.value.details()
    assert logged() == before  # the failed record was cut off; the earlier one kept
    assert client.rank(USER, [1, 2, 3]).items
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    monkeypatch.undo()
    assert client.log_events([event]).accepted == 1
    assert logged() == [*before, event.event_id]
