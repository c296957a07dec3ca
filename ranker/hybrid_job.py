"""The hybrid ranker's part of ``avrec train``: choose on validation, fit on everything, export.

Every choice is made by the code on a per-user temporal validation split of the training
window (each user's newest 10% of ratings, :func:`avrec.ranker.splits.per_user_split`), the way
``avrec evaluate`` makes it:

1. each generator's hyperparameters (EASE, ALS, ItemKNN; :data:`avrec.ranker.baselines.GRIDS`, or
   the small ``QUICK_GRIDS``) by validation NDCG@10;
2. the hybrid's own settings (:data:`avrec.ranker.model_registry.HYBRID_GRID`; the quick run keeps
the
   defaults);
3. the exploration policy for new items (how many slots, for what share of the users with
   the longest histories): of the policies whose validation NDCG@20 stays within
   ``explore_tolerance`` of none, the one showing the most new items (slots x share)
   (:func:`avrec.ranker.exploration.choose_exploration`); the share becomes a history length over
   the users of the final fit (:func:`avrec.ranker.hybrid.history_threshold`);

then the hybrid is fitted on the whole window (rating events) with the served item vectors
and written as ``<run>/hybrid/`` (:meth:`avrec.ranker.hybrid.HybridRecommender.export`), which
``avrec serve`` loads next to the deep ranker and serves ``Recommend`` / ``Rank`` with.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from avrec.ranker import evaluation, exploration, model_registry
from avrec.ranker.features import ItemVectors
from avrec.ranker.generator_cache import GeneratorCache
from avrec.ranker.hybrid import ContentGenerator, HybridConfig, HybridRecommender
from avrec.ranker.hybrid_pipeline import SCORER_FILE, SavedPipeline
from avrec.ranker.recommender import Recommender, catalogue
from avrec.ranker.splits import per_user_split
from avrec.ranker.stage_data import stage_data

KS = (10, 20)
VALIDATION_FRACTION = 0.1


def _hybrid_factory(generators: dict[str, dict[str, Any]], vectors: ItemVectors, quick: bool
                    ) -> evaluation.ModelSpec:
    cache = GeneratorCache()  # grid points and the final fit repeat the generators' fits

    def build(params: dict[str, Any], seed: int) -> Recommender:
        factories: dict[str, Any] = {
            name: functools.partial(model_registry.BASELINE_FACTORIES[name], seed=seed, **tuned)
            for name, tuned in generators.items()
        }
        factories["content"] = functools.partial(ContentGenerator, vectors)
        cfg = HybridConfig(seed=seed, **(model_registry.QUICK_HYBRID if quick else {}), **params)
        return HybridRecommender(factories, vectors, cfg, seed, "hybrid", cache)

    grid = [{}] if quick else model_registry.HYBRID_GRID
    return evaluation.ModelSpec("hybrid", build, grid, baseline=False)


def train_hybrid(
    events: pl.DataFrame, items: pl.DataFrame, vectors: ItemVectors, out: Path,
    quick: bool = False, seed: int = 0,
    explore_tolerance: float = exploration.EXPLORE_TOLERANCE,
) -> dict[str, Any]:
    """Tune, fit and export the hybrid; returns what the run's manifest records about it."""
    started = time.perf_counter()
    # each user's newest 10% of ratings choose; the models fit on the 90% before them
    split = per_user_split(events, test_fraction=VALIDATION_FRACTION, validation_fraction=0.0)
    validation = stage_data(split.stage("test"), catalogue(items))
    if validation.users.size == 0:
        raise ValueError("no validation users: the window has too few ratings per user")
    generators: dict[str, dict[str, Any]] = {}
    chosen: dict[str, Any] = {}
    for spec in model_registry.model_specs(model_registry.HYBRID_GENERATORS, quick):
        tuned = evaluation.tune(spec, validation, items, KS, seed)
        generators[spec.name] = tuned.params
        chosen[spec.name] = {"params": tuned.params, "validation_ndcg@10": tuned.score}
    spec = _hybrid_factory(generators, vectors, quick)
    tuned = evaluation.tune(spec, validation, items, KS, seed)
    assert tuned.exploration is not None
    policy = exploration.choose_exploration(tuned.exploration, KS, explore_tolerance)
    ratings = events.filter((pl.col("event_type") == "rating") & pl.col("value").is_not_null())
    ratings = ratings.select("user_id", "item_id", "value", "event_timestamp")
    model = spec.build(tuned.params, seed).fit(ratings, items)
    assert isinstance(model, HybridRecommender)
    min_history = model.history_threshold(policy["share"])
    model.set_exploration(int(policy["slots"]), max(KS), min_history)
    model.export(out)
    parity = onnx_parity(model, out, validation.users)
    return {
        "path": str(out),
        "generators": chosen,
        "validation_ndcg@10": tuned.score,
        "params": tuned.params,
        "exploration": {"chosen_slots": int(policy["slots"]), "chosen_share": policy["share"],
                        "min_history": min_history, "depth": max(KS),
                        "tolerance": explore_tolerance, "validation": tuned.exploration},
        "validation_users": int(validation.users.size),
        "fit_ratings": int(ratings.height),
        "epochs_kept": model.history.best_epoch + 1,
        "seconds": round(time.perf_counter() - started, 1),
        "grids": "quick" if quick else "full",
        "catalogue_items": int(np.asarray(model.item_ids).size),
        "onnx": parity,
    }


def onnx_parity(model: HybridRecommender, directory: Path, users: np.ndarray,
                tolerance: float = 1e-4) -> dict[str, Any]:
    """Score ``users``' pools with the torch bag and the exported ONNX scorer; raise when
    they differ by more than ``tolerance``."""
    model.score(users[:256])
    assert model.last_pool is not None
    features = model.last_pool.features
    torch_scores = model._run_scorer(features)
    onnx_scores = SavedPipeline.read(directory).model(features)
    diff = float(np.abs(torch_scores - onnx_scores).max())
    if not diff <= tolerance:
        raise RuntimeError(f"the exported hybrid scorer differs from torch by {diff:.3g}")
    return {"path": str(directory / SCORER_FILE), "max_abs_diff": diff,
            "rows": int(features.shape[0] * features.shape[1])}
