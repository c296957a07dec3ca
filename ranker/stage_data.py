"""An evaluation stage (validation or test) as dense ``[users, items]`` matrices.

The harness (:mod:`avrec.ranker.evaluation`) and the exploration curve
(:mod:`avrec.ranker.exploration`) read the same facts of a stage: who is evaluated, at which cut,
what is relevant, what was already seen, which items had no fit interaction (new items).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from avrec.ranker import metrics
from avrec.ranker.recommender import Recommender
from avrec.ranker.splits import Stage


@dataclass(frozen=True)
class StageData:
    """A stage as dense ``[users, items]`` matrices in the catalogue's item order."""

    stage: Stage
    item_ids: np.ndarray
    users: np.ndarray  # evaluated users, sorted
    relevant: np.ndarray  # bool
    exclude: np.ndarray  # bool
    as_of: np.ndarray  # datetime64[us] cut per evaluated user
    fit_counts: np.ndarray  # interactions per item in the fit data
    history: np.ndarray  # fit ratings per evaluated user
    pairs: pl.DataFrame  # labelled target pairs (user_id, item_id, label)


def _dense(frame: pl.DataFrame, users: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    out = np.zeros((users.size, item_ids.size), dtype=bool)
    rows = frame.filter(pl.col("user_id").is_in(users.tolist()))
    out[
        np.searchsorted(users, rows["user_id"].to_numpy()),
        np.searchsorted(item_ids, rows["item_id"].to_numpy()),
    ] = True
    return out


def cut_times(stage: Stage, users: np.ndarray) -> np.ndarray:
    """Each user's cut as naive-UTC ``datetime64[us]`` (NaT when the user has none)."""
    cut = pl.DataFrame({"user_id": users}).join(
        stage.cut, on="user_id", how="left", maintain_order="left"
    )
    return cut["start"].dt.replace_time_zone(None).to_numpy().astype("datetime64[us]")


def stage_data(stage: Stage, item_ids: np.ndarray) -> StageData:
    """Dense relevance / exclusion matrices and per-user facts for one stage."""
    users = stage.users
    fit_items = stage.fit["item_id"].to_numpy()
    per_user = stage.fit.group_by("user_id").len()
    history = (
        pl.DataFrame({"user_id": users})
        .join(per_user, on="user_id", how="left")
        .sort("user_id")["len"]
        .fill_null(0)
        .to_numpy()
    )
    return StageData(
        stage=stage,
        item_ids=item_ids,
        users=users,
        relevant=_dense(stage.positives, users, item_ids),
        exclude=_dense(stage.seen, users, item_ids),
        as_of=cut_times(stage, users),
        fit_counts=np.bincount(np.searchsorted(item_ids, fit_items), minlength=item_ids.size),
        history=history,
        pairs=stage.labelled_pairs,
    )


def stage_scores(
    model: Recommender, data: StageData
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Full-catalogue scores of the evaluated users, and (labels, scores) of the labelled pairs.

    Every user is scored once, at their own cut: the evaluated users and the users of the
    labelled pairs overlap, and scoring is the expensive part of the deep models.
    """
    pairs = data.pairs
    users = np.union1d(data.users, pairs["user_id"].to_numpy())
    scores = model.score(users, cut_times(data.stage, users))
    rows = np.searchsorted(users, pairs["user_id"].to_numpy())
    cols = np.searchsorted(data.item_ids, pairs["item_id"].to_numpy())
    labelled = (pairs["label"].to_numpy(), scores[rows, cols])
    return scores[np.searchsorted(users, data.users)], labelled



def cold_item_recall(
    result: metrics.RankingResult, data: StageData, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slice rows, per-user Recall@k on cold-item positives, random's expected value)."""
    cold_relevant = data.relevant & ~data.exclude & (data.fit_counts == 0)[None, :]
    rows = np.flatnonzero(cold_relevant.any(axis=1))
    hits = np.take_along_axis(cold_relevant[rows], result.top[rows, :k], axis=1).sum(axis=1)
    recall = hits / cold_relevant[rows].sum(axis=1)
    expected = metrics.random_expected_recall(cold_relevant[rows], data.exclude[rows], k)
    return rows, recall, expected
