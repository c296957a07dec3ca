"""The shared :class:`~tests.recommender_contract.RecommenderContract`, run against each
baseline recommender (the other models run it in their own test modules)."""

from __future__ import annotations

import numpy as np

from avrec.ranker import baselines
from avrec.ranker.recommender import Recommender
from tests.recommender_contract import ContractData, RecommenderContract


class TestRandom(RecommenderContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.RandomRecommender(seed=seed)

    def test_another_seed_changes_scores(self, fitted, contract_data) -> None:
        other = baselines.RandomRecommender(seed=self.seed + 1)
        other.fit(contract_data.train, contract_data.items)
        users = contract_data.users[:2]
        assert not np.array_equal(other.score(users), fitted.score(users))


class TestPopularity(RecommenderContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.Popularity(seed=seed)

    def test_users_are_told_apart(self, fitted, contract_data) -> None:
        scores = fitted.score(contract_data.users[:3])
        assert (scores == scores[0]).all(), "popularity is the same list for everyone"


class TestItemKNN(RecommenderContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.ItemKNN(k=20, min_value=4.0, seed=seed)


class TestBPR(RecommenderContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.BPR(factors=8, iterations=5, seed=seed)


class TestALS(RecommenderContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.ALS(factors=8, iterations=3, regularization=1.0, seed=seed)


class TestContentKNN(RecommenderContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        # Random vectors for every other item: the missing-vector path is exercised too.
        item_ids = np.sort(data.items["item_id"].to_numpy())[::2]
        vectors = baselines.random_item_vectors(item_ids, dim=12, seed=3)
        return baselines.ContentKNN(vectors, positive_threshold=4.0, seed=seed)


class TestRecentPopularity(RecommenderContract):
    def make(self, seed: int, data: ContractData) -> Recommender:
        return baselines.RecentPopularity(days=90.0, seed=seed)

    def test_users_are_told_apart(self, fitted, contract_data) -> None:
        # without cut times everyone gets the same window; with their own cuts they differ
        users = contract_data.users[:2]
        cuts = np.array(["2005-01-01", "2015-01-01"], dtype="datetime64[us]")
        scores = fitted.score(users, cuts)
        assert not np.array_equal(scores[0], scores[1])
