"""The contract every :class:`~ranker.recommender.Recommender` keeps, as a reusable mixin.

Not a test module (pytest does not collect it): a test class applies the contract by deriving
from :class:`RecommenderContract` and implementing ``make`` (``tests/ranker/
test_recommender_contract.py`` does it for the baselines; the two-tower, hybrid and sequential
models in their own test modules). The classes get their data from the ``contract_data``
fixture (``tests/ranker/conftest.py``), built by :func:`contract_slice`: real training
interactions of a slice of users, so that the popularity fallback has a known answer (the
most rated item of the slice).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest

from ranker.recommender import Recommender

UNKNOWN_USER = 10**9


@dataclass(frozen=True)
class ContractData:
    """Real training interactions (a slice of users) and the whole real catalogue."""

    train: pl.DataFrame
    items: pl.DataFrame
    users: np.ndarray  # users with history, in an unsorted order


def contract_slice(train: pl.DataFrame, items: pl.DataFrame, n_users: int = 150,
                   n_scored: int = 40) -> ContractData:
    """The first ``n_users`` users of ``train`` and ``n_scored`` of them in a seeded order."""
    users = np.sort(train["user_id"].unique().to_numpy())[:n_users]
    sliced = train.filter(pl.col("user_id").is_in(users.tolist()))
    order = np.random.default_rng(0).permutation(users.size)[:n_scored]
    return ContractData(sliced, items, users[order])


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
