"""The hybrid (stacked) ranker's training: generators, point-in-time folds, a listwise MLP.

Pieces, each small:

* **generators**: recommenders that can score any history (EASE, ALS, ItemKNN, content kNN
  over the mixed embedding; see :mod:`avrec.ranker.history_scorers`), fitted on the same
  interactions;
* the numpy half (:mod:`avrec.ranker.hybrid_features`, run by
  :class:`~avrec.ranker.hybrid_pipeline.HybridPipeline`): reciprocal-rank-fusion candidate pool with
  slots reserved for new items, per-candidate point-in-time features, exploration slots;
* the pool scorer (:mod:`avrec.ranker.listwise_scorer`): an MLP scoring each candidate, trained
  with a softmax over the user's pool (cross-entropy against the user's positives,
  ListNet-style), a bag of seeds, exported to ONNX by :meth:`HybridRecommender.export`.

Point-in-time training (:meth:`HybridRecommender._fit`): the fit interactions are cut per user
into blocks from the newest end (:func:`inner_split`); for each of ``inner_folds`` blocks the
generators and the item vectors (a fusion factory is refitted too) are fitted on the events
before it, features are read at each user's block cut (item statistics from events strictly
before it), and the block's positives are the learner's labels; then the generators are
refitted on all fit interactions for scoring. No generator score used as a training feature
comes from a model that saw the label it is trained on.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from avrec.ranker.baselines import ContentKNN
from avrec.ranker.features import VectorSource, resolve_vectors
from avrec.ranker.generator_cache import GeneratorCache, fingerprint
from avrec.ranker.history_scorers import HistoryScorer
from avrec.ranker.hybrid_features import (
    CONTENT,
    CandidateFeatures,
    CatalogueFacts,
    ScoredPool,
    user_context,
)
from avrec.ranker.hybrid_pipeline import SCORER_FILE, HybridPipeline, PipelineConfig
from avrec.ranker.item_history import ItemTimeline, naive_utc
from avrec.ranker.listwise_scorer import HybridHistory, ScorerBag, export_scorer, fit_scorer
from avrec.ranker.recommender import InteractionMatrix, Recommender
from avrec.ranker.training import torch_threads

GeneratorFactory = Callable[[], Recommender]


@dataclass
class HybridConfig:
    """Pool size, inner split and the learner's optimisation."""

    candidates: int = 200
    cold_slots: int = 20  # pool slots reserved for the best cold items ...
    trending_new_items: bool = True  # ... by content and recent popularity (else content)
    neighbours: int = 5  # ... fused with content-neighbour ranks; also the sim_neighbours feature
    inner_fraction: float = 0.1
    positive_threshold: float = 4.0
    hidden: int = 64
    epochs: int = 60
    patience: int = 6
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_users: int = 32
    catalogue_features: bool = True  # genre match and year offset (with content only)
    inner_folds: int = 3  # label blocks (newest first), each with generators fitted before it
    bag: int = 5  # scorers trained on different seeds and early-stopping users, averaged
    seed: int = 0
    threads: int = 1  # one thread: deterministic reductions, and faster for models this small


