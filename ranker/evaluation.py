"""The offline evaluation harness (``avrec evaluate``): tune on validation, test once.

For each model: every hyperparameter setting is fitted on the training part and scored on
the validation users (selection metric: NDCG at the smallest K); the F1 threshold of the
binary metrics is chosen on the validation pairs of that best setting; the best setting is
refitted on training + validation and evaluated once on the test users. Ranking is over the
whole catalogue minus each user's already-seen items. Per-user values give standard errors
and paired tests against the best baseline (chosen on validation, not on test).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from avrec import config, tables
from avrec.names import ITEM_BEHAVIOUR
from ranker import baselines, metrics
from ranker.generator_cache import GeneratorCache
from ranker.recommender import Recommender, catalogue
from ranker.splits import Split, Stage, global_split, per_user_split
from ranker.training import TrainConfig

SHORT_HISTORY = 20
PAIRED_METRICS = ("recall", "ndcg", "mrr")


@dataclass(frozen=True)
class ModelSpec:
    """A named model family: ``build(params, seed)`` makes an unfitted model per grid point."""

    name: str
    build: Callable[[dict[str, Any], int], Recommender]
    grid: list[dict[str, Any]] = field(default_factory=lambda: [{}])
    baseline: bool = True
    # the run's record of every model's validation-chosen settings (the hybrids read their
    # generators' settings there)
    tuned: dict[str, dict[str, Any]] | None = None
    # hold the settings this model chose earlier in the run instead of searching ``grid``:
    # the ablations and ``served`` keep the chosen hybrid's settings (only content changes)
    settings_from: str | None = None

    def search_grid(self) -> list[dict[str, Any]]:
        """The settings to try on validation: ``grid``, or the one chosen by
        ``settings_from`` when that model ran earlier in the run."""
        if self.settings_from and self.tuned and self.settings_from in self.tuned:
            return [self.tuned[self.settings_from]]
        return self.grid


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


def _summary(result: metrics.RankingResult) -> dict[str, dict[str, float]]:
    return {name: metrics.mean_se(values) for name, values in result.per_user.items()}


def _cold_recall(
    result: metrics.RankingResult, data: StageData, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slice rows, per-user Recall@k on cold-item positives, random's expected value)."""
    cold_relevant = data.relevant & ~data.exclude & (data.fit_counts == 0)[None, :]
    rows = np.flatnonzero(cold_relevant.any(axis=1))
    hits = np.take_along_axis(cold_relevant[rows], result.top[rows, :k], axis=1).sum(axis=1)
    recall = hits / cold_relevant[rows].sum(axis=1)
    expected = metrics.random_expected_recall(cold_relevant[rows], data.exclude[rows], k)
    return rows, recall, expected


@dataclass
class ModelRun:
    """Everything measured for one model on one split (per-user values kept for tests)."""

    name: str
    baseline: bool
    validation_score: float
    result: metrics.RankingResult
    report: dict[str, Any]


@dataclass(frozen=True)
class Tuned:
    """The outcome of tuning on validation."""

    params: dict[str, Any]
    score: float
    threshold: float  # the F1-maximising score threshold on the validation pairs
    trials: list[dict[str, Any]]
    exploration: list[dict[str, float]] | None = None  # the best setting's validation curve


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
            _, cold, _ = _cold_recall(result, data, max(ks))
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


