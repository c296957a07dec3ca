"""The fast tier of the recommender contract: every recommender, the deep ranker included, on a
generated catalogue with a planted answer (:mod:`tests.synthetic_catalogue`).

The same :class:`~tests.recommender_contract.RecommenderContract` runs on real MovieLens data
in the slow tier (``test_recommender_contract.py`` and the models' own modules). Where a
recommender cannot keep an item of the contract by design, its class overrides that test with
the reason and checks what it does instead.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from avrec import behaviour_features, tables
from avrec.names import USER_FEATURES
from avrec.pit_join import plan_views
from avrec.ranker import baselines
from avrec.ranker.deep_ranker import DeepRanker
from avrec.ranker.hybrid import ContentGenerator, HybridRecommender
from avrec.ranker.recommender import Recommender
from avrec.ranker.sequential import SequentialConfig, SequentialRecommender
from avrec.ranker.served import ServedRecommender
from avrec.ranker.training import TrainConfig
from avrec.ranker.two_tower import TwoTowerRecommender
from avrec.ranker.two_tower_training import TwoTowerConfig
from tests.ranker.test_hybrid import _hybrid as hybrid_of
from tests.recommender_contract import UNKNOWN_USER, ContractData, PlantedAnswerContract
from tests.synthetic_catalogue import (
    GENRES,
    SyntheticCatalogue,
    item_vectors,
    synthetic_catalogue,
    synthetic_store,
)

# a ranking with no per-user structure puts the user's own cluster among the top unseen
# items at about chance (0.16); "well below the planted answer" is this much or less
CHANCE_AT_MOST = 0.4


@pytest.fixture(scope="module")
def generated() -> SyntheticCatalogue:
    return synthetic_catalogue()


@pytest.fixture(scope="module")
def contract_data(generated: SyntheticCatalogue) -> ContractData:
    """Overrides the real slice of ``tests/ranker/conftest.py`` in this module."""
    return generated.contract_data()


@pytest.fixture(scope="module")
def synthetic_feature_store(generated: SyntheticCatalogue, tmp_path_factory):
    """avrec's Feast repo over the catalogue's offline tables (registry + DuckDB offline store)."""
    return synthetic_store(generated, tmp_path_factory.mktemp("synthetic-data"))


class TestRandom(PlantedAnswerContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.RandomRecommender(seed=seed)

    def test_finds_each_users_taste_cluster(self, fitted, contract_data) -> None:
        # Random scores carry no user structure by definition: the share stays near chance.
        assert self.cluster_share(fitted, contract_data) <= CHANCE_AT_MOST


class TestPopularity(PlantedAnswerContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.Popularity(seed=seed)

    def test_users_are_told_apart(self, fitted, contract_data) -> None:
        # Popularity is one list for everyone by definition.
        scores = self.scores(fitted, contract_data, contract_data.users[:3])
        assert (scores == scores[0]).all()

    def test_finds_each_users_taste_cluster(self, fitted, contract_data) -> None:
        # One list for everyone cannot follow a user's cluster: the share stays near chance,
        # and everyone's first item is the planted most popular one.
        assert self.cluster_share(fitted, contract_data) <= CHANCE_AT_MOST
        top = self.scores(fitted, contract_data, contract_data.users).argmax(axis=1)
        assert (fitted.item_ids[top] == contract_data.answer.most_popular).all()


class TestRecentPopularity(PlantedAnswerContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.RecentPopularity(days=90.0, seed=seed)

    def test_users_are_told_apart(self, fitted, contract_data) -> None:
        # One window for everyone without cut times; with their own cuts users differ.
        users = contract_data.users[:2]
        cuts = np.array(["2017-03-01", "2017-09-01"], dtype="datetime64[us]")
        scores = fitted.score(users, cuts)
        assert not np.array_equal(scores[0], scores[1])

    def test_finds_each_users_taste_cluster(self, fitted, contract_data) -> None:
        # Recent popularity is one list per instant, whoever asks: no user structure.
        assert self.cluster_share(fitted, contract_data) <= CHANCE_AT_MOST


class TestItemKNN(PlantedAnswerContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.ItemKNN(k=20, min_value=4.0, seed=seed)


class TestBPR(PlantedAnswerContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.BPR(factors=8, iterations=100, seed=seed)


class TestALS(PlantedAnswerContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.ALS(factors=8, iterations=5, regularization=1.0, seed=seed)


class TestEASE(PlantedAnswerContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.EASE(l2=50.0, min_value=4.0, seed=seed)


class TestContentKNN(PlantedAnswerContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        # vectors for every other item: the missing-vector path is exercised too
        vectors = item_vectors(data, every=2)
        frame = pl.DataFrame({"item_id": vectors.item_ids, "vector": vectors.vectors})
        return baselines.ContentKNN(frame, positive_threshold=4.0, seed=seed)


class TestContentGenerator(PlantedAnswerContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return ContentGenerator(item_vectors(data, every=2))  # nothing random: no seed


def _hybrid(seed: int, data: ContractData) -> HybridRecommender:
    return hybrid_of(seed, data, item_vectors(data, every=2))


class TestHybrid(PlantedAnswerContract):
    batch_tolerance = (1e-5, 1e-6)  # float32 MLP over batches of users

    def make(self, seed: int, data: ContractData) -> Recommender:
        return _hybrid(seed, data)


class TestServed(PlantedAnswerContract):
    """The served pipeline (what the gRPC server runs) behind the offline interface."""

    def make(self, seed: int, data: ContractData) -> Recommender:
        events = data.train.with_columns(pl.lit("rating").alias("event_type"))
        end = events["event_timestamp"].max() + timedelta(days=1)
        table = behaviour_features.item_features(events, end, end)
        return ServedRecommender(_hybrid(seed, data), table, seed)

    def test_user_without_history_gets_popularity_and_is_flagged(
        self, fitted, contract_data
    ) -> None:
        # The served pipeline answers every user itself, as the server does (a cold user gets
        # the pipeline's own cold answer, not the offline popularity fallback): no user is
        # flagged. What holds instead: a cold user's first item is the most popular one.
        users = np.array([contract_data.users[0], UNKNOWN_USER])
        assert fitted.fallback_mask(users).tolist() == [False, False]
        scores = self.scores(fitted, contract_data, users)
        assert fitted.item_ids[scores[1].argmax()] == contract_data.answer.most_popular


class TestSequential(PlantedAnswerContract):
    batch_tolerance = (1e-5, 1e-6)  # float32 attention over batches of users

    def make(self, seed: int, data: ContractData) -> Recommender:
        # small and quick to converge on 3,000 events (one layer, light dropout, no ID dropout)
        config = SequentialConfig(dim=16, layers=1, max_length=30, dropout=0.1, id_dropout=0.0,
                                  negatives=32, batch_size=32, lr=1e-2, epochs=30, seed=seed)
        return SequentialRecommender(config, item_vectors(data, every=2), seed)


class _ReadsTheStore(PlantedAnswerContract):
    """A model that reads point-in-time features: from the catalogue's own offline store."""

    batch_tolerance = (1e-5, 1e-6)  # float32 torch models

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _store(cls, synthetic_feature_store) -> None:
        cls.store = synthetic_feature_store


