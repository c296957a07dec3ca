"""Exploration slots for new items: the trade-off curve and the policy to ship.

A policy shows ``slots`` new items in the last places of the top ``max(k)`` to the ``share``
of users with the longest histories; :func:`exploration_curve` measures NDCG and new-item
recall for every policy without rescoring, :func:`choose_exploration` picks one within a
budget of validation NDCG.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from avrec.ranker import metrics
from avrec.ranker.recommender import Recommender
from avrec.ranker.stage_data import StageData, cold_item_recall

EXPLORE_SLOTS = (0, 1, 2, 3, 5, 8, 10)
EXPLORE_SHARES = (1.0, 0.5, 0.3)  # of the users, longest histories first, who get the slots
EXPLORE_TOLERANCE = 0.05  # NDCG@20 a model may lose on validation to show new items


def exploration_curve(
    model: Recommender, data: StageData, ks: Sequence[int], seed: int,
    slots: Sequence[int] = EXPLORE_SLOTS, shares: Sequence[float] = EXPLORE_SHARES,
) -> list[dict[str, float]]:
    """NDCG@k and cold-item Recall@max(k) for each exploration policy: ``slots`` new items
    for the ``share`` of users with the longest histories (at least ``min_history`` events
    among the users ``model`` was fitted on).

    ``model`` must have just scored ``data`` (its users and the labelled pairs' users, as
    :func:`stage_scores` does); ``rescore`` re-orders those scores without recomputing. The
    slots are the last places of the top max(k).
    """
    users = np.union1d(data.users, data.pairs["user_id"].to_numpy())
    rows = np.searchsorted(users, data.users)
    priority = metrics.tiebreak_priority(len(data.item_ids), seed)
    curve = []
    for share in shares:
        min_history = model.history_threshold(share)  # type: ignore[attr-defined]
        for n in slots:
            if n == 0 and share != shares[0]:
                continue  # no slots: the same point whoever would have had them
            rescored = model.rescore(n, max(ks), min_history)  # type: ignore[attr-defined]
            result = metrics.ranking_metrics(
                rescored[rows], data.relevant, data.exclude, ks, priority
            )
            _, cold, _ = cold_item_recall(result, data, max(ks))
            point = {"slots": n, "share": share, "min_history": min_history,
                     **{f"ndcg@{k}": float(result.per_user[f"ndcg@{k}"].mean()) for k in ks}}
            point[f"cold_recall@{max(ks)}"] = float(cold.mean()) if cold.size else 0.0
            curve.append(point)
    return curve


def choose_exploration(curve: list[dict[str, float]], ks: Sequence[int],
                       tolerance: float = EXPLORE_TOLERANCE) -> dict[str, float]:
    """The exploration policy to ship: of the curve's points whose validation NDCG@max(k)
    stays within ``tolerance`` of no slots (the share of ranking quality the product spends
    on showing new items), the one that shows the most new items (slots x share of users);
    ties go to the better validation cold-item recall, then NDCG@max(k), then fewer slots.

    Exposure comes first because validation's new-item recall rests on the few users who
    happen to like a new item in a short window (81 users, a handful of hits, on
    ml-latest-small): too few to rank policies by, while the budget is measured on everyone.
    """
    guard, cold = f"ndcg@{max(ks)}", f"cold_recall@{max(ks)}"
    base = next(p[guard] for p in curve if p["slots"] == 0)
    allowed = [p for p in curve if p[guard] >= (1.0 - tolerance) * base]
    return max(allowed, key=lambda p: (round(p["slots"] * p["share"], 9), p[cold], p[guard],
                                       -p["slots"]))