def tune(
    spec: ModelSpec, validation: StageData, items: pl.DataFrame, ks: Sequence[int], seed: int
) -> Tuned:
    """Fit every grid point on training, keep the best validation NDCG at the smallest K."""
    select = f"ndcg@{min(ks)}"
    priority = metrics.tiebreak_priority(len(validation.item_ids), seed)
    trials: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any], tuple[np.ndarray, np.ndarray], Any] | None = None
    for params in spec.search_grid():
        model = spec.build(params, seed).fit(validation.stage.fit, items)
        scores, pairs = stage_scores(model, validation)
        result = metrics.ranking_metrics(
            scores, validation.relevant, validation.exclude, ks, priority
        )
        value = float(result.per_user[select].mean())
        trials.append({"params": params, f"validation_{select}": value})
        if best is None or value > best[0]:
            curve = (exploration_curve(model, validation, ks, seed)
                     if getattr(model, "can_explore", False) else None)
            best = (value, params, pairs, curve)
    if best is None:
        raise ValueError(f"{spec.name}: empty hyperparameter grid")
    labels, scores = best[2]
    return Tuned(best[1], best[0], metrics.best_f1_threshold(labels, scores), trials, best[3])


def run_model(
    spec: ModelSpec,
    validation: StageData,
    test: StageData,
    items: pl.DataFrame,
    ks: Sequence[int],
    seed: int,
    short_history: int = SHORT_HISTORY,
    explore_tolerance: float = EXPLORE_TOLERANCE,
) -> ModelRun:
    """Tune ``spec`` on validation, refit the best setting, evaluate it on test."""
    started = time.perf_counter()
    settings_from = spec.settings_from if len(spec.search_grid()) < len(spec.grid) else None
    tuned = tune(spec, validation, items, ks, seed)
    if spec.tuned is not None:
        spec.tuned[spec.name] = tuned.params
    tuned_at = time.perf_counter()
    model = spec.build(tuned.params, seed).fit(test.stage.fit, items)
    fitted_at = time.perf_counter()
    exploration: dict[str, Any] = {}
    if getattr(model, "can_explore", False) and tuned.exploration is not None:
        chosen = choose_exploration(tuned.exploration, ks, explore_tolerance)
        min_history = model.history_threshold(chosen["share"])  # type: ignore[attr-defined]
        model.set_exploration(chosen["slots"], max(ks), min_history)  # type: ignore[attr-defined]
        exploration = {"chosen_slots": chosen["slots"], "chosen_share": chosen["share"],
                       "min_history": min_history, "validation": tuned.exploration,
                       "tolerance": explore_tolerance}
    scores, (labels, pair_scores) = stage_scores(model, test)
    if exploration:
        exploration["test"] = exploration_curve(model, test, ks, seed)
    scored_at = time.perf_counter()
    priority = metrics.tiebreak_priority(len(test.item_ids), seed)
    result = metrics.ranking_metrics(scores, test.relevant, test.exclude, ks, priority)
    _, cold_recall, _ = _cold_recall(result, test, max(ks))
    short = test.history < short_history
    report = {
        "params": tuned.params,
        **({"settings_from": settings_from} if settings_from else {}),
        "validation": {f"ndcg@{min(ks)}": tuned.score},
        "tuning": tuned.trials,
        "test": _summary(result),
        "coverage": {f"coverage@{k}": result.coverage(k) for k in ks},
        "binary": metrics.binary_metrics(labels, pair_scores, tuned.threshold),
        "slices": {
            "cold_items": {f"recall@{max(ks)}": metrics.mean_se(cold_recall)},
            "short_history": _summary(result.subset(short)) if short.any() else {},
        },
        "fallback_users": int(model.fallback_mask(test.users).sum()),
        "per_user_ndcg": {f"ndcg@{k}": result.per_user[f"ndcg@{k}"].tolist() for k in ks},
        "test_users": test.users.tolist(),
        **({"exploration": exploration} if exploration else {}),
        **({"training": curves} if (curves := training_curves(model)) else {}),
        "seconds": {
            "tuning": tuned_at - started,
            "fit": fitted_at - tuned_at,
            "score": scored_at - fitted_at,
            "total": time.perf_counter() - started,
        },
    }
    return ModelRun(spec.name, spec.baseline, tuned.score, result, report)



