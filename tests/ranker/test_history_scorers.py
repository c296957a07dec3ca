"""History scorers: each fitted generator scores a user's history as it scores the user.

Oracles: the generator's own per-user scores (EASE with every weight kept, ItemKNN, content
kNN) and implicit's ``recalculate_user`` for the ALS fold-in.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from implicit.cpu.als import AlternatingLeastSquares
from scipy import sparse

from avrec.ranker import baselines
from avrec.ranker.history_scorers import (
    ContentProfileScorer,
    FactorFoldIn,
    History,
    ItemItemScorer,
    load_scorer,
    save_scorer,
)
from tests.recommender_contract import ContractData


def _histories(data: ContractData, users: np.ndarray, item_ids: np.ndarray) -> list[History]:
    frame = data.train.sort("user_id", "event_timestamp", "item_id")
    out = []
    for user in users:
        rows = frame.filter(pl.col("user_id") == int(user))
        cols = np.searchsorted(item_ids, rows["item_id"].to_numpy())
        out.append(History(cols, rows["value"].cast(pl.Float64).to_numpy()))
    return out


@pytest.mark.parametrize("min_value", [None, 4.0])
def test_ease_and_itemknn_score_a_history_as_they_score_its_user(
    contract_data: ContractData, min_value: float | None
) -> None:
    users = contract_data.users[:12]
    for model, scorer_of in (
        (baselines.EASE(l2=30.0, min_value=min_value), lambda m: m.history_scorer(10**6)),
        (baselines.ItemKNN(k=15, min_value=min_value), lambda m: m.history_scorer()),
    ):
        model.fit(contract_data.train, contract_data.items)
        got = scorer_of(model).score(_histories(contract_data, users, model.item_ids))
        np.testing.assert_allclose(got, model.score(users), rtol=1e-4, atol=1e-5)


def test_ease_top_k_keeps_each_rows_largest_weights(contract_data: ContractData) -> None:
    model = baselines.EASE(l2=30.0).fit(contract_data.train, contract_data.items)
    scorer = model.history_scorer(top_k=5)
    assert isinstance(scorer, ItemItemScorer)
    counts = np.diff(scorer.weights.indptr)
    assert counts.max() <= 5
    row = int(np.argmax(counts))
    dense = np.zeros(model.item_ids.size)
    dense[model.active] = model.weights[np.searchsorted(model.active, row)]
    kept = scorer.weights[row].toarray().ravel()
    assert np.abs(dense[kept == 0]).max() <= np.abs(kept[kept != 0]).min() + 1e-7


def test_als_fold_in_is_implicits_own_user_solve(contract_data: ContractData) -> None:
    model = baselines.ALS(factors=8, regularization=3.0, alpha=5.0, iterations=5)
    model.fit(contract_data.train, contract_data.items)
    scorer = model.history_scorer()
    assert isinstance(scorer, FactorFoldIn)
    users = contract_data.users[:6]
    histories = _histories(contract_data, users, model.item_ids)
    oracle = AlternatingLeastSquares(factors=8, regularization=3.0, alpha=5.0)
    oracle.item_factors = model.item_factors.astype(np.float32)
    oracle.user_factors = np.zeros((1, 8), dtype=np.float32)
    for history in histories:
        cols = np.unique(history.columns)
        cells = sparse.csr_matrix((np.ones(cols.size, np.float32), (np.zeros(cols.size), cols)),
                                  shape=(1, model.item_ids.size))
        factor = oracle.recalculate_user(0, cells)
        np.testing.assert_allclose(scorer.score([history])[0], model.item_factors @ factor,
                                   rtol=1e-3, atol=1e-4)


def test_content_profile_scores_a_history_as_content_knn_scores_its_user(
    contract_data: ContractData,
) -> None:
    ids = np.sort(contract_data.items["item_id"].to_numpy())[::2]
    model = baselines.ContentKNN(baselines.random_item_vectors(ids, dim=6, seed=1))
    model.fit(contract_data.train, contract_data.items)
    users = contract_data.users[:10]
    got = model.history_scorer().score(_histories(contract_data, users, model.item_ids))
    np.testing.assert_allclose(got, model.score(users), atol=1e-6)  # float32 products


def test_empty_or_negative_only_histories_get_the_popularity_fallback(
    contract_data: ContractData,
) -> None:
    model = baselines.EASE(l2=30.0, min_value=4.0).fit(contract_data.train, contract_data.items)
    scorer = model.history_scorer()
    empty = History(np.empty(0, np.int64), np.empty(0))
    disliked = History(np.array([0, 1]), np.array([1.0, 2.0]))
    got = scorer.score([empty, disliked])
    np.testing.assert_array_equal(got, np.tile(model.popularity, (2, 1)))


def test_saved_scorers_load_and_move_onto_a_grown_catalogue(
    contract_data: ContractData, tmp_path
) -> None:
    fitted = [baselines.EASE(l2=30.0).fit(contract_data.train, contract_data.items),
              baselines.ALS(factors=4, iterations=3).fit(contract_data.train, contract_data.items)]
    item_ids = fitted[0].item_ids
    grown = np.sort(np.concatenate([item_ids, [item_ids.max() + 1, item_ids.max() + 2]]))
    history = History(np.array([0, 3, 5]), np.array([5.0, 4.0, 3.0]))
    for model in fitted:
        scorer = model.history_scorer()
        save_scorer(scorer, tmp_path / "s.npz")
        loaded = load_scorer(tmp_path / "s.npz")
        np.testing.assert_allclose(loaded.score([history]), scorer.score([history]), rtol=1e-6)
        moved = loaded.on(grown, np.zeros((grown.size, 0)))
        got = moved.score([history])[0]
        np.testing.assert_allclose(got[: item_ids.size], scorer.score([history])[0], rtol=1e-6)
        assert (got[item_ids.size :] == 0).all()


def test_a_loaded_content_scorer_uses_the_served_vectors(tmp_path) -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    scorer = ContentProfileScorer(np.array([1, 2, 3]), vectors, np.full(3, 1 / 3))
    save_scorer(scorer, tmp_path / "c.npz")
    served = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.1]])
    bound = load_scorer(tmp_path / "c.npz").on(np.array([1, 2, 3, 4]), served)
    got = bound.score([History(np.array([0]), np.array([5.0]))])[0]
    assert got[3] > got[2] > got[1]


@pytest.mark.parametrize("gather_limit", [10**6, 8])  # by bincount; by scipy above 8
def test_item_item_sum_gathers_the_rows_of_the_dense_matrix(gather_limit: int) -> None:
    rng = np.random.default_rng(7)
    dense = rng.normal(size=(40, 30)) * (rng.random((40, 30)) < 0.2)
    dense[[0, 5, 6, 39]] = 0.0  # empty rows: first, inside a run, last
    scorer = ItemItemScorer(np.arange(40), sparse.csr_matrix(dense), np.zeros(30))
    scorer.GATHER_LIMIT = gather_limit
    for size in (1, 2, 7, 40):
        for _ in range(20):
            cols = np.sort(rng.choice(40, size, replace=False))
            np.testing.assert_allclose(scorer.score([History(cols, np.ones(size))])[0],
                                       dense.astype(np.float32)[cols].sum(0), atol=1e-6)
    empty_rows = History(np.array([0, 5]), np.ones(2))
    np.testing.assert_array_equal(scorer.score([empty_rows])[0], np.zeros(30))
