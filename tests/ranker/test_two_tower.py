"""The two-tower retrieval model on real MovieLens rows and the real feature store.

Item vectors are a fixed random projection of each item's genres plus a little per-item
noise (every 7th item has none), so the tests do not depend on the encoders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from avrec import behaviour_features, tables
from avrec.ranker import metrics
from avrec.ranker.features import ItemVectors
from avrec.ranker.recommender import Recommender
from avrec.ranker.splits import Split
from avrec.ranker.stage_data import stage_data
from avrec.ranker.two_tower import TwoTowerRecommender
from avrec.ranker.two_tower_training import (
    TwoTowerConfig,
    encode_rows,
    fit_two_tower,
    in_batch_loss,
    positive_rows,
)
from tests.recommender_contract import ContractData, RecommenderContract

VECTOR_DIM = 32
EMBEDDING_VERSION = "genre-projection-v1"



def genre_vectors(items: pl.DataFrame, dim: int = VECTOR_DIM, seed: int = 0) -> ItemVectors:
    """Seeded random projection of genre one-hots plus per-item noise; every 7th item left out."""
    vocabulary = behaviour_features.genre_vocabulary(items)
    ids = np.sort(items["item_id"].to_numpy())
    genres = dict(zip(items["item_id"].to_list(), items["genres"].to_list(), strict=True))
    onehot = np.zeros((ids.size, len(vocabulary)), dtype=np.float32)
    for row, item in enumerate(ids):
        for genre in genres[int(item)] or []:
            onehot[row, vocabulary.index(genre)] = 1.0
    rng = np.random.default_rng(seed)
    projection = rng.normal(size=(len(vocabulary), dim)).astype(np.float32)
    vectors = onehot @ projection + 0.3 * rng.normal(size=(ids.size, dim)).astype(np.float32)
    keep = np.arange(ids.size) % 7 != 0
    return ItemVectors(ids[keep], vectors[keep], "genre_projection")


@pytest.fixture(scope="module")
def tt_env(movielens_offline: Path, feature_store):
    items = tables.read_table("items", movielens_offline)
    genres = len(behaviour_features.genre_vocabulary(items))
    return feature_store, genre_vectors(items), genres


def make_two_tower(env, seed: int, epochs: int = 4) -> TwoTowerRecommender:
    store, vectors, genres = env
    config = TwoTowerConfig(epochs=epochs, batch_size=256, dim=32, seed=seed)
    return TwoTowerRecommender(vectors, store, genres, config, seed=seed,
                               embedding_version=EMBEDDING_VERSION)


class TestTwoTowerContract(RecommenderContract):
    """The shared Recommender contract, plus recall on the slice's held-out positives."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _env(cls, tt_env) -> None:
        cls.env = tt_env

    def make(self, seed: int, data: ContractData) -> Recommender:
        return make_two_tower(self.env, seed)

    def test_another_seed_changes_scores(self, fitted, contract_data) -> None:
        other = self.make(self.seed + 1, contract_data)
        other.fit(contract_data.train, contract_data.items)
        users = contract_data.users[:3]
        assert not np.allclose(other.score(users), fitted.score(users))

    def test_recall_on_held_out_positives_beats_random(
        self, fitted: TwoTowerRecommender, contract_data: ContractData, ml_split: Split
    ) -> None:
        data = stage_data(ml_split.stage("validation"), fitted.item_ids)
        rows = np.flatnonzero(np.isin(data.users, contract_data.train["user_id"].to_numpy()))
        assert rows.size >= 100
        scores = fitted.score(data.users[rows], data.as_of[rows])
        relevant, exclude = data.relevant[rows], data.exclude[rows]
        recall = metrics.ranking_metrics(scores, relevant, exclude, ks=(20,)).per_user["recall@20"]
        random = metrics.random_expected_recall(relevant & ~exclude, exclude, 20)
        print(f"two-tower recall@20 {recall.mean():.4f} vs random {random.mean():.4f} "
              f"over {rows.size} users")
        assert recall.mean() > 5 * random.mean()
        assert metrics.paired_test(recall, random)["t_p"] < 1e-3

    def test_scores_are_dot_products_of_unit_vectors(
        self, fitted: TwoTowerRecommender, contract_data: ContractData
    ) -> None:
        users = contract_data.users[:4]
        as_of = np.full(users.size, np.datetime64("2010-06-01T00:00:00", "us"))
        scores = fitted.score(users, as_of)
        user_vec = fitted.user_vectors(users, as_of)
        item_vec = fitted.item_vectors(as_of[0])
        np.testing.assert_allclose(np.linalg.norm(user_vec, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(item_vec, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(scores, user_vec.astype(np.float64) @ item_vec.T, atol=1e-5)
        assert np.abs(scores).max() <= 1.0 + 1e-5


def test_training_rows_are_point_in_time_positives(tt_env, contract_data: ContractData) -> None:
    rows = positive_rows(contract_data.train.head(3000), contract_data.items, tt_env[0])
    assert rows.height > 0 and set(rows["label"].unique()) == {1}
    known = rows.filter(pl.col("user_behaviour__last_interaction_at").is_not_null())
    assert known.height > 0.9 * rows.height
    assert (known["user_behaviour__last_interaction_at"] < known["label_timestamp"]).all(), (
        "a label's own event is never its feature"
    )


def test_training_is_seeded(tt_env, contract_data: ContractData) -> None:
    store, vectors, _ = tt_env
    model = make_two_tower(tt_env, seed=0)
    rows = positive_rows(contract_data.train.head(4000), contract_data.items, store)
    model.encoder.fit(rows)
    data = encode_rows(model.encoder, vectors, rows)
    config = TwoTowerConfig(epochs=2, batch_size=256, dim=16, seed=3)
    first = fit_two_tower(data, data, vectors.vectors, config)
    again = fit_two_tower(data, data, vectors.vectors, config)
    other = fit_two_tower(data, data, vectors.vectors, TwoTowerConfig(
        epochs=2, batch_size=256, dim=16, seed=4))
    for a, b, c in zip(first[:2], again[:2], other[:2], strict=True):
        same, seeded = a.state_dict(), b.state_dict()
        assert all(torch.equal(same[k], seeded[k]) for k in same)
        assert not all(torch.equal(same[k], c.state_dict()[k]) for k in same)
    assert first[2].train_loss == again[2].train_loss
    assert first[2].train_loss[-1] < first[2].train_loss[0], "training lowers the loss"


def test_in_batch_loss_masks_duplicates_and_corrects_for_sampling() -> None:
    users = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    items = users.clone()
    distinct = in_batch_loss(users, items, np.array([1, 2, 3]), None, 0.1)
    # Row 0 and row 2 share an item: it is not row 0's negative (nor row 2's).
    duplicated = in_batch_loss(users, items, np.array([1, 2, 1]), None, 0.1)
    assert float(duplicated) < float(distinct)
    popular_first = in_batch_loss(users, items, np.array([1, 2, 3]), np.log([0.8, 0.1, 0.1]), 0.1)
    assert float(popular_first) != pytest.approx(float(distinct))
