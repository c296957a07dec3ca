"""The models ``avrec evaluate`` knows, by name: factories, grids and builders.

A :class:`~avrec.ranker.evaluation.ModelSpec` per name: the baselines with their hyperparameter
grids, content kNN over the item encodings, the hybrids and sequential models over one item
representation, the deep ranker and two-tower, and ``served`` (the pipeline `avrec train`
ships). The specs of one :func:`model_specs` call share a run's state: the generator fits,
the stage fusions and every model's validation-chosen settings.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from avrec import tables
from avrec.names import ITEM_BEHAVIOUR
from avrec.ranker import baselines
from avrec.ranker.evaluation import ModelSpec
from avrec.ranker.generator_cache import GeneratorCache
from avrec.ranker.recommender import Recommender
from avrec.ranker.training import TrainConfig

BASELINE_FACTORIES: dict[str, Callable[..., Recommender]] = {
    "random": baselines.RandomRecommender,
    "popularity": baselines.Popularity,
    "itemknn": baselines.ItemKNN,
    "bpr": baselines.BPR,
    "als": baselines.ALS,
    "ease": baselines.EASE,
    "recent-popularity": baselines.RecentPopularity,
}


@dataclass
class RunState:
    """What the specs of one run share: every model's validation-chosen settings (the hybrids
    read their generators' there) and the hybrids' generator fits. Both pickle: a second
    process continues the run from a copy (:mod:`avrec.ranker.second_process`)."""

    tuned: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache: GeneratorCache = field(default_factory=GeneratorCache)


def model_specs(
    names: Sequence[str],
    quick: bool = False,
    positive_threshold: float = 4.0,
    encodings: Path | None = None,
    offline: Path | None = None,
    state: RunState | None = None,
) -> list[ModelSpec]:
    """The specs by name; ``text-knn`` / ``image-knn`` read ``encodings``. The specs of one
    call share a run's state (``state``, a fresh one by default): the generator fits, the
    stage fusions and the baselines' tuned settings (run the generators first:
    :func:`with_generators`)."""
    grids = baselines.QUICK_GRIDS if quick else baselines.GRIDS
    columns = {"text-knn": "text_embedding", "image-knn": "image_embedding"}
    state = RunState() if state is None else state
    cache, tuned = state.cache, state.tuned  # shared by all the specs
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
# Models that read nothing of the run's shared state and train single-threaded: `avrec
# evaluate --processes 2` runs them in a second process (avrec.ranker.second_process).
SECOND_PROCESS_MODELS = (*SEQUENTIAL_MODELS, *DEEP_MODELS)
# The hybrid's candidate generators: tuned baselines (run first when not asked for).
HYBRID_GENERATORS = ("ease", "als", "itemknn")
SERVED = "served"  # the served pipeline (avrec.ranker.served), as `avrec train` ships it
CHOSEN_HYBRID = "hybrid-mixed"  # what `served` serves; the other hybrids are its ablations
QUICK_HYBRID = {"bag": 2, "inner_folds": 1}  # --quick: one label fold, two scorers
HYBRID_GRID = [{"inner_folds": 2}, {"inner_folds": 3},
               {"inner_folds": 3, "hidden": 128, "lr": 1e-3}]


def shareable(names: Sequence[str]) -> list[str]:
    """The models of ``names`` that either of two processes may run once ``hybrid-mixed``
    has: its ablations, which keep its settings and reuse its generator fits."""
    if CHOSEN_HYBRID not in names:
        return []
    return [n for n in names if n in HYBRID_MODELS and n != CHOSEN_HYBRID]


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
    from avrec.ranker.features import ItemVectors

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
    from avrec.ranker.hybrid import ContentGenerator, HybridConfig, HybridRecommender
    from avrec.ranker.sequential import SequentialConfig, SequentialRecommender

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
    from avrec.ranker.served import ServedRecommender

    hybrid = _content_model_builder("hybrid-mixed", encodings, quick, cache, tuned, fused)
    item_table = tables.read_table(ITEM_BEHAVIOUR, offline)

    def build(params: dict[str, Any], seed: int) -> Recommender:
        return ServedRecommender(hybrid(params, seed), item_table, seed)

    return build


class FusedVectors:
    """The fusion trained on a stage's fit interactions, trained once per stage and kind.

    ``deep-mixed``, ``deep-asum``, ``two-tower`` and the hybrids' inner folds fit on the same
    interactions: each fusion is trained once and reused. ``mixed`` alone trains only the
    gated fusion (:func:`avrec.encoders.fusion_training.fit_gated_fusion`, the same weights);
    ``asum`` only the weighted sum (:func:`avrec.encoders.fusion_training.fit_asum_fusion`, its
    ``a`` chosen on validation pairs, the same weights).
    """

    def __init__(self, frame: pl.DataFrame) -> None:
        self.frame = frame
        self.fitted: dict[tuple[int, Any], dict[str, Any]] = {}

    def __call__(self, kind: str, interactions: pl.DataFrame, items: pl.DataFrame) -> Any:
        """Item vectors of ``kind`` (``mixed``: gated fusion, ``asum``: weighted sum)."""
        from datetime import timedelta

        from avrec.encoders import fusion_training as ft
        from avrec.encoders.fusion_fit import ItemFeatures, embed
        from avrec.ranker.features import ItemVectors

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
                     else ft.fit_asum_fusion(interactions, features, cutoff))
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
    from avrec.ranker.deep_ranker import DeepRanker
    from avrec.ranker.features import ItemVectors
    from avrec.ranker.training import TrainConfig
    from avrec.ranker.two_tower import TwoTowerConfig

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
        from avrec.ranker.features import ItemVectors
        from avrec.ranker.two_tower import TwoTowerRecommender

        vectors = self.vectors
        if not isinstance(vectors, ItemVectors):
            vectors = vectors(interactions, items)
        self.inner = TwoTowerRecommender(vectors, self.store, self.genres, self.config,
                                         self.seed, self.name).fit(interactions, items)

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.inner is not None
        return self.inner._score(user_ids, as_of)
