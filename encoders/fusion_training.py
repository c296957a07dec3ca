"""Train both fusions for one cutoff: choose ``a`` on validation, refit, score held-out pairs.

The pre-cutoff co-consumption pairs (:mod:`avrec.encoders.co_consumption`) are split in time: the
last ``val_fraction`` of them is a validation slice on which the weighted sum's ``a`` is
chosen. Both fusions (:mod:`avrec.encoders.fusion_fit`) are then refit on every pre-cutoff pair
and scored on the pairs after the cutoff (:mod:`avrec.encoders.fusion_evaluation`).
:func:`fit_gated_fusion` is the gated fit alone, for consumers of the mixed vectors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from avrec.encoders.co_consumption import PairConfig, between, pair_rows, pairs_before
from avrec.encoders.fusion import ItemFusionModel
from avrec.encoders.fusion_evaluation import (
    IMAGE_RAW,
    TEXT_RAW,
    MethodMetrics,
    evaluate,
    pair_popularity,
    recall_at_k,
    unit,
)
from avrec.encoders.fusion_fit import ItemFeatures, TrainConfig, embed, fit

log = logging.getLogger(__name__)

A_GRID = (0.3, 0.5, 0.7)
DEFAULT_TRAIN = TrainConfig()
DEFAULT_PAIRS = PairConfig()


@dataclass
class FusionRun:
    """Both trained fusions (fit on every pre-cutoff pair) and how they were chosen and scored."""

    gated: ItemFusionModel
    asum: ItemFusionModel
    a: float
    cutoff: datetime
    train_start: datetime | None
    validation_start: datetime | None
    pair_counts: dict[str, int]
    validation: list[MethodMetrics]
    a_grid_validation: dict[float, dict[int, float]]
    test: list[MethodMetrics]
    losses: dict[str, list[float]]
    config: TrainConfig
    pair_config: PairConfig
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def report_rows(self) -> list[MethodMetrics]:
        """Held-out (post-cutoff) metrics when there are any, else validation metrics."""
        return self.test or self.validation

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (metrics, choice of ``a``, windows, settings)."""
        return {
            "a": self.a,
            "cutoff": self.cutoff.isoformat(),
            "train_start": self.train_start.isoformat() if self.train_start else None,
            "validation_start": self.validation_start.isoformat()
            if self.validation_start
            else None,
            "pair_counts": self.pair_counts,
            "a_grid_validation": {
                str(a): {str(k): v for k, v in r.items()} for a, r in self.a_grid_validation.items()
            },
            "validation": [m.to_json() for m in self.validation],
            "test": [m.to_json() for m in self.test],
            "losses": self.losses,
            "train_config": asdict(self.config),
            "pair_config": {
                "min_rating": self.pair_config.min_rating,
                "max_gap_seconds": self.pair_config.max_gap.total_seconds(),
            },
            "seconds": self.seconds,
            "notes": self.notes,
        }


def fit_gated_fusion(
    events: pl.DataFrame,
    features: ItemFeatures,
    cutoff: datetime,
    *,
    config: TrainConfig = DEFAULT_TRAIN,
    pair_config: PairConfig = DEFAULT_PAIRS,
) -> ItemFusionModel:
    """The gated fusion fitted on every pre-cutoff pair, alone: bit for bit the ``gated``
    model :func:`train_fusion` returns, without choosing ``a``, fitting the weighted sum or
    scoring anything (what a consumer of the mixed vectors needs: one fit instead of six)."""
    _, before = pairs_before(events, cutoff, pair_config)
    return fit("gated", features, pair_rows(before, features), config)[0]


def split_in_time(
    before: pl.DataFrame, features: ItemFeatures, val_fraction: float
) -> tuple[datetime, np.ndarray, np.ndarray]:
    """Pre-cutoff pairs split at the ``1 - val_fraction`` quantile of their second event:
    (that instant, the earlier pairs' rows, the later pairs' rows)."""
    validation_start = before["second_at"].quantile(1.0 - val_fraction, "lower")
    return (validation_start, pair_rows(between(before, end=validation_start), features),
            pair_rows(between(before, start=validation_start), features))


def choose_a(
    features: ItemFeatures, train_part: np.ndarray, val_part: np.ndarray,
    a_grid: Sequence[float], config: TrainConfig,
) -> tuple[float, dict[float, dict[int, float]], dict[str, np.ndarray]]:
    """The weighted sum's ``a``: each grid value fitted on ``train_part`` and scored by
    Recall@50 on ``val_part`` (ties to the value nearest 0.5); with every value's recalls and
    validation vectors."""
    grid: dict[float, dict[int, float]] = {}
    val_vectors: dict[str, np.ndarray] = {}
    for a in a_grid:
        model, _ = fit("asum", features, train_part, config, a)
        vectors = embed(model, features)
        grid[float(a)] = recall_at_k(unit(vectors), val_part)
        val_vectors[f"a-sum (a={a})"] = vectors
    best_a = max(grid, key=lambda a: (np.nan_to_num(grid[a][50], nan=-1.0), -abs(a - 0.5)))
    return best_a, grid, val_vectors