def training_curves(model: Recommender) -> dict[str, list[float]]:
    """Per-epoch curves of a learned model (empty for models without training epochs)."""
    history = getattr(model, "history", None)
    names = ("train_loss", "val_loss", "heldout_ndcg")
    return {n: list(getattr(history, n)) for n in names if getattr(history, n, None)}


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def split_facts(split: Split, validation: StageData, test: StageData) -> dict[str, Any]:
    """Dates and counts that describe a split."""
    all_ratings = pl.concat([split.train, split.validation, split.test])
    starts = split.cutoffs.filter(pl.col("user_id").is_in(test.users.tolist()))
    dates = {
        "first_rating": _iso(all_ratings["event_timestamp"].min()),
        "last_rating": _iso(all_ratings["event_timestamp"].max()),
    }
    for column in ("validation_start", "test_start"):
        values = starts[column].drop_nulls().sort()
        if values.len():
            dates[column] = {
                "min": _iso(values.min()),
                "median": _iso(values[values.len() // 2]),
                "max": _iso(values.max()),
            }
    cold = test.relevant & ~test.exclude & (test.fit_counts == 0)[None, :]
    counts = {
        "users": all_ratings["user_id"].n_unique(),
        "items": int(test.item_ids.size),
        "train_ratings": split.train.height,
        "validation_ratings": split.validation.height,
        "test_ratings": split.test.height,
        "validation_users": int(validation.users.size),
        "test_users": int(test.users.size),
        "test_positives": int(test.relevant.sum()),
        "cold_item_test_positives": int(cold.sum()),
        "cold_item_test_users": int(cold.any(axis=1).sum()),
        "catalogue_items_without_fit_interactions": int((test.fit_counts == 0).sum()),
    }
    return {"dates": dates, "counts": counts}


def evaluate(
    models: Sequence[ModelSpec | Recommender],
    split: Split,
    items: pl.DataFrame,
    k: Sequence[int] = (10, 20),
    seed: int = 0,
    short_history: int = SHORT_HISTORY,
    on_model: Callable[[str, dict[str, Any]], None] | None = None,
    explore_tolerance: float = EXPLORE_TOLERANCE,
) -> dict[str, Any]:
    """Tune, fit and evaluate every model on ``split``; the report as a JSON-ready dict.

    ``on_model(split kind, reports so far)`` runs after each model, so a caller can write
    results as they come (a late failure loses nothing).
    """
    started = time.perf_counter()
    ks = sorted(set(k))
    specs = [m if isinstance(m, ModelSpec) else _fixed(m) for m in models]
    item_ids = catalogue(items)
    validation = stage_data(split.stage("validation"), item_ids)
    test = stage_data(split.stage("test"), item_ids)
    if validation.users.size == 0 or test.users.size == 0:
        raise ValueError(
            f"{split.kind} split: {validation.users.size} validation and {test.users.size} test "
            "users with a positive to find; nothing to tune or evaluate"
        )
    runs = []
    for spec in specs:
        print(f"    {split.kind}: {spec.name}", flush=True)
        runs.append(run_model(spec, validation, test, items, ks, seed, short_history,
                              explore_tolerance))
        if on_model is not None:
            on_model(split.kind, {run.name: run.report for run in runs})
    report = {
        "split": split.kind,
        "params": split.params,
        **split_facts(split, validation, test),
        "selection_metric": f"ndcg@{min(ks)}",
        "models": {run.name: run.report for run in runs},
    }
    report.update(_comparisons(runs, validation, test, ks, short_history))
    report["seconds"] = time.perf_counter() - started
    return report


def _fixed(model: Recommender) -> ModelSpec:
    """A ready-made model instance, refitted per stage without tuning."""
    return ModelSpec(model.name, lambda _params, _seed: model, [{}], baseline=False)


def _comparisons(
    runs: list[ModelRun], validation: StageData, test: StageData, ks: list[int],
    short_history: int,
) -> dict[str, Any]:
    baseline_runs = [r for r in runs if r.baseline and r.name != "random"] or runs
    best = max(baseline_runs, key=lambda r: r.validation_score)
    names = [f"{m}@{k}" for m in PAIRED_METRICS if m != "mrr" for k in ks] + ["mrr"]
    paired = {
        run.name: {
            name: metrics.paired_test(run.result.per_user[name], best.result.per_user[name])
            for name in names
        }
        for run in runs
        if run is not best
    }
    cold_rows, _, expected = _cold_recall(best.result, test, max(ks))
    return {
        "best_baseline": best.name,
        "paired_tests": paired,
        "slices": {
            "cold_items": {
                "users": int(cold_rows.size),
                f"random_expected_recall@{max(ks)}": metrics.mean_se(expected)["mean"],
            },
            "short_history": {
                "max_fit_ratings": short_history - 1,
                "users": int((test.history < short_history).sum()),
            },
        },
    }


BASELINE_FACTORIES: dict[str, Callable[..., Recommender]] = {
    "random": baselines.RandomRecommender,
    "popularity": baselines.Popularity,
    "itemknn": baselines.ItemKNN,
    "bpr": baselines.BPR,
    "als": baselines.ALS,
    "ease": baselines.EASE,
    "recent-popularity": baselines.RecentPopularity,
}


def model_specs(
    names: Sequence[str],
    quick: bool = False,
    positive_threshold: float = 4.0,
    encodings: Path | None = None,
    offline: Path | None = None,
) -> list[ModelSpec]:
    """The specs by name; ``text-knn`` / ``image-knn`` read ``encodings``. The specs of one
    call share a run's state: the generator fits, the stage fusions and the baselines' tuned
    settings (run the generators first: :func:`with_generators`)."""
    grids = baselines.QUICK_GRIDS if quick else baselines.GRIDS
    columns = {"text-knn": "text_embedding", "image-knn": "image_embedding"}
    cache = GeneratorCache()  # the hybrids' generator fits, shared by all of them
    tuned: dict[str, dict[str, Any]] = {}
    fused: dict[Path, FusedVectors] = {}
    specs = []
    for name in names:
        if name in BASELINE_FACTORIES:
            factory = BASELINE_FACTORIES[name]
            specs.append(ModelSpec(name, _builder(factory), grids[name], tuned=tuned))
        elif name in HYBRID_MODELS or name in SEQUENTIAL_MODELS:
            grid = HYBRID_GRID if name in HYBRID_MODELS and not quick else [{}]
            build = _content_model_builder(name, encodings, quick, cache, tuned, fused)
            source = CHOSEN_HYBRID if name in HYBRID_MODELS and name != CHOSEN_HYBRID else None
            specs.append(ModelSpec(name, build, grid, baseline=False, tuned=tuned,
                                   settings_from=source))
        elif name in DEEP_MODELS:
            specs.append(ModelSpec(name, _deep_builder(name, encodings, quick, fused),
                                   baseline=False))
        elif name == SERVED:
            specs.append(ModelSpec(name, _served_builder(encodings, quick, offline, cache,
                                                         tuned, fused),
                                   [{}] if quick else HYBRID_GRID, baseline=False, tuned=tuned,
                                   settings_from=CHOSEN_HYBRID))
        elif name in columns:
            if encodings is None or not encodings.exists():
                raise FileNotFoundError(f"{name} needs item encodings; not found at {encodings}")
            vectors = baselines.read_item_vectors(encodings, columns[name])
            specs.append(ModelSpec(name, _content_builder(vectors, positive_threshold)))
        else:
            known = [*BASELINE_FACTORIES, *columns, *HYBRID_MODELS, *SEQUENTIAL_MODELS,
                     *DEEP_MODELS, SERVED]
            raise ValueError(f"unknown model {name!r}; known: {known}")
    return specs


def _builder(factory: Callable[..., Recommender]) -> Callable[[dict[str, Any], int], Recommender]:
    return lambda params, seed: factory(seed=seed, **params)


def _content_builder(
    vectors: pl.DataFrame, threshold: float
) -> Callable[[dict[str, Any], int], Recommender]:
    return lambda params, seed: baselines.ContentKNN(vectors, threshold, seed=seed, **params)


ALL_MODELS = (
    "random", "popularity", "recent-popularity", "itemknn", "bpr", "als", "ease", "text-knn",
    "image-knn",
)
DEEP_MODELS = ("deep-mixed", "deep-asum", "deep-text", "deep-image", "two-tower")
HYBRID_MODELS = ("hybrid-mixed", "hybrid-asum", "hybrid-text", "hybrid-image", "hybrid-id")
SEQUENTIAL_MODELS = ("sequential-mixed", "sequential-id")
# The hybrid's candidate generators: tuned baselines (run first when not asked for).
HYBRID_GENERATORS = ("ease", "als", "itemknn")
SERVED = "served"  # the served pipeline (ranker.served), as `avrec train` ships it
CHOSEN_HYBRID = "hybrid-mixed"  # what `served` serves; the other hybrids are its ablations
QUICK_HYBRID = {"bag": 2, "inner_folds": 1}  # --quick: one label fold, two scorers
HYBRID_GRID = [{"inner_folds": 2}, {"inner_folds": 3},
               {"inner_folds": 3, "hidden": 128, "lr": 1e-3}]


def with_generators(names: Sequence[str]) -> list[str]:
    """``names`` with the hybrid's generator baselines added in front when a hybrid is asked
    for (their validation-tuned settings feed the hybrid), and ``hybrid-mixed`` moved before
    the models that keep its settings (its ablations and ``served``), with ``served`` right
    after it: it wraps the very same fits, which the run's cache still holds then)."""
    if not any(n in (*HYBRID_MODELS, SERVED) for n in names):
        return list(names)
    names = [g for g in HYBRID_GENERATORS if g not in names] + list(names)
    if CHOSEN_HYBRID in names:
        first = min(i for i, n in enumerate(names) if n in (*HYBRID_MODELS, SERVED))
        chosen = [n for n in (CHOSEN_HYBRID, SERVED) if n in names]
        names = [n for n in names if n not in chosen]
        names[first:first] = chosen
    return names


def _vector_source(kind: str, frame: pl.DataFrame, fused: FusedVectors) -> Any:
    """Item vectors of ``kind``: raw text / image encodings, or a fusion fitted per stage."""
    from ranker.features import ItemVectors

    column = {"text": "text_embedding", "image": "image_embedding"}.get(kind)
    if column:
        return ItemVectors.from_frame(frame, column, kind)
    return functools.partial(fused, kind)


def _content_model_builder(
    name: str, encodings: Path | None, quick: bool, cache: GeneratorCache | None = None,
    tuned: dict[str, dict[str, Any]] | None = None,
    fused: dict[Path, FusedVectors] | None = None,
) -> Callable[[dict[str, Any], int], Recommender]:
    """``hybrid-*`` and ``sequential-*`` over one item representation (``id``: none)."""
    from ranker.hybrid import ContentGenerator, HybridConfig, HybridRecommender
    from ranker.sequential import SequentialConfig, SequentialRecommender

    kind = name.split("-", 1)[1]
    tuned = {} if tuned is None else tuned
    fused = {} if fused is None else fused
    vectors = None
    if kind != "id":
        if encodings is None or not encodings.exists():
            raise FileNotFoundError(f"{name} needs item encodings; not found at {encodings}")
        frame = pl.read_parquet(encodings)
        vectors = _vector_source(kind, frame, fused.setdefault(encodings, FusedVectors(frame)))

    def build(params: dict[str, Any], seed: int) -> Recommender:
        if name in SEQUENTIAL_MODELS:
            cfg = SequentialConfig(seed=seed, epochs=3 if quick else 60, **params)
            return SequentialRecommender(cfg, vectors, seed, name)
        generators: dict[str, Callable[[], Recommender]] = {}
        for generator in HYBRID_GENERATORS:
            settings = tuned.get(generator)
            if settings is None:
                raise RuntimeError(f"{name}: generator {generator} has not been tuned yet")
            factory = BASELINE_FACTORIES[generator]
            generators[generator] = functools.partial(factory, seed=seed, **settings)
        if vectors is not None:
            generators["content"] = functools.partial(ContentGenerator, vectors)
        cfg = HybridConfig(seed=seed, **(QUICK_HYBRID if quick else {}), **params)
        return HybridRecommender(generators, vectors, cfg, seed, name, cache)

    return build


def _served_builder(
    encodings: Path | None, quick: bool, offline: Path | None,
    cache: GeneratorCache | None = None, tuned: dict[str, dict[str, Any]] | None = None,
    fused: dict[Path, FusedVectors] | None = None,
) -> Callable[[dict[str, Any], int], Recommender]:
    """The served pipeline: ``hybrid-mixed`` with ``avrec train``'s configuration, asked
    through the server's code path with features read from the offline tables."""
    from ranker.served import ServedRecommender

    hybrid = _content_model_builder("hybrid-mixed", encodings, quick, cache, tuned, fused)
    item_table = tables.read_table(ITEM_BEHAVIOUR, offline)

    def build(params: dict[str, Any], seed: int) -> Recommender:
        return ServedRecommender(hybrid(params, seed), item_table, seed)

    return build


class FusedVectors:
    """The fusion trained on a stage's fit interactions, trained once per stage and kind.

    ``deep-mixed``, ``deep-asum``, ``two-tower`` and the hybrids' inner folds fit on the same
    interactions: each fusion is trained once and reused. ``mixed`` alone trains only the
    gated fusion (:func:`encoders.fusion_training.fit_gated_fusion`, the same weights);
    ``asum`` runs the whole :func:`~encoders.fusion_training.train_fusion` (its ``a`` is
    chosen on validation pairs).
    """

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame
        self.fitted: dict[tuple[int, Any], dict[str, Any]] = {}

    def __call__(self, kind: str, interactions: pl.DataFrame, items: pl.DataFrame) -> Any:
        """Item vectors of ``kind`` (``mixed``: gated fusion, ``asum``: weighted sum)."""
        from datetime import timedelta

        from encoders import fusion_training as ft
        from encoders.fusion_fit import ItemFeatures, embed
        from ranker.features import ItemVectors

        if "event_type" not in interactions.columns:  # the harness passes rating events only
            interactions = interactions.with_columns(pl.lit("rating").alias("event_type"))
        last = interactions["event_timestamp"].max()
        keys = interactions.select("user_id", "item_id", "event_timestamp")
        key = (interactions.height, last, int(keys.hash_rows(seed=7).sum()))
        fitted = self.fitted.setdefault(key, {})
        if kind not in fitted:
            features = ItemFeatures.from_encodings(self.frame)
            cutoff = last + timedelta(microseconds=1)
            model = (ft.fit_gated_fusion(interactions, features, cutoff) if kind == "mixed"
                     else ft.train_fusion(interactions, features, items, cutoff,
                                          ablations=False).asum)
            fitted[kind] = ItemVectors(features.item_ids, embed(model, features), kind)
        return fitted[kind]


# The deep ranker's training, chosen on the per-user split's validation NDCG@10 (README), is
# TrainConfig's defaults; the harness only trains fewer epochs on larger batches.
DEEP_NEGATIVES = TrainConfig.negatives
DEEP_SAMPLING = TrainConfig.sampling
DEEP_TRAIN: dict[str, Any] = {}  # overrides of TrainConfig's defaults: none


def _deep_builder(
    name: str, encodings: Path | None, quick: bool,
    fused_by_path: dict[Path, FusedVectors] | None = None,
) -> Callable[[dict[str, Any], int], Recommender]:
    """The deep ranker (or the two-tower) over one item representation.

    ``deep-mixed`` / ``deep-asum`` / ``two-tower`` use the fusion trained on each stage's fit
    interactions (never on validation or test behaviour); ``deep-text`` / ``deep-image`` use
    the raw encodings.
    """
    from avrec import behaviour_features
    from avrec.feature_store import get_store
    from ranker.deep_ranker import DeepRanker
    from ranker.features import ItemVectors
    from ranker.training import TrainConfig
    from ranker.two_tower import TwoTowerConfig

    if encodings is None or not encodings.exists():
        raise FileNotFoundError(f"{name} needs item encodings; not found at {encodings}")
    frame = pl.read_parquet(encodings)
    fused = ({} if fused_by_path is None else fused_by_path).setdefault(
        encodings, FusedVectors(frame))
    kind = "mixed" if name == "two-tower" else name.removeprefix("deep-")

    def build(params: dict[str, Any], seed: int) -> Recommender:
        items = tables.read_table("items")
        genres = len(behaviour_features.genre_vocabulary(items))
        column = {"text": "text_embedding", "image": "image_embedding"}.get(kind)
        if column:
            vectors: Any = ItemVectors.from_frame(frame, column, kind)
        else:
            vectors = functools.partial(fused, kind)
        if name == "two-tower":
            return _FittedVectorsTwoTower(vectors, get_store(), genres, TwoTowerConfig(
                epochs=2 if quick else 12, seed=seed, **params), seed, name)
        epochs = 2 if quick else 6
        cfg = TrainConfig(epochs=epochs, batch_size=2048, seed=seed, progress=False,
                          **{**DEEP_TRAIN, **params})
        return DeepRanker(vectors, get_store(), genres, DEEP_NEGATIVES, cfg, seed, name,
                          sampling=DEEP_SAMPLING)

    return build


class _FittedVectorsTwoTower(Recommender):
    """A two-tower whose item vectors may be fitted on the stage's interactions first."""

    def __init__(self, vectors: Any, store: Any, genres: int, config: Any, seed: int,
                 name: str) -> None:
        super().__init__(seed)
        self.vectors, self.store, self.genres, self.config = vectors, store, genres, config
        self.name = name
        self.inner: Recommender | None = None

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        from ranker.features import ItemVectors
        from ranker.two_tower import TwoTowerRecommender

        vectors = self.vectors
        if not isinstance(vectors, ItemVectors):
            vectors = vectors(interactions, items)
        self.inner = TwoTowerRecommender(vectors, self.store, self.genres, self.config,
                                         self.seed, self.name).fit(interactions, items)

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.inner is not None
        return self.inner._score(user_ids, as_of)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """``avrec evaluate`` and its options (``subparsers``: :mod:`avrec.commands`)."""
    parser = subparsers.add_parser(
        "evaluate", description="Offline evaluation of recommenders on temporal splits."
    )
    parser.add_argument("--out", type=Path, help="report directory (default: DATA/evaluation)")
    parser.add_argument("--split", choices=["per-user", "global", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20], help="cut-offs")
    parser.add_argument("--positive-threshold", type=float, default=4.0)
    parser.add_argument(
        "--models", default=None,
        help="comma-separated subset of "
        f"{','.join(ALL_MODELS + HYBRID_MODELS + SEQUENTIAL_MODELS + DEEP_MODELS)},{SERVED} "
        "(default: all; the content models only when the encodings exist)",
    )
    parser.add_argument("--offline", type=Path, help="offline tables directory")
    parser.add_argument("--encodings", type=Path, help="item encodings parquet")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--quantiles", type=float, nargs=2, default=[0.8, 0.9],
                        metavar=("T1", "T2"), help="global split cut quantiles")
    parser.add_argument("--short-history", type=int, default=SHORT_HISTORY,
                        help="slice: users with fewer fit ratings than this")
    parser.add_argument("--quick", action="store_true", help="tiny hyperparameter grids")
    parser.add_argument("--explore-tolerance", type=float, default=EXPLORE_TOLERANCE,
                        help="share of validation NDCG@max(k) the hybrid may spend on "
                        "exploration slots for new items (the operating point)")
    parser.set_defaults(func=run)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The ``avrec evaluate`` options from ``argv``."""
    from avrec import commands

    return commands.parse_args(register, argv)


def build_splits(events: pl.DataFrame, args: argparse.Namespace) -> list[Split]:
    """The splits asked for on the command line."""
    out = []
    if args.split in ("per-user", "both"):
        out.append(per_user_split(events, args.test_fraction, args.validation_fraction,
                                  args.positive_threshold))
    if args.split in ("global", "both"):
        out.append(global_split(events, *args.quantiles, args.positive_threshold))
    return out


def check_preconditions(names: Sequence[str], offline: Path) -> None:
    """Fail before any work when a requested model cannot run (FileNotFoundError: the CLI
    prints its one-line message and exits with 2)."""
    missing = [t for t in ("events", "items") if not tables.table_path(t, offline).exists()]
    if missing:
        raise FileNotFoundError(f"no {', '.join(missing)} table in {offline}; "
                                "run `avrec ingest` first")
    if SERVED in names and not tables.table_path(ITEM_BEHAVIOUR, offline).exists():
        raise FileNotFoundError(f"{SERVED} reads the item_behaviour feature table, "
                                f"which is not in {offline}; run `avrec features` first")
    if any(n in DEEP_MODELS for n in names):
        registry = config.registry_path()
        if not registry.exists():
            raise FileNotFoundError(f"{', '.join(n for n in names if n in DEEP_MODELS)}"
                                    f" read features through Feast, but there is no registry "
                                    f"at {registry}; run `avrec features && avrec apply` first")


def run(args: argparse.Namespace) -> int:
    """``avrec evaluate``: evaluate the baselines, write report.json / report.md / report.png."""
    from ranker import report as report_io

    offline = args.offline or config.offline_dir()
    encodings = args.encodings or tables.table_path("item_encodings", offline)
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        skipped = []
    else:
        has_encodings = encodings.exists()
        wanted = (*ALL_MODELS, "hybrid-mixed", SERVED)
        needs_encodings = [n for n in wanted if n.endswith(("-knn", "-mixed")) or n == SERVED]
        names = [n for n in wanted if has_encodings or n not in needs_encodings]
        skipped = [n for n in wanted if n not in names]
    names = with_generators(names)
    check_preconditions(names, offline)
    events = tables.read_table("events", offline)
    items = tables.read_table("items", offline)
    specs = model_specs(names, args.quick, args.positive_threshold, encodings, offline)
    out = args.out or config.data_dir() / "evaluation"
    report: dict[str, Any] = {
        "seed": args.seed,
        "k": sorted(set(args.k)),
        "positive_threshold": args.positive_threshold,
        "models": names,
        "skipped_models": {n: f"no item encodings at {encodings}" for n in skipped},
        "splits": {},
    }

    def partial(kind: str, models: dict[str, Any]) -> None:
        report["splits"][kind] = {"partial": True, "models": models}
        report_io.write_json(report, out)

    for split in build_splits(events, args):
        print(f"==> evaluating {len(specs)} models on the {split.kind} split", flush=True)
        report["splits"][split.kind] = evaluate(specs, split, items, args.k, args.seed,
                                                args.short_history, partial,
                                                args.explore_tolerance)
    for path in report_io.write_report(report, out):
        print(f"wrote {path}")
    print(report_io.markdown(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``avrec evaluate`` from ``argv`` (tests, ``python -m ranker.evaluation``)."""
    from avrec import commands

    return commands.main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
