"""The contract every :class:`~ranker.recommender.Recommender` keeps, run against each one.

A new model (the deep ranker too) gets the same checks by subclassing
:class:`RecommenderContract` and implementing ``make``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import pytest

from ranker import baselines
from ranker.recommender import Recommender
from tests.ranker.conftest import ContractData

UNKNOWN_USER = 10**9


class RecommenderContract(ABC):
    """Shapes, item order, determinism, finite scores, popularity fallback for cold users."""

    seed = 7
    # BLAS may round differently with another batch shape: equal up to the last bits
    # (float32 models, e.g. a torch MLP over a batch, override this).
    batch_tolerance = (1e-9, 1e-12)  # rtol, atol

    @abstractmethod
    def make(self, seed: int, data: ContractData) -> Recommender:
        """An unfitted recommender of the implementation under test."""

    @pytest.fixture(scope="class")
    def fitted(self, contract_data: ContractData) -> Recommender:
        return self.make(self.seed, contract_data).fit(contract_data.train, contract_data.items)

    def test_scores_cover_the_catalogue_in_item_order(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        catalogue = np.sort(contract_data.items["item_id"].to_numpy())
        np.testing.assert_array_equal(fitted.item_ids, catalogue)
        scores = fitted.score(contract_data.users)
        assert scores.shape == (contract_data.users.size, catalogue.size)
        assert np.isfinite(scores).all()

    def test_rows_follow_the_requested_users(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        users = contract_data.users[:5]
        rtol, atol = self.batch_tolerance
        close = {"rtol": rtol, "atol": atol}
        np.testing.assert_allclose(fitted.score(users)[::-1], fitted.score(users[::-1]), **close)
        np.testing.assert_allclose(fitted.score(users[:1])[0], fitted.score(users)[0], **close)

    def test_same_seed_same_scores(self, fitted: Recommender, contract_data: ContractData) -> None:
        again = self.make(self.seed, contract_data).fit(contract_data.train, contract_data.items)
        users = contract_data.users
        np.testing.assert_array_equal(fitted.score(users), again.score(users))

    def test_users_are_told_apart(self, fitted: Recommender, contract_data: ContractData) -> None:
        scores = fitted.score(contract_data.users[:10])
        assert scores.std(axis=1).min() > 0, "every user needs a ranking, not a constant"

    def test_user_without_history_gets_popularity_and_is_flagged(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        users = np.array([contract_data.users[0], UNKNOWN_USER])
        scores = fitted.score(users)
        assert fitted.fallback_mask(users).tolist() == [False, True]
        np.testing.assert_array_equal(scores[1], fitted.popularity)
        assert (
            fitted.popularity.argmax()
            == np.bincount(
                np.searchsorted(fitted.item_ids, contract_data.train["item_id"].to_numpy())
            ).argmax()
        )

    def test_accepts_cut_times(self, fitted: Recommender, contract_data: ContractData) -> None:
        users = contract_data.users[:3]
        as_of = np.full(users.size, np.datetime64("2018-01-01T00:00:00", "us"))
        assert fitted.score(users, as_of).shape == (3, fitted.item_ids.size)
        with pytest.raises(ValueError):
            fitted.score(users, as_of[:2])

    def test_score_before_fit_is_an_error(self, contract_data: ContractData) -> None:
        with pytest.raises(RuntimeError):
            self.make(self.seed, contract_data).score([1])


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
