"""Which content score finds the new items a user goes on to like? Recall among new items only.

    python bench/new_item_scorers.py [--stages validation,test]

For each stage of the per-user split (``avrec evaluate``'s protocol) it fits the gated fusion
on the stage's fit interactions (as the ``served`` entry does, ~5 min a stage on 2 cores),
then ranks, for every user with positives on new items (no fit interaction), the new items
they have not seen by each content score below and prints Recall@3/5/10/20 among new items:
what the pool's reserved new-item places (20) and the exploration slots (a few) can reach.

* ``profile``: cosine to the mean of the user's positives (the content generator's score);
* ``neighbours-k``: mean of the k best cosines to the user's history items
  (:func:`avrec.ranker.candidate_pool.neighbour_similarity`);
* ``profile+neighbours-5``: their reciprocal-rank fusion, the order the served pool's
  new-item reserve uses (:func:`avrec.ranker.candidate_pool.new_item_neighbour_ranks`).
"""

from __future__ import annotations

import argparse

import numpy as np
import polars as pl

from avrec import tables
from avrec.ranker.candidate_pool import (
    neighbour_similarity,
    new_item_neighbour_ranks,
    ranks,
    unit_rows,
)
from avrec.ranker.history_scorers import History
from avrec.ranker.model_registry import FusedVectors
from avrec.ranker.splits import Split, per_user_split
from avrec.ranker.stage_data import stage_data

KS = (3, 5, 10, 20)


def stage_table(split: Split, name: str, items: pl.DataFrame) -> dict[str, np.ndarray]:
    """Mean Recall@KS among new items per content score, over the stage's users."""
    stage = split.stage(name)  # type: ignore[arg-type]
    item_ids = np.sort(items["item_id"].to_numpy())
    data = stage_data(stage, item_ids)
    vectors = FusedVectors(tables.read_table("item_encodings"))("mixed", stage.fit, items)
    unit = np.zeros((item_ids.size, vectors.vectors.shape[1]))
    unit[np.searchsorted(item_ids, vectors.item_ids)] = unit_rows(
        np.asarray(vectors.vectors, dtype=np.float64))
    has_vector = np.linalg.norm(unit, axis=1) > 0
    new = data.fit_counts == 0
    targets = data.relevant & ~data.exclude & new[None, :]
    fit = stage.fit.sort("event_timestamp")
    recalls: dict[str, list[np.ndarray]] = {}
    for row in np.flatnonzero(targets.any(axis=1)):
        events = fit.filter(pl.col("user_id") == data.users[row])
        history = np.searchsorted(item_ids, events["item_id"].to_numpy())
        positives = history[events["value"].to_numpy() >= stage.positive_threshold]
        liked = positives if positives.size else history
        outside = (data.exclude[row] | ~new)[None, :]
        profile = unit @ unit_rows(unit[liked].mean(0, keepdims=True))[0]
        scores = {"profile": profile}
        for k in (1, 5, 20):
            scores[f"neighbours-{k}"] = neighbour_similarity(
                unit, has_vector, history, np.arange(item_ids.size), k)
        fused = new_item_neighbour_ranks(
            ranks(profile[None, :], outside), unit, has_vector,
            [History(history, events["value"].to_numpy())], new[None, :], outside, 5)
        scores["profile+neighbours-5"] = -fused[0].astype(np.float64)
        for score_name, score in scores.items():
            order = np.argsort(-np.where(outside[0], -np.inf, score), kind="stable")[:max(KS)]
            found = np.cumsum(targets[row, order]) / targets[row].sum()
            recalls.setdefault(score_name, []).append(found[[k - 1 for k in KS]])
    print(f"{name}: {len(next(iter(recalls.values())))} users with new-item positives, "
          f"{int(targets.sum())} positives, {int(new.sum())} new items")
    return {score_name: np.mean(v, axis=0) for score_name, v in recalls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="validation,test")
    args = parser.parse_args()
    split = per_user_split(tables.read_table("events"))
    items = tables.read_table("items")
    for name in args.stages.split(","):
        table = stage_table(split, name, items)
        print(f"| {name} score | " + " | ".join(f"R@{k}" for k in KS) + " |")
        print("|---|" + "---|" * len(KS))
        for score_name, values in table.items():
            print(f"| {score_name} | " + " | ".join(f"{v:.4f}" for v in values) + " |")


if __name__ == "__main__":
    main()
