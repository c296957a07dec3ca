"""The offline evaluation harness (``avrec evaluate``): tune on validation, test once.

For each model: every hyperparameter setting is fitted on the training part and scored on
the validation users (selection metric: NDCG at the smallest K); the F1 threshold of the
binary metrics is chosen on the validation pairs of that best setting; the best setting is
refitted on training + validation and evaluated once on the test users. Ranking is over the
whole catalogue minus each user's already-seen items. Per-user values give standard errors
and paired tests against the best baseline (chosen on validation, not on test).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from avrec.ranker import metrics
from avrec.ranker.exploration import EXPLORE_TOLERANCE, choose_exploration, exploration_curve
from avrec.ranker.recommender import Recommender, catalogue
from avrec.ranker.splits import Split
from avrec.ranker.stage_data import StageData, cold_item_recall, stage_data, stage_scores

if TYPE_CHECKING:
    from avrec.ranker.second_process import SecondProcess

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



def _summary(result: metrics.RankingResult) -> dict[str, dict[str, float]]:
    return {name: metrics.mean_se(values) for name, values in result.per_user.items()}



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
    _, cold_recall, _ = cold_item_recall(result, test, max(ks))
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
    second: SecondProcess | None = None,
) -> dict[str, Any]:
    """Tune, fit and evaluate every model on ``split``; the report as a JSON-ready dict.

    ``on_model(split kind, reports so far)`` runs after each model, so a caller can write
    results as they come (a late failure loses nothing). ``second``: more models, evaluated
    in a second process meanwhile (their reports follow ``models``' in the report); the
    models of ``models`` it shares are run by whichever process is free first, once the
    settings they keep are known.
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
    runs: list[ModelRun] = []
    order = [spec.name for spec in specs] + list(second.names if second else ())

    def arrived(new: list[ModelRun]) -> None:
        runs.extend(new)
        runs.sort(key=lambda run: order.index(run.name))
        if on_model is not None and new:
            on_model(split.kind, {run.name: run.report for run in runs})

    try:
        if second is not None:
            from avrec.ranker.second_process import HarnessArgs

            second.start(split, items, HarnessArgs(tuple(ks), seed, short_history,
                                                   explore_tolerance))
        shared = [spec for spec in specs if second is not None and spec.name in second.shared]

        def run(spec: ModelSpec) -> None:
            print(f"    {split.kind}: {spec.name}", flush=True)
            arrived([run_model(spec, validation, test, items, ks, seed, short_history,
                               explore_tolerance)])
            if second is not None:
                arrived(second.finished())
                if _settings_known(shared, {run.name for run in runs}):
                    second.share()

        for spec in specs:
            if spec not in shared:
                run(spec)
        if second is not None:
            second.share()
            by_name = {spec.name: spec for spec in shared}
            while (name := second.claim()) is not None:
                run(by_name[name])
            arrived(second.wait())
    finally:
        if second is not None:
            second.close()
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


def _settings_known(specs: Sequence[ModelSpec], done: set[str]) -> bool:
    """Whether the models whose settings ``specs`` keep are ``done`` on this split."""
    return all(s.settings_from is None or s.settings_from in done for s in specs)


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
    cold_rows, _, expected = cold_item_recall(best.result, test, max(ks))
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
