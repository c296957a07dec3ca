"""The deep ranker end to end on real data: point-in-time rows, training, full ranking."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest
import torch

from avrec import behaviour_features, tables
from avrec.ranker.deep_ranker import DeepRanker
from avrec.ranker.features import HISTORY, FeatureEncoder, ItemVectors
from avrec.ranker.model import Ranker, TargetAttention
from avrec.ranker.training import TrainConfig

CUT = datetime(2016, 1, 1, tzinfo=UTC)


def genre_vectors(items: pl.DataFrame, dim: int = 16, seed: int = 0) -> ItemVectors:
    """Real-shaped item vectors without the encoders: a fixed projection of genre one-hots."""
    genres = behaviour_features.genre_vocabulary(items)
    one_hot = np.zeros((items.height, len(genres)), dtype=np.float32)
    for i, item_genres in enumerate(items["genres"].to_list()):
        one_hot[i, [genres.index(g) for g in item_genres]] = 1.0
    projection = np.random.default_rng(seed).normal(size=(len(genres), dim)).astype(np.float32)
    return ItemVectors(items["item_id"].to_numpy(), one_hot @ projection, "genre-projection")


@pytest.fixture(scope="module")
def fitted(feature_store, movielens_offline) -> DeepRanker:
    events = tables.read_table("events", movielens_offline)
    items = tables.read_table("items", movielens_offline)
    fit = events.filter((pl.col("event_timestamp") < CUT) & (pl.col("user_id") <= 200))
    model = DeepRanker(
        genre_vectors(items),
        feature_store,
        len(behaviour_features.genre_vocabulary(items)),
        config=TrainConfig(epochs=2, batch_size=2048, negatives=2, progress=False),
    )
    return model.fit(fit, items)


def test_training_rows_are_point_in_time(fitted: DeepRanker, movielens_offline) -> None:
    events = tables.read_table("events", movielens_offline)
    items = tables.read_table("items", movielens_offline)
    fit = events.filter(pl.col("event_timestamp") < CUT)
    rows = fitted.labelled_rows(fit.filter(pl.col("user_id") <= 20), items)
    assert rows["label_timestamp"].max() < CUT
    first = (
        rows.filter(pl.col("sample_type") == "positive").sort("label_timestamp").row(0, named=True)
    )
    before = events.filter(
        (pl.col("user_id") == first["user_id"])
        & (pl.col("event_timestamp") < first["label_timestamp"])
    ).height
    assert first["user_behaviour__interactions_all"] in (None, before)


def test_training_lowers_validation_loss(fitted: DeepRanker) -> None:
    losses = fitted.history.val_loss
    assert len(losses) >= 1 and all(np.isfinite(losses))
    # the shipped sampled softmax, log-q corrected, estimates the softmax over the whole
    # catalogue: better than a uniform guess over it
    assert fitted.config.loss == "softmax"
    assert min(losses) < np.log(len(fitted.item_ids))


def test_full_ranking_scores(fitted: DeepRanker, movielens_offline) -> None:
    users = np.array([1, 2, 3, 414], dtype=np.int64)
    as_of = np.array([np.datetime64("2016-01-01T00:00:00")] * len(users))
    scores = fitted.score(users, as_of)
    assert scores.shape == (len(users), len(fitted.item_ids))
    assert np.isfinite(scores).all()
    again = fitted.score(users[::-1], as_of)
    np.testing.assert_allclose(again[::-1], scores, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="as_of"):
        fitted.score(users)


def test_history_rows_mask_unknown_items() -> None:
    vectors = ItemVectors(np.array([10, 20]), np.eye(2, dtype=np.float32))
    rows = pl.DataFrame({"user_behaviour__recent_items": [[20, 99, 10], None]})
    idx = FeatureEncoder.history_rows(rows, vectors)
    assert idx.shape == (2, HISTORY)
    assert idx[0, :3].tolist() == [1, -1, 0] and (idx[1] == -1).all()


def test_attention_ignores_padding() -> None:
    torch.manual_seed(0)
    attention = TargetAttention(4)
    history = torch.randn(1, 3, 4)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    changed = history.clone()
    changed[0, 2] = 100.0
    query = torch.randn(1, 4)
    torch.testing.assert_close(attention(history, mask, query), attention(changed, mask, query))
    assert Ranker(3, 2, 4, dim=8)(
        torch.zeros(2, 3),
        torch.zeros(2, 5, 4),
        torch.zeros(2, 5),
        torch.zeros(2, 4),
        torch.zeros(2, 2),
    ).shape == (2,)
