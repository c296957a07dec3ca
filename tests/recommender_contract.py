"""The contract every :class:`~avrec.ranker.recommender.Recommender` keeps, as a reusable mixin.

Not a test module (pytest does not collect it): a test class applies the contract by deriving
from :class:`RecommenderContract` and implementing ``make``. It runs in two tiers, on two
data sets behind the one ``contract_data`` fixture:

* the fast tier (``tests/ranker/test_synthetic_contract.py``, every recommender, the deep
  ranker included): a generated catalogue with a planted answer
  (:mod:`tests.synthetic_catalogue`); its classes derive from :class:`PlantedAnswerContract`,
  which adds the known-answer checks;
* the real-data tier (slow: ``tests/ranker/test_recommender_contract.py`` for the
  baselines; the two-tower, hybrid and sequential models in their own test modules): real
  training interactions of a slice of MovieLens users, built by :func:`contract_slice`
  (``tests/ranker/conftest.py``), where the popularity fallback's answer is the most rated
  item of the slice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest

from avrec.ranker.recommender import Recommender

UNKNOWN_USER = 10**9


@dataclass(frozen=True)
class PlantedAnswer:
    """What a generated data set was built to make true."""

    user_cluster: dict[int, int]  # user -> taste cluster
    item_cluster: dict[int, int]  # item -> cluster (items in none are left out)
    most_popular: int  # the item most users interacted with


@dataclass(frozen=True)
class ContractData:
    """Training interactions and the whole catalogue (real, or generated with an answer)."""

    train: pl.DataFrame
    items: pl.DataFrame
    users: np.ndarray  # users with history, in an unsorted order
    answer: PlantedAnswer | None = None

    @property
    def cut(self) -> np.datetime64:
        """The instant just after the last training interaction (naive UTC, microseconds)."""
        last = self.train["event_timestamp"].max().replace(tzinfo=None)
        return np.datetime64(last, "us") + np.timedelta64(1, "us")


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
    # A model that reads point-in-time features needs each user's cut (``as_of``) to score;
    # the contract then scores everyone as of ``ContractData.cut``.
    needs_cut = False

    @abstractmethod
    def make(self, seed: int, data: ContractData) -> Recommender:
        """An unfitted recommender of the implementation under test."""

    def scores(self, model: Recommender, data: ContractData, users: np.ndarray) -> np.ndarray:
        """``model.score(users)``, as of the data's cut when the model needs one."""
        if not self.needs_cut:
            return model.score(users)
        return model.score(users, np.full(users.size, data.cut))

    @pytest.fixture(scope="class")
    @classmethod
    def fitted(cls, contract_data: ContractData) -> Recommender:
        # one fit per class (a fixture of class scope is a classmethod, so make() runs on
        # an instance of its own)
        return cls().make(cls.seed, contract_data).fit(contract_data.train, contract_data.items)

    def test_scores_cover_the_catalogue_in_item_order(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        catalogue = np.sort(contract_data.items["item_id"].to_numpy())
        np.testing.assert_array_equal(fitted.item_ids, catalogue)
        scores = self.scores(fitted, contract_data, contract_data.users)
        assert scores.shape == (contract_data.users.size, catalogue.size)
        assert np.isfinite(scores).all()

    def test_rows_follow_the_requested_users(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        users = contract_data.users[:5]
        rtol, atol = self.batch_tolerance
        close = {"rtol": rtol, "atol": atol}
        np.testing.assert_allclose(self.scores(fitted, contract_data, users)[::-1],
                                   self.scores(fitted, contract_data, users[::-1]), **close)
        np.testing.assert_allclose(self.scores(fitted, contract_data, users[:1])[0],
                                   self.scores(fitted, contract_data, users)[0], **close)

    def test_same_seed_same_scores(self, fitted: Recommender, contract_data: ContractData) -> None:
        again = self.make(self.seed, contract_data).fit(contract_data.train, contract_data.items)
        users = contract_data.users
        np.testing.assert_array_equal(self.scores(fitted, contract_data, users),
                                      self.scores(again, contract_data, users))

    def test_users_are_told_apart(self, fitted: Recommender, contract_data: ContractData) -> None:
        scores = self.scores(fitted, contract_data, contract_data.users[:10])
        assert scores.std(axis=1).min() > 0, "every user needs a ranking, not a constant"

    def test_user_without_history_gets_popularity_and_is_flagged(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        users = np.array([contract_data.users[0], UNKNOWN_USER])
        scores = self.scores(fitted, contract_data, users)
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


class PlantedAnswerContract(RecommenderContract):
    """The contract plus the known answers of a generated data set (``ContractData.answer``).

    Cold users get the item everyone had first; each user's best items among those they have
    not had are their own taste cluster's: at least ``min_cluster_share`` of the top
    ``TOP`` unseen items (chance is about 0.16 on :mod:`tests.synthetic_catalogue`).
    """

    TOP = 5
    min_cluster_share = 0.6

    def cluster_share(self, fitted: Recommender, data: ContractData) -> float:
        """Mean share of each scored user's top unseen items that are in the user's cluster."""
        answer = data.answer
        assert answer is not None, "the planted-answer contract needs generated data"
        scores = self.scores(fitted, data, data.users)
        seen = data.train.group_by("user_id").agg(pl.col("item_id").unique())
        had = dict(zip(seen["user_id"].to_list(), seen["item_id"].to_list(), strict=True))
        cluster = np.array([answer.item_cluster.get(int(i), -1) for i in fitted.item_ids])
        shares = []
        for row, user in enumerate(data.users):
            unseen = ~np.isin(fitted.item_ids, had[int(user)])
            columns = np.flatnonzero(unseen)
            top = columns[np.argsort(-scores[row, columns], kind="stable")[: self.TOP]]
            shares.append(float(np.mean(cluster[top] == answer.user_cluster[int(user)])))
        return float(np.mean(shares))

    def test_cold_users_get_the_most_popular_item_first(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        assert contract_data.answer is not None
        cold = self.scores(fitted, contract_data, np.array([UNKNOWN_USER]))[0]
        assert fitted.item_ids[cold.argmax()] == contract_data.answer.most_popular

    def test_finds_each_users_taste_cluster(
        self, fitted: Recommender, contract_data: ContractData
    ) -> None:
        share = self.cluster_share(fitted, contract_data)
        assert share >= self.min_cluster_share, (
            f"{share:.2f} of the top {self.TOP} unseen items are in the user's own cluster"
        )