def inner_split(
    interactions: pl.DataFrame, fraction: float, fold: int = 0
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(before, labels) of inner fold ``fold``, per user in time order (then item id).

    Each user's events are cut into blocks of ``round(fraction * n)`` (at least one) from the
    newest end: fold 0's labels are the newest block, fold 1's the block before, and so on;
    ``before`` is everything older than the labels. A user keeps at least one event before.
    """
    frame = interactions.sort("user_id", "event_timestamp", "item_id")
    n = pl.len().over("user_id")
    block = pl.max_horizontal((n * fraction + 0.5).floor(), pl.lit(1))
    position = pl.int_range(pl.len()).over("user_id")
    end = n - block * fold
    start = end - block
    usable = start >= 1
    label = usable & (position >= start) & (position < end)
    tagged = frame.with_columns(label.alias("_label"), (usable & (position < start)).alias("_in"))
    return (
        tagged.filter(pl.col("_in")).drop("_label", "_in"),
        tagged.filter(pl.col("_label")).drop("_label", "_in"),
    )


class ContentGenerator(Recommender):
    """Content kNN whose vectors may be fitted on the interactions first (e.g. the fusion)."""

    name = CONTENT

    def __init__(self, vectors: VectorSource) -> None:
        super().__init__()
        self.source = vectors
        self.inner: ContentKNN | None = None

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        table = resolve_vectors(self.source, interactions, items)
        frame = pl.DataFrame({"item_id": table.item_ids, "vector": table.vectors})
        self.inner = ContentKNN(frame).fit(interactions, items)

    def _known(self, user_ids: np.ndarray) -> np.ndarray:
        assert self.inner is not None
        return self.inner._known(user_ids)

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.inner is not None
        return self.inner._score(user_ids, as_of)

    def history_scorer(self) -> HistoryScorer:
        assert self.inner is not None
        return self.inner.history_scorer()


def history_threshold(interactions: pl.DataFrame, share: float) -> int:
    """The fewest events a user of ``interactions`` needs to be among the ``share`` of users
    with the longest histories (0 when ``share`` >= 1: everyone).

    >>> frame = pl.DataFrame({"user_id": [1, 2, 2, 3, 3, 3, 4, 4, 4, 4]})
    >>> history_threshold(frame, 0.5), history_threshold(frame, 1.0)
    (3, 0)
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if share >= 1 or interactions.is_empty():
        return 0
    counts = np.sort(interactions.group_by("user_id").len()["len"].to_numpy())[::-1]
    return int(counts[max(int(np.ceil(share * counts.size)) - 1, 0)])


def item_stats(timeline: ItemTimeline, cuts: np.ndarray) -> list[dict[str, np.ndarray]]:
    """The ``item_behaviour`` fields as of each cut (one dict per user)."""
    return [timeline.behaviour_at(cut) for cut in cuts]


class HybridRecommender(Recommender):
    """Generators -> pool -> point-in-time features -> listwise MLP (see the module docstring).

    Features are built by a :class:`~avrec.ranker.hybrid_pipeline.HybridPipeline` over the
    generators' history scorers, in training as in serving; :meth:`export` writes the pipeline
    with the scorer bag as ONNX. Items outside a user's pool rank below it, in reciprocal-rank
    fusion order.
    """

    name = "hybrid"

    def __init__(
        self,
        generators: dict[str, GeneratorFactory],
        vectors: VectorSource | None = None,
        config: HybridConfig | None = None,
        seed: int = 0,
        name: str | None = None,
        cache: GeneratorCache | None = None,
    ) -> None:
        super().__init__(seed)
        if not generators:
            raise ValueError("the hybrid ranker needs at least one candidate generator")
        self.factories = generators
        self.vector_source = vectors
        self.config = config or HybridConfig(seed=seed)
        self.name = name or self.name
        self.scorer: ScorerBag | None = None
        self.pipeline: HybridPipeline | None = None
        self.interactions = pl.DataFrame()
        self.history = HybridHistory()
        self.last_pool: ScoredPool | None = None
        self.cache = cache or GeneratorCache()  # share one to reuse fits across hybrids

    def _vectors(self, interactions: pl.DataFrame, items: pl.DataFrame) -> np.ndarray | None:
        if self.vector_source is None:
            return None
        table = resolve_vectors(self.vector_source, interactions, items)
        rows = table.rows(self.item_ids)
        out = np.zeros((self.item_ids.size, table.dim), dtype=np.float64)
        out[rows >= 0] = table.vectors[rows[rows >= 0]]
        return out

    def _catalogue(self, items: pl.DataFrame) -> CatalogueFacts | None:
        """Genres and years, when the model uses content (never for the ID-only ablation)."""
        if self.vector_source is None or not self.config.catalogue_features:
            return None
        return CatalogueFacts.from_items(items, self.item_ids)

    def _pipeline(self, interactions: pl.DataFrame, items: pl.DataFrame) -> HybridPipeline:
        """Generators fitted on ``interactions``, as a pipeline without a pool scorer."""
        cfg = self.config
        fitted = self.cache.fit_all(self.factories, interactions, items)
        queries = [n for n, g in fitted.items() if g.answers_queries]
        features = CandidateFeatures(list(fitted), self._vectors(interactions, items), queries,
                                     self._catalogue(items), cfg.neighbours)
        config = PipelineConfig(
            list(fitted), queries, cfg.candidates, cfg.cold_slots, cfg.positive_threshold,
            trending_new_items=cfg.trending_new_items,
            content=self.vector_source is not None, neighbours=features.neighbours,
            catalogue_facts=features.catalogue is not None, feature_names=features.names,
        )
        known = np.isin(self.item_ids, interactions["item_id"].unique().to_numpy())
        scorers = {name: g.scorer for name, g in fitted.items()}
        return HybridPipeline(config, self.item_ids, scorers, features, known)

    def _pool(self, pipeline: HybridPipeline, interactions: pl.DataFrame, users: np.ndarray,
              cuts: np.ndarray | None, item_events: pl.DataFrame | None = None) -> ScoredPool:
        """``users``' pools and features as of ``cuts``, from ``interactions`` before them;
        item statistics from ``item_events`` before each cut (default: ``interactions``)."""
        context = user_context(interactions, self.item_ids, users, cuts,
                               self.config.positive_threshold)
        events = interactions if item_events is None else item_events
        timeline = ItemTimeline.build(events, self.item_ids)
        return pipeline.pool(context, item_stats(timeline, context.cuts))

    def _fold_examples(
        self, interactions: pl.DataFrame, items: pl.DataFrame, fold: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(features, pool labels) of one inner fold: generators fitted before its labels."""
        cfg = self.config
        before, labels = inner_split(interactions, cfg.inner_fraction, fold)
        pipeline = self._pipeline(before, items)
        positive = labels.filter(pl.col("value") >= cfg.positive_threshold)
        users = np.unique(positive["user_id"].to_numpy())
        users = users[np.isin(users, before["user_id"].unique().to_numpy())]
        cuts = labels.group_by("user_id").agg(pl.col("event_timestamp").min()).join(
            pl.DataFrame({"user_id": users}), on="user_id", how="right"
        )
        cut_times = naive_utc(cuts.sort("user_id")["event_timestamp"])
        # item statistics count every event before each user's cut, as the served
        # item_behaviour rows do (other users' label events included; never the user's own
        # labels, which start at the cut): new items can be trending without being known
        scored = self._pool(pipeline, before, users, cut_times, item_events=interactions)
        target = InteractionMatrix.build(positive, self.item_ids)
        label_rows = np.asarray(target.matrix[target.rows(users)].todense()) > 0
        pool_labels = np.take_along_axis(label_rows, scored.pool, 1)
        keep = pool_labels.any(1)
        return scored.features[keep], pool_labels[keep]

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        self.scorer, self.history, pipeline = self.cache.remember(
            self._fit_key(interactions, items), lambda: self._fit_state(interactions, items))
        self.pipeline = copy.copy(pipeline)  # settings of its own (exploration slots)
        self.pipeline.config = replace(pipeline.config)
        self.pipeline.model = self._run_scorer
        self.interactions = interactions

    def _fit_state(self, interactions: pl.DataFrame, items: pl.DataFrame
                   ) -> tuple[ScorerBag, HybridHistory, HybridPipeline]:
        """The scorer bag trained on the inner folds, its training history, and the pipeline
        of generators refitted on all of ``interactions``."""
        cfg = self.config
        folds = [self._fold_examples(interactions, items, f) for f in range(cfg.inner_folds)]
        features = np.concatenate([f for f, _ in folds])
        labels = np.concatenate([y for _, y in folds])
        with torch_threads(cfg.threads):
            fitted = [
                fit_scorer(features, labels, replace(cfg, seed=cfg.seed + b))
                for b in range(cfg.bag)
            ]
        return (ScorerBag([model for model, _ in fitted]), fitted[0][1],
                self._pipeline(interactions, items))

    def _fit_key(self, interactions: pl.DataFrame, items: pl.DataFrame
                 ) -> tuple[Any, ...] | None:
        """What makes a fit: name, settings, seed, generators, item vectors and data (None
        when a generator's settings cannot be keyed: then it always fits afresh)."""
        generators = tuple((n, GeneratorCache.key_of(f)) for n, f in self.factories.items())
        if any(key is None for name, key in generators if name != CONTENT):
            return None
        source = self.vector_source
        vectors = ((id(source.func), source.args) if isinstance(source, functools.partial)
                   else id(source))
        return ("hybrid", self.name, self.seed, repr(self.config), generators, vectors,
                fingerprint(interactions), fingerprint(items.select("item_id")))

    def _run_scorer(self, features: np.ndarray) -> np.ndarray:
        assert self.scorer is not None
        with torch_threads(self.config.threads), torch.no_grad():
            return self.scorer(torch.from_numpy(features)).numpy()

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.pipeline is not None
        context = user_context(self.interactions, self.item_ids, user_ids, as_of,
                               self.config.positive_threshold)
        timeline = ItemTimeline.build(self.interactions, self.item_ids)
        scored = self.pipeline.score(context, item_stats(timeline, context.cuts))
        self.last_pool = scored
        cfg = self.pipeline.config
        return scored.catalogue_scores(cfg.explore, cfg.depth, cfg.explore_min_history)

    def set_exploration(self, slots: int, depth: int, min_history: int = 0) -> None:
        """Serve ``slots`` new items in the last places of the top ``depth`` to users with at
        least ``min_history`` events from now on."""
        if not 0 <= slots <= depth:
            raise ValueError(f"need 0 <= slots <= depth, got {slots} and {depth}")
        if self.pipeline is None:
            raise RuntimeError("set_exploration() needs a fitted model")
        cfg = self.pipeline.config
        cfg.explore, cfg.depth, cfg.explore_min_history = slots, depth, min_history

    def history_threshold(self, share: float) -> int:
        """The fewest history events a user needs to be among the ``share`` of the fitted
        users with the longest histories (0 when ``share`` is 1: everyone)."""
        return history_threshold(self.interactions, share)

    @property
    def can_explore(self) -> bool:
        """Whether new items can reach the pool at all (through a content generator)."""
        return CONTENT in self.factories

    def rescore(self, explore: int, depth: int | None = None, min_history: int = 0
                ) -> np.ndarray:
        """The last ``score`` call's users again with ``explore`` slots in the top ``depth``
        (default: the model's) for users with at least ``min_history`` events, without
        recomputing anything."""
        if self.last_pool is None or self.pipeline is None:
            raise RuntimeError("rescore() needs a score() call first")
        return self.last_pool.catalogue_scores(explore, depth or self.pipeline.config.depth,
                                               min_history)

    def export(self, directory: Path) -> Path:
        """Write the served pipeline to ``directory`` (see :mod:`avrec.ranker.hybrid_pipeline`):
        its configuration and history scorers, and the scorer bag as ONNX."""
        if self.pipeline is None or self.scorer is None:
            raise RuntimeError("export() needs a fitted model")
        directory = Path(directory)
        self.pipeline.save(directory)
        export_scorer(self.scorer, len(self.pipeline.config.feature_names),
                      self.pipeline.config.signature, directory / SCORER_FILE)
        return directory
