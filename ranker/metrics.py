"""Offline metrics: full-catalogue ranking metrics per user, paired tests, binary metrics.

Ranking metrics rank the WHOLE catalogue for each user (no sampled negatives), after removing
the items the user interacted with before their cut (``exclude``). Equal scores are ordered by
a fixed, seeded random priority per item (:func:`tiebreak_priority`), so ties neither favour
low item ids nor depend on sort internals, and results are deterministic.

Definitions (``rel`` = the user's relevant items, ranks start at 1):

* ``recall@K`` = hits in the top K / ``|rel|``
* ``ndcg@K`` = sum over hits of ``1 / log2(rank + 1)``, divided by the same sum for an ideal
  ranking of ``min(|rel|, K)`` hits
* ``mrr`` = ``1 / rank`` of the best-ranked relevant item in the full (untruncated) ranking
* ``coverage@K`` = share of the catalogue in at least one user's top K
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

RANKING_METRICS = ("recall", "ndcg")


def tiebreak_priority(n_items: int, seed: int = 0) -> np.ndarray:
    """A seeded random priority per item (lower wins among equal scores)."""
    return np.random.default_rng(seed).permutation(n_items)


def masked_scores(scores: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """Scores as float64 with excluded items at ``-inf``; non-finite input is an error."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != exclude.shape:
        raise ValueError(f"scores {scores.shape} and exclude {exclude.shape} differ in shape")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite (NaN or inf found)")
    return np.where(exclude, -np.inf, scores)


def top_k(scores: np.ndarray, k: int, priority: np.ndarray) -> np.ndarray:
    """Indices of each row's ``k`` best items, best first; ties go to the lower ``priority``."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(scores, top, axis=1).min(axis=1)
    for row in np.flatnonzero((scores >= kth[:, None]).sum(axis=1) > k):
        candidates = np.flatnonzero(scores[row] >= kth[row])
        order = np.lexsort((priority[candidates], -scores[row, candidates]))
        top[row] = candidates[order[:k]]
    values = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((priority[top], -values), axis=1)
    return np.take_along_axis(top, order, axis=1)


def first_relevant_rank(
    scores: np.ndarray, relevant: np.ndarray, priority: np.ndarray
) -> np.ndarray:
    """1-based rank of each row's best-ranked relevant item in the full ranking."""
    rel_scores = np.where(relevant, scores, -np.inf)
    best_score = rel_scores.max(axis=1)
    at_best = relevant & (scores == best_score[:, None])
    best_priority = np.where(at_best, priority[None, :], np.iinfo(np.int64).max).min(axis=1)
    ahead = (scores > best_score[:, None]) | (
        (scores == best_score[:, None]) & (priority[None, :] < best_priority[:, None])
    )
    return ahead.sum(axis=1) + 1


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


@dataclass(frozen=True)
class RankingResult:
    """Per-user metric values (one row per user, in input order) and the top-K lists."""

    per_user: dict[str, np.ndarray]
    top: np.ndarray  # [n_users, max K] item indices, best first
    n_items: int

    def coverage(self, k: int) -> float:
        """Share of the catalogue recommended in at least one user's top ``k``."""
        return np.unique(self.top[:, :k]).size / self.n_items

    def subset(self, rows: np.ndarray) -> RankingResult:
        """The same metrics restricted to some users (boolean mask or row indices)."""
        per_user = {m: v[rows] for m, v in self.per_user.items()}
        return RankingResult(per_user, self.top[rows], self.n_items)


def ranking_metrics(
    scores: np.ndarray,
    relevant: np.ndarray,
    exclude: np.ndarray,
    ks: Sequence[int] = (10, 20),
    priority: np.ndarray | None = None,
) -> RankingResult:
    """Recall@K, NDCG@K and MRR per user over the full catalogue.

    ``scores``, ``relevant`` and ``exclude`` are ``[n_users, n_items]``; excluded items are
    neither ranked nor relevant. Every user needs at least one relevant item left.
    """
    relevant = np.asarray(relevant, dtype=bool) & ~np.asarray(exclude, dtype=bool)
    n_relevant = relevant.sum(axis=1)
    if (n_relevant == 0).any():
        raise ValueError(f"{int((n_relevant == 0).sum())} user(s) have no relevant item")
    masked = masked_scores(scores, exclude)
    priority = tiebreak_priority(masked.shape[1]) if priority is None else priority
    top = top_k(masked, max(ks), priority)
    hits = np.take_along_axis(relevant, top, axis=1)
    per_user: dict[str, np.ndarray] = {}
    for k in sorted(ks):
        hits_k = hits[:, :k]
        ideal = np.cumsum(_discounts(k))[np.minimum(n_relevant, k) - 1]
        per_user[f"recall@{k}"] = hits_k.sum(axis=1) / n_relevant
        per_user[f"ndcg@{k}"] = (hits_k * _discounts(k)).sum(axis=1) / ideal
    per_user["mrr"] = 1.0 / first_relevant_rank(masked, relevant, priority)
    return RankingResult(per_user, top, masked.shape[1])


def random_expected_recall(relevant: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Per-user Recall@k of a uniformly random ranking: ``min(1, k / candidates)``."""
    candidates = (~np.asarray(exclude, dtype=bool)).sum(axis=1)
    return np.minimum(1.0, k / np.maximum(candidates, 1)) * (relevant.sum(axis=1) > 0)


def mean_se(values: np.ndarray) -> dict[str, float]:
    """Mean, standard error of the mean (ddof 1) and count."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(values.mean()) if n else float("nan"), "se": se, "n": n}


def paired_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Paired per-user comparison of ``a`` against ``b``: mean difference, t-test and Wilcoxon
    signed-rank p-values (two-sided; 1.0 when every difference is zero)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired values must have the same shape (same users, same order)")
    diff = a - b
    if not diff.any():
        return {"mean_diff": 0.0, "t_p": 1.0, "wilcoxon_p": 1.0}
    return {
        "mean_diff": float(diff.mean()),
        "t_p": float(stats.ttest_rel(a, b).pvalue),
        "wilcoxon_p": float(stats.wilcoxon(a, b).pvalue),
    }


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half); NaN when one class is missing."""
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold (predict positive when ``score >= t``) with the highest F1."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.size == 0:
        raise ValueError("no labelled pairs to choose a threshold on")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    last_of_value = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    tp = np.cumsum(sorted_labels)[last_of_value]
    predicted = np.flatnonzero(last_of_value) + 1
    f1 = 2 * tp / (predicted + labels.sum())
    return float(sorted_scores[last_of_value][int(np.argmax(f1))])


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and accuracy / precision / recall / F1 of ``score >= threshold``."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores, dtype=np.float64) >= threshold
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "auc": auc(labels, scores),
        "accuracy": float((predicted == labels).mean()) if labels.size else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "threshold": float(threshold),
        "pairs": int(labels.size),
        "positive_share": float(labels.mean()) if labels.size else float("nan"),
    }
