"""Metrics against values computed by hand, and against a brute-force full-sort oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avrec.ranker import metrics

LOG2_3 = math.log2(3)


def _one_user(scores, relevant, exclude, ks=(2, 3), priority=None):
    n = len(scores)
    rel = np.zeros((1, n), dtype=bool)
    exc = np.zeros((1, n), dtype=bool)
    rel[0, relevant] = True
    exc[0, exclude] = True
    prio = np.arange(n) if priority is None else np.asarray(priority)
    return metrics.ranking_metrics(np.array([scores], dtype=float), rel, exc, ks, prio)


def test_recall_ndcg_mrr_by_hand_with_exclusion() -> None:
    # Item 0 (seen before the cut) is excluded: the ranking is 1, 2, 3, 4; relevant {1, 3}.
    result = _one_user([0.9, 0.8, 0.7, 0.6, 0.5], relevant=[1, 3], exclude=[0])
    values = {name: float(v[0]) for name, v in result.per_user.items()}
    assert values["recall@2"] == pytest.approx(1 / 2)
    assert values["ndcg@2"] == pytest.approx(1.0 / (1.0 + 1 / LOG2_3))
    assert values["recall@3"] == pytest.approx(1.0)
    assert values["ndcg@3"] == pytest.approx((1.0 + 1 / 2) / (1.0 + 1 / LOG2_3))
    assert values["mrr"] == pytest.approx(1.0)
    assert result.top[0].tolist() == [1, 2, 3]


def test_without_exclusion_the_seen_item_would_take_rank_one() -> None:
    result = _one_user([0.9, 0.8, 0.7, 0.6, 0.5], relevant=[1, 3], exclude=[])
    assert float(result.per_user["mrr"][0]) == pytest.approx(1 / 2)
    assert float(result.per_user["recall@2"][0]) == pytest.approx(1 / 2)
    assert float(result.per_user["ndcg@2"][0]) == pytest.approx((1 / LOG2_3) / (1 + 1 / LOG2_3))


def test_relevant_but_seen_items_are_not_counted() -> None:
    result = _one_user([0.1, 0.9, 0.8], relevant=[0, 1], exclude=[1], ks=(1,))
    # Only item 0 is relevant now; ranking is 2, 0.
    assert float(result.per_user["recall@1"][0]) == 0.0
    assert float(result.per_user["mrr"][0]) == pytest.approx(1 / 2)


def test_ties_follow_the_priority_not_the_item_index() -> None:
    result = _one_user([0.5, 0.5, 0.5], relevant=[0], exclude=[], ks=(1,), priority=[2, 0, 1])
    assert result.top[0].tolist() == [1]
    assert float(result.per_user["mrr"][0]) == pytest.approx(1 / 3)


def test_top_k_breaks_boundary_ties_by_priority() -> None:
    scores = np.array([[1.0, 0.5, 0.5, 0.5, 0.0], [0.0, 0.1, 0.2, 0.3, 0.4]])
    top = metrics.top_k(scores, 2, np.array([4, 3, 2, 1, 0]))
    assert top.tolist() == [[0, 3], [4, 3]]


def test_coverage_counts_distinct_items_in_the_top_k() -> None:
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 3.0, 2.0]])
    rel = np.ones_like(scores, dtype=bool)
    result = metrics.ranking_metrics(scores, rel, np.zeros_like(rel), (1, 2), np.arange(4))
    assert result.coverage(1) == pytest.approx(2 / 4)
    assert result.coverage(2) == pytest.approx(4 / 4)


def test_users_without_relevant_items_and_nan_scores_are_errors() -> None:
    with pytest.raises(ValueError, match="no relevant"):
        _one_user([0.3, 0.2], relevant=[0], exclude=[0])
    with pytest.raises(ValueError, match="finite"):
        _one_user([np.nan, 0.2], relevant=[1], exclude=[])


def _oracle(scores, relevant, exclude, priority, ks):
    """Per-user metrics from a plain Python sort of the candidates."""
    out = {f"{m}@{k}": [] for m in ("recall", "ndcg") for k in ks} | {"mrr": []}
    for s, rel, exc in zip(scores, relevant, exclude, strict=True):
        candidates = [i for i in range(len(s)) if not exc[i]]
        ranking = sorted(candidates, key=lambda i: (-s[i], priority[i]))
        rel_set = {i for i in range(len(s)) if rel[i] and not exc[i]}
        for k in ks:
            hits = [r for r, i in enumerate(ranking[:k], start=1) if i in rel_set]
            ideal = sum(1 / math.log2(r + 1) for r in range(1, min(len(rel_set), k) + 1))
            out[f"recall@{k}"].append(len(hits) / len(rel_set))
            out[f"ndcg@{k}"].append(sum(1 / math.log2(r + 1) for r in hits) / ideal)
        out["mrr"].append(1 / next(r for r, i in enumerate(ranking, 1) if i in rel_set))
    return out


def test_vectorised_metrics_match_a_brute_force_oracle_with_many_ties() -> None:
    rng = np.random.default_rng(5)
    n_users, n_items, ks = 40, 60, (5, 10)
    scores = rng.integers(0, 6, size=(n_users, n_items)).astype(float)  # lots of ties
    exclude = rng.random((n_users, n_items)) < 0.2
    relevant = (rng.random((n_users, n_items)) < 0.1) & ~exclude
    relevant[np.arange(n_users), rng.integers(0, n_items, n_users)] = True
    relevant &= ~exclude
    keep = relevant.any(axis=1)
    scores, relevant, exclude = scores[keep], relevant[keep], exclude[keep]
    priority = metrics.tiebreak_priority(n_items, seed=11)
    got = metrics.ranking_metrics(scores, relevant, exclude, ks, priority).per_user
    want = _oracle(scores, relevant, exclude, priority, ks)
    for name, values in want.items():
        np.testing.assert_allclose(got[name], values, err_msg=name)


def test_random_expected_recall_is_k_over_candidates() -> None:
    relevant = np.array([[True, False, False, False, False]])
    exclude = np.array([[False, True, True, False, False]])
    assert metrics.random_expected_recall(relevant, exclude, 2).tolist() == [pytest.approx(2 / 3)]


def test_mean_and_standard_error_by_hand() -> None:
    stat = metrics.mean_se(np.array([1.0, 2.0, 3.0, 6.0]))
    # mean 3, sample variance (4 + 1 + 0 + 9) / 3 = 14/3
    assert stat["mean"] == pytest.approx(3.0)
    assert stat["se"] == pytest.approx(math.sqrt(14 / 3) / 2)
    assert stat["n"] == 4


def test_paired_tests_by_hand() -> None:
    # Differences 1, 2, 3: t = 2 / (1 / sqrt 3); with 2 degrees of freedom the two-sided
    # p-value is 1 - |t| / sqrt(t^2 + 2). Wilcoxon exact: all 3 signs positive, p = 2 / 2^3.
    result = metrics.paired_test(np.array([1.0, 2.0, 3.0]), np.zeros(3))
    t = 2 * math.sqrt(3)
    assert result["mean_diff"] == pytest.approx(2.0)
    assert result["t_p"] == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert result["wilcoxon_p"] == pytest.approx(0.25)
    same = metrics.paired_test(np.ones(4), np.ones(4))
    assert same == {"mean_diff": 0.0, "t_p": 1.0, "wilcoxon_p": 1.0}


def test_auc_by_hand() -> None:
    # Positive 0.9 beats both negatives, positive 0.3 beats one: 3 of 4 pairs.
    assert metrics.auc(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.3, 0.1])) == 0.75
    assert metrics.auc(np.array([1, 0]), np.array([0.5, 0.5])) == 0.5
    assert math.isnan(metrics.auc(np.array([1, 1]), np.array([0.5, 0.2])))


def test_threshold_maximises_f1_and_binary_metrics_by_hand() -> None:
    labels = np.array([1, 1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1])
    # F1 at 0.9, 0.8, 0.7, 0.6, 0.1: 2/4, 4/5, 4/6, 6/7, 6/8 -> best 0.6.
    threshold = metrics.best_f1_threshold(labels, scores)
    assert threshold == 0.6
    result = metrics.binary_metrics(labels, scores, threshold)
    assert result["accuracy"] == pytest.approx(4 / 5)
    assert result["precision"] == pytest.approx(3 / 4)
    assert result["recall"] == pytest.approx(1.0)
    assert result["f1"] == pytest.approx(6 / 7)
    assert result["auc"] == pytest.approx(5 / 6)
