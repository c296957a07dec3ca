"""Where one served hybrid answer spends its time, in process (no gRPC, no client threads).

    python bench/hybrid_latency.py [--requests 300] [--candidates 200] [--profile]

Needs the README main command's data (``make demo``: Redis materialized, a trained model with
``hybrid/``). Builds the engine exactly as ``avrec serve`` does (replay clock of the demo) and
times, for random active users (seeded):

Users are drawn from those with a fresh ``user_history`` row (active within the TTL).

* ``rank, first call``: :meth:`avrec.server.engine.RankingEngine.rank` with ``--candidates``
  random items (the Redis read of the user and their history, the pipeline, the answer's rows),
  the generator outputs computed anew as for a user's first request;
* ``rank, repeat call``: the same calls again, the generator outputs from the per-user cache
  (:mod:`avrec.ranker.user_score_cache`, as a user's later requests with the same history);
* ``recommend``: :meth:`~avrec.server.engine.RankingEngine.recommend`, top 20 (pool from the whole
  catalogue; first calls);
* the pipeline's stages for the same users (history scorers, ranks, the z-score moments,
  pool, features given the moments as served, ONNX scorer, served order), each timed alone;
* ``deep rank``: the same service with ``hybrid: false`` (the deep ranker), the baseline of
  the ~4 ms end-to-end latency target (README, "Latency in process, by stage").

The table gives p50/p90 in milliseconds and the ratio of p50 to the deep ranker's Rank.
``--profile`` also prints cProfile's top functions of ``rank``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from avrec import tables
from avrec.ranker.candidate_pool import candidate_pool, new_item_ranks, ranks
from avrec.ranker.history_scorers import History
from avrec.ranker.hybrid_features import CONTENT, RECENT, UnseenCatalogue
from avrec.ranker.hybrid_pipeline import ServedUser, served_order
from avrec.ranker.user_score_cache import UserScoreCache
from avrec.server.app import build_engine
from avrec.server.blas_threads import limit_blas_threads
from avrec.server.config import ServeConfig
from avrec.server.engine import utc_datetime64

CLOCK = datetime(2018, 9, 25, tzinfo=UTC)  # the demo's replay clock (the data ends 2018-09-24)


def active_users(ttl: timedelta) -> np.ndarray:
    """Users whose newest event is within the user views' TTL at the replay clock (their
    history row is fresh: the hybrid scores it)."""
    events = tables.read_table("events")
    last = events.group_by("user_id").agg(pl.col("event_timestamp").max())
    fresh = last.filter(pl.col("event_timestamp") > CLOCK - ttl)
    return np.sort(fresh["user_id"].to_numpy())


def timed(calls: list[Callable[[], object]]) -> np.ndarray:
    """Milliseconds of each call (after one warm-up call)."""
    calls[0]()
    out = []
    for call in calls:
        start = time.perf_counter()
        call()
        out.append((time.perf_counter() - start) * 1e3)
    return np.asarray(out)


def stage_calls(engine, users: list[int]) -> dict[str, list[Callable[[], object]]]:
    """One call per user for each pipeline stage, on that user's real inputs."""
    loaded = engine.ensure_snapshot(engine.materialization(), engine.clock.now())
    pipe, stats = loaded.pipeline, loaded.stats
    now = utc_datetime64(engine.clock.now())
    cfg = pipe.config
    cold = ~pipe.known[None, :]

    def pool_of(generator_ranks: list[np.ndarray], context: object) -> np.ndarray:
        """The pool as :meth:`~avrec.ranker.hybrid_pipeline.HybridPipeline.pool` draws it."""
        content = generator_ranks[cfg.generators.index(CONTENT)]
        if cfg.trending_new_items:
            content = new_item_ranks(content, [stats], cold, context.seen)
        return candidate_pool(generator_ranks, context.seen, cfg.candidates, cold, content,
                              cfg.cold_slots)

    stages: dict[str, list[Callable[[], object]]] = {
        name: [] for name in ("pipeline.recommend", "context", "history scorers", "ranks",
                              "moments", "pool", "features", "onnx scorer", "served order")}
    for user_id in users:
        _, history, _ = engine._read_user(user_id, engine.clock.now(), history=True)
        values = history.values if history is not None and history.fresh else {}
        user = ServedUser(np.asarray(values.get("history_items") or [], np.int64),
                          np.asarray(values.get("history_ratings") or [], np.float64), None)
        context = pipe.context([user], now)
        scores = [pipe.scorers[g].score(context.histories) for g in cfg.generators]
        generator_ranks = [ranks(s, context.seen) for s in scores]
        pool = pool_of(generator_ranks, context)
        recent = [History(p[-RECENT:], np.full(min(p.size, RECENT), cfg.positive_threshold))
                  for p in context.positives]
        queries = [pipe.scorers[g].score(recent) for g in cfg.queries]
        moments = [UnseenCatalogue(context.seen).moments(s) for s in (*scores, *queries)]
        features = pipe.features.build(context, pool, scores, generator_ranks, [stats], queries,
                                       moments)
        out = pipe.model(features)
        stages["pipeline.recommend"].append(
            lambda u=user: pipe.recommend(u, stats, now, 20))
        stages["context"].append(lambda u=user: pipe.context([u], now))
        stages["history scorers"].append(
            lambda c=context, r=recent: ([pipe.scorers[g].score(c.histories)
                                          for g in cfg.generators],
                                         [pipe.scorers[g].score(r) for g in cfg.queries]))
        stages["ranks"].append(lambda s=scores, c=context: [ranks(x, c.seen) for x in s])
        stages["pool"].append(lambda r=generator_ranks, c=context: pool_of(r, c))
        stages["moments"].append(lambda c=context, x=(*scores, *queries): [
            UnseenCatalogue(c.seen).moments(s) for s in x])
        stages["features"].append(lambda c=context, p=pool, s=scores, r=generator_ranks,
                                  q=queries, m=moments: pipe.features.build(c, p, s, r, [stats],
                                                                             q, m))
        stages["onnx scorer"].append(lambda f=features: pipe.model(f))
        stages["served order"].append(lambda p=pool, o=out: served_order(
            p[0], np.asarray(o[0], np.float64), ~pipe.known[p[0]], cfg.explore, cfg.depth, 20))
    return stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    limit_blas_threads(ServeConfig().blas_threads)  # as `avrec serve` does
    engine, _ = build_engine(ServeConfig(clock=CLOCK.isoformat()))
    if engine.models.hybrid is None:
        raise SystemExit("the newest model has no hybrid/: run `avrec train`")
    deep, _ = build_engine(ServeConfig(clock=CLOCK.isoformat(), hybrid=False))
    catalogue = engine.catalogue["item_id"].to_numpy()
    ttl = engine.store.get_feature_view("user_history").ttl
    users = rng.choice(active_users(ttl), size=args.requests).tolist()
    candidates = [rng.choice(catalogue, size=args.candidates, replace=False).tolist()
                  for _ in users]
    rows: dict[str, np.ndarray] = {}
    rows["deep rank"] = timed([lambda u=u, c=c: deep.rank(u, c) for u, c in
                               zip(users, candidates, strict=True)])
    ranks = [lambda u=u, c=c: engine.rank(u, c) for u, c in zip(users, candidates, strict=True)]
    pipeline = engine.ensure_snapshot(engine.materialization(), engine.clock.now()).pipeline
    served_cache = pipeline.user_cache
    pipeline.user_cache = None  # every call computes its generator outputs anew
    rows["rank, first call"] = timed(ranks)
    pipeline.user_cache = UserScoreCache(len(set(users)))
    for call in ranks:  # each user's first call fills the cache
        call()
    rows["rank, repeat call"] = timed(ranks)
    pipeline.user_cache = None
    rows["recommend"] = timed([lambda u=u: engine.recommend(u, 20) for u in users])
    pipeline.user_cache = served_cache
    for name, calls in stage_calls(engine, users).items():
        rows[f"  {name}"] = timed(calls)
    base = float(np.median(rows["deep rank"]))
    print(f"{'path':<22}{'p50 ms':>9}{'p90 ms':>9}{'x deep':>8}")
    for name, values in rows.items():
        p50, p90 = np.percentile(values, [50, 90])
        print(f"{name:<22}{p50:>9.2f}{p90:>9.2f}{p50 / base:>8.2f}")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for u, c in zip(users, candidates, strict=True):
            engine.rank(u, c)
        profile.disable()
        pstats.Stats(profile).sort_stats("cumulative").print_stats(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
