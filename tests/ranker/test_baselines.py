"""Baselines on tiny hand-made cases whose scores are worked out by hand."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pytest
from scipy import sparse

from avrec.ranker import baselines
from avrec.ranker.recommender import InteractionMatrix

T = datetime(2020, 1, 1, tzinfo=UTC)
A, B, C, D = 1, 2, 3, 4
ITEMS = pl.DataFrame({"item_id": [D, B, C, A]})  # any order: the catalogue is sorted by id


def _interactions(rows: list[tuple[int, int, float]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [u for u, _, _ in rows],
            "item_id": [i for _, i, _ in rows],
            "value": [v for _, _, v in rows],
            "event_timestamp": [T] * len(rows),
        }
    )


# Users: 10 has {A, B}, 20 has {A, B, C}, 30 has {C, D}. Item columns over users 10/20/30:
# A = B = (1, 1, 0), C = (0, 1, 1), D = (0, 0, 1). Cosines: A-B 1, A-C = B-C = 1/2,
# C-D = 1/sqrt(2), A-D = B-D = 0.
TINY = _interactions(
    [(10, A, 5.0), (10, B, 4.0), (20, A, 4.0), (20, B, 5.0), (20, C, 2.0), (30, C, 5.0),
     (30, D, 1.0)]
)


def test_item_knn_with_all_neighbours_by_hand() -> None:
    model = baselines.ItemKNN(k=3).fit(TINY, ITEMS)
    scores = model.score([10, 30])
    # user 10 has A, B: score(j) = cos(j, A) + cos(j, B) (an item is not its own neighbour)
    np.testing.assert_allclose(scores[0], [1.0, 1.0, 1.0, 0.0])
    # user 30 has C, D: A gets cos(A, C) = 1/2, C gets cos(C, D), D gets cos(D, C)
    s = 1 / math.sqrt(2)
    np.testing.assert_allclose(scores[1], [0.5, 0.5, s, s])


def test_item_knn_uses_only_the_k_nearest_neighbours() -> None:
    # With k = 1 each item keeps one neighbour: A->B, B->A, C->D (0.707 > 0.5), D->C.
    scores = baselines.ItemKNN(k=1).fit(TINY, ITEMS).score([10])
    np.testing.assert_allclose(scores[0], [1.0, 1.0, 0.0, 0.0])


def test_item_knn_on_positives_only() -> None:
    # Positives (>= 4): 10 {A, B}, 20 {A, B}, 30 {C}. C and D have no positive co-occurrence.
    scores = baselines.ItemKNN(k=3, min_value=4.0).fit(TINY, ITEMS).score([10, 20])
    np.testing.assert_allclose(scores, [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])


def test_neighbours_match_a_dense_brute_force() -> None:
    rng = np.random.default_rng(1)
    dense = (rng.random((30, 25)) < 0.3).astype(np.float64)
    dense[:, 3] = 0  # an item nobody has
    sims = dense.T @ dense
    norms = np.sqrt(np.diag(sims))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.nan_to_num(sims / np.outer(norms, norms))
    np.fill_diagonal(cos, 0)
    k = 4
    got = baselines.top_k_neighbours(sparse.csr_matrix(dense), k, chunk=7).toarray()
    for j in range(25):
        kept = np.flatnonzero(got[j])
        assert kept.size <= k
        np.testing.assert_allclose(got[j, kept], cos[j, kept])
        if kept.size:
            # nothing left out is more similar than what was kept
            assert np.delete(cos[j], kept).max(initial=0) <= got[j, kept].min() + 1e-12


def test_popularity_counts_all_or_positive_interactions() -> None:
    everyone = baselines.Popularity().fit(TINY, ITEMS).score([10])[0]
    np.testing.assert_allclose(everyone, np.array([2, 2, 2, 1]) / 7)
    positives = baselines.Popularity(min_value=4.0).fit(TINY, ITEMS).score([10])[0]
    np.testing.assert_allclose(positives, np.array([2, 2, 1, 0]) / 5)


def test_content_knn_scores_cosine_to_the_mean_positive_vector() -> None:
    vectors = pl.DataFrame({"item_id": [A, B, C], "vector": [[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]})
    rows = _interactions([(1, A, 5.0), (1, C, 4.0), (1, B, 1.0), (2, B, 2.0)])
    model = baselines.ContentKNN(vectors, positive_threshold=4.0).fit(rows, ITEMS)
    # User 1's positives A = (1, 0) and C = (1, 1)/sqrt 2 (unit); their mean points at
    # (1 + 1/sqrt2, 1/sqrt2). D has no vector and ranks last.
    mean = np.array([1 + 1 / math.sqrt(2), 1 / math.sqrt(2)])
    mean /= np.linalg.norm(mean)
    units = np.array([[1.0, 0.0], [0.0, 1.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]])
    scores = model.score([1, 2])
    np.testing.assert_allclose(scores[0, :3], units @ mean)
    assert scores[0, 3] == baselines.NO_VECTOR_SCORE
    # User 2 has history but no positive: popularity fallback, flagged.
    assert model.fallback_mask([1, 2]).tolist() == [False, True]
    np.testing.assert_allclose(scores[1], model.popularity)


def test_factor_models_score_by_dot_products() -> None:
    for model in (baselines.ALS(factors=4, iterations=2), baselines.BPR(factors=4, iterations=2)):
        model.fit(TINY, ITEMS)
        scores = model.score([20, 10])
        expected = model.user_factors[[1, 0]] @ model.item_factors.T
        np.testing.assert_allclose(scores, expected)


def test_interaction_matrix_rejects_unknown_items_and_maps_users() -> None:
    with pytest.raises(ValueError, match="catalogue"):
        InteractionMatrix.build(_interactions([(1, 99, 5.0)]), np.array([A, B]))
    data = InteractionMatrix.build(TINY, np.array([A, B, C, D]), min_value=4.0)
    assert data.user_ids.tolist() == [10, 20, 30]
    assert data.rows(np.array([30, 5, 10])).tolist() == [2, -1, 0]
    assert data.matrix.toarray().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0]]


def test_grid_is_the_full_product_in_order() -> None:
    assert baselines.grid(a=[1, 2], b=["x"]) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]


def test_ease_equals_the_dense_closed_form() -> None:
    # Oracle: B = I - P diagMat(1/diag P), P = (X'X + l2 I)^-1 over items with interactions.
    rng = np.random.default_rng(4)
    users, items = 12, 6
    dense = (rng.random((users, items)) < 0.4).astype(np.float64)
    dense[:, 5] = 0  # nobody has item 6: no column in the inversion, zero scores
    dense[0, 0] = 1
    rows = [(u + 1, i + 1, 5.0) for u in range(users) for i in range(items) if dense[u, i]]
    catalogue = pl.DataFrame({"item_id": list(range(1, items + 1))})
    model = baselines.EASE(l2=2.0).fit(_interactions(rows), catalogue)
    active = dense[:, :5]
    precision = np.linalg.inv(active.T @ active + 2.0 * np.eye(5))
    weights = np.eye(5) - precision / np.diag(precision)[None, :]
    np.testing.assert_allclose(np.diag(weights), 0.0, atol=1e-12)
    present = np.flatnonzero(dense.sum(axis=1) > 0)
    scores = model.score(present + 1)
    np.testing.assert_allclose(scores[:, :5], active[present] @ weights, rtol=1e-5, atol=1e-6)
    assert (scores[:, 5] == 0).all()
    # an ad-hoc query of a user's whole history is the same score
    histories = [np.flatnonzero(dense[u]) for u in present]
    np.testing.assert_allclose(model.query(histories), scores, rtol=1e-6, atol=1e-7)


def test_ease_rejects_a_non_positive_l2() -> None:
    with pytest.raises(ValueError, match="l2"):
        baselines.EASE(l2=0.0)


def test_recent_popularity_counts_only_the_window_before_each_cut() -> None:
    day = 86_400
    rows = pl.DataFrame({
        "user_id": [1, 2, 3, 4, 5],
        "item_id": [A, A, B, C, C],
        "value": [5.0] * 5,
        "event_timestamp": [datetime.fromtimestamp(1_600_000_000 + d * day, UTC)
                            for d in (0, 1, 5, 9, 10)],
    })
    model = baselines.RecentPopularity(days=3).fit(rows, ITEMS)
    cut = np.datetime64(datetime.fromtimestamp(1_600_000_000 + 6 * day), "us")
    cuts = np.array([cut, cut + np.timedelta64(5 * day, "s")], dtype="datetime64[us]")
    scores = model.score([1, 2], cuts)
    # window (3, 6] days: only B; window (8, 11]: C twice, the event at the cut itself never
    assert np.floor(scores[0]).tolist() == [0, 1, 0, 0]
    assert np.floor(scores[1]).tolist() == [0, 0, 2, 0]
    # ties inside the window are broken by all-time popularity (A: 2 > D: 0)
    assert scores[0, 0] > scores[0, 3]