def fit_asum_fusion(
    events: pl.DataFrame,
    features: ItemFeatures,
    cutoff: datetime,
    *,
    a_grid: Sequence[float] = A_GRID,
    config: TrainConfig = DEFAULT_TRAIN,
    pair_config: PairConfig = DEFAULT_PAIRS,
    val_fraction: float = 0.1,
) -> ItemFusionModel:
    """The weighted-sum fusion alone, ``a`` chosen on validation pairs: bit for bit the
    ``asum`` model :func:`train_fusion` returns, without the gated fits or any scoring beyond
    the choice of ``a``."""
    _, before = pairs_before(events, cutoff, pair_config)
    _, train_part, val_part = split_in_time(before, features, val_fraction)
    best_a, _, _ = choose_a(features, train_part, val_part, a_grid, config)
    return fit("asum", features, pair_rows(before, features), config, best_a)[0]


def train_fusion(
    events: pl.DataFrame,
    features: ItemFeatures,
    items: pl.DataFrame,
    cutoff: datetime,
    *,
    a_grid: Sequence[float] = A_GRID,
    config: TrainConfig = DEFAULT_TRAIN,
    pair_config: PairConfig = DEFAULT_PAIRS,
    val_fraction: float = 0.1,
    ablations: bool = True,
) -> FusionRun:
    """Choose ``a`` on validation, fit both fusions on all pre-cutoff pairs, score held-out pairs.

    Validation: the pre-cutoff pairs are split in time at the ``1 - val_fraction`` quantile of
    their second event; models fit on the earlier part choose ``a`` (by Recall@50 on all
    pairs). The returned models are refit on every pre-cutoff pair and scored on pairs after
    the cutoff (``test``; empty when no events follow the cutoff). ``ablations`` adds the
    learned single-modality projections (``a = 1`` text, ``a = 0`` image) to the test rows.
    """
    started = time.perf_counter()
    genres = {
        int(i): list(g or [])
        for i, g in zip(items["item_id"].to_list(), items["genres"].to_list(), strict=True)
    }
    pairs, before = pairs_before(events, cutoff, pair_config)
    validation_start, train_part, val_part = split_in_time(before, features, val_fraction)
    fit_all = pair_rows(before, features)
    test_part = pair_rows(between(pairs, start=cutoff), features)
    counts = {
        "train": len(train_part),
        "validation": len(val_part),
        "fit": len(fit_all),
        "test": len(test_part),
    }
    log.info("co-consumption pairs: %s", counts)
    raw = {TEXT_RAW: features.text, IMAGE_RAW: features.image}
    notes: list[str] = []

    best_a, grid, val_vectors = choose_a(features, train_part, val_part, a_grid, config)
    gated_val, _ = fit("gated", features, train_part, config)
    val_vectors["gated"] = embed(gated_val, features)
    validation = evaluate(
        {**raw, **val_vectors},
        features,
        val_part,
        genres,
        pair_popularity(train_part, len(features)),
        image_only={IMAGE_RAW},
    )

    asum, asum_losses = fit("asum", features, fit_all, config, best_a)
    gated, gated_losses = fit("gated", features, fit_all, config)
    test: list[MethodMetrics] = []
    if len(test_part):
        methods = {
            **raw,
            f"a-sum (a={best_a})": embed(asum, features),
            "gated": embed(gated, features),
        }
        if ablations:
            for name, a in (("text-proj (a-sum a=1)", 1.0), ("image-proj (a-sum a=0)", 0.0)):
                methods[name] = embed(fit("asum", features, fit_all, config, a)[0], features)
        test = evaluate(
            methods,
            features,
            test_part,
            genres,
            pair_popularity(fit_all, len(features)),
            image_only={IMAGE_RAW},
        )
    else:
        notes.append("no co-consumption pairs after the cutoff: metrics are validation metrics")
    return FusionRun(
        gated=gated,
        asum=asum,
        a=best_a,
        cutoff=cutoff,
        train_start=before["first_at"].min(),
        validation_start=validation_start,
        pair_counts=counts,
        validation=validation,
        a_grid_validation=grid,
        test=test,
        losses={"asum": asum_losses, "gated": gated_losses},
        config=config,
        pair_config=pair_config,
        seconds=time.perf_counter() - started,
        notes=notes,
    )