class TestTwoTower(_ReadsTheStore):
    def make(self, seed: int, data: ContractData) -> Recommender:
        config = TwoTowerConfig(epochs=4, batch_size=128, dim=16, seed=seed)
        return TwoTowerRecommender(item_vectors(data), self.store, len(GENRES),
                                   config, seed=seed)


class TestDeepRanker(_ReadsTheStore):
    """Training rows and scores read features as of each label's or user's cut, as on real
    data (no stand-in for the store or the model)."""

    # The deep ranker reads point-in-time features and has no default instant to read them
    # at: score() without as_of is an error (test_needs_a_cut), so the contract scores as of
    # the data's cut.
    needs_cut = True

    def make(self, seed: int, data: ContractData) -> Recommender:
        config = TrainConfig(epochs=3, batch_size=256, negatives=4, progress=False, seed=seed)
        return DeepRanker(item_vectors(data), self.store, len(GENRES),
                          config=config, seed=seed)

    def test_needs_a_cut(self, fitted, contract_data) -> None:
        with pytest.raises(ValueError, match="as_of"):
            fitted.score(contract_data.users[:2])


def test_the_catalogue_has_its_planted_answer(generated: SyntheticCatalogue) -> None:
    counts = generated.events.group_by("item_id").len().sort("len", descending=True)
    assert counts["item_id"][0] == generated.contract_data().answer.most_popular
    assert counts["len"][0] == generated.events["user_id"].n_unique() > 2 * counts["len"][1]
    own = generated.events.filter(generated.events["value"] >= 4.0)
    for user, item in zip(own["user_id"], own["item_id"], strict=True):
        assert generated.item_cluster.get(item, generated.user_cluster[user]) == (
            generated.user_cluster[user])
    assert synthetic_catalogue().events.equals(generated.events)


def test_the_offline_tables_hold_the_catalogue(generated, synthetic_feature_store) -> None:
    paths = {Path(p.path).parent for p in plan_views(synthetic_feature_store, USER_FEATURES)}
    [offline] = paths
    assert tables.read_table("events", offline).equals(generated.events)
