"""Which new items should fill the served list's exploration slots? A replay of the served pools.

    python bench/slot_orders.py [--seed 0] [--out data/reports/slot-orders]

Runs ``avrec evaluate --split per-user --models ease,served`` (about as long as that run) and
keeps, for the validation stage of the chosen setting and for the test stage, every user's
served pool as :meth:`~avrec.ranker.hybrid_pipeline.HybridPipeline.recommend` scored it (columns,
scores, new-item flags, features). Then it re-orders the same pools with the new items of
each ordering below in the last ``n`` places of the top 20 and prints NDCG@20 and new-item
Recall@20 per slot count: the pool scorer (what ships), the pool's own order of the new items
(content rank fused with 30-day popularity, :func:`~avrec.ranker.candidate_pool.new_item_ranks`),
and single features (cosine to the user's profile, 30-day popularity, genre match).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from avrec.ranker import evaluation, hybrid_pipeline, metrics

SLOTS = (0, 1, 2, 3, 4, 5, 8)
DEPTH = 20
Pool = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # columns, scores, cold, features
Order = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (scores, features) -> priority


def record_pools() -> tuple[list[Pool], list[dict]]:
    """Patch the served path so each stage's pools are kept (``stages``: one dict per
    exploration curve the harness computes: each validation improvement, then test)."""
    calls: list[Pool] = []
    stages: list[dict] = []
    recommend = hybrid_pipeline.HybridPipeline.recommend
    stage_scores, curve = evaluation.stage_scores, evaluation.exploration_curve

    def keeping(self, user, item_stats, now, top_k, candidates=None):  # type:
                                                                       # ignore[no-untyped-def]
        scored = self.score(self.context([user], now), [item_stats],
                            None if candidates is None else candidates[None, :])
        assert scored.scores is not None
        calls.append((scored.pool[0], scored.scores[0], scored.cold[0], scored.features[0]))
        return recommend(self, user, item_stats, now, top_k, candidates)

    def scoring(model, data):  # type: ignore[no-untyped-def]
        calls.clear()
        return stage_scores(model, data)

    def keeping_curve(model, data, ks, seed, **kwargs):  # type: ignore[no-untyped-def]
        users = np.union1d(data.users, data.pairs["user_id"].to_numpy())
        stages.append({"data": data, "rows": np.searchsorted(users, data.users),
                       "pools": list(calls), "names": model.pipeline.features.names})
        return curve(model, data, ks, seed, **kwargs)

    hybrid_pipeline.HybridPipeline.recommend = keeping  # type: ignore[method-assign]
    evaluation.stage_scores = scoring
    evaluation.exploration_curve = keeping_curve
    return calls, stages


def slotted(pool: Pool, priority: np.ndarray, slots: int) -> np.ndarray:
    """The pool's columns as served with ``slots`` new items (best ``priority``) at the end of
    the top :data:`DEPTH`."""
    columns, scores, cold, _ = pool
    order = np.argsort(-scores, kind="stable")
    rest = order[DEPTH - slots:]
    new = rest[cold[rest]]
    chosen = new[np.argsort(-priority[new], kind="stable")][:slots]
    others = rest[~np.isin(rest, chosen)]
    return columns[np.concatenate([order[:DEPTH - slots], chosen, others])]


def measure(stage: dict, order: Order, slots: int) -> tuple[float, float]:
    """(NDCG@20, new-item Recall@20) of ``stage`` with its new items ordered by ``order``."""
    data = stage["data"]
    scores = np.zeros((data.users.size, data.item_ids.size))
    for row, user_row in enumerate(stage["rows"]):
        pool = stage["pools"][user_row]
        columns = slotted(pool, order(pool[1], pool[3]), slots)
        scores[row, columns] = 1.0 + np.arange(columns.size, 0, -1)
    result = metrics.ranking_metrics(scores, data.relevant, data.exclude, (DEPTH,),
                                     metrics.tiebreak_priority(data.item_ids.size, 0))
    _, cold_recall, _ = evaluation._cold_recall(result, data, DEPTH)
    return float(result.per_user[f"ndcg@{DEPTH}"].mean()), float(cold_recall.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/reports/slot-orders"))
    args = parser.parse_args()
    _, stages = record_pools()
    evaluation.main(["--split", "per-user", "--seed", str(args.seed), "--models",
                     "ease,served", "--out", str(args.out)])
    column = {name: i for i, name in enumerate(stages[-1]["names"])}
    orders: dict[str, Order] = {
        "scorer (shipped)": lambda scores, _f: scores,
        "new-item rank": lambda scores, _f: -np.arange(scores.size, dtype=np.float64),
        "cosine to profile": lambda _s, f: f[:, column["sim_profile"]],
        "30-day popularity": lambda _s, f: f[:, column["log_popularity_30d"]],
        "genre match": lambda _s, f: f[:, column["genre_match"]],
    }
    for name, stage in (("validation", stages[-2]), ("test", stages[-1])):
        data = stage["data"]
        new = data.relevant & ~data.exclude & (data.fit_counts == 0)[None, :]
        reachable = sum(int(new[row, stage["pools"][u][0]].sum())
                        for row, u in enumerate(stage["rows"]))
        print(f"\n{name}: {int(new.any(1).sum())} users with new-item positives, "
              f"{int(new.sum())} such positives, {reachable} of them inside the pools")
        print("| order | " + " | ".join(f"{n} slots" for n in SLOTS) + " |")
        print("|---|" + "---|" * len(SLOTS))
        for label, order in orders.items():
            cells = [measure(stage, order, n) for n in SLOTS]
            print(f"| {label} | " + " | ".join(f"{a:.4f} / {b:.4f}" for a, b in cells) + " |")


if __name__ == "__main__":
    main()
