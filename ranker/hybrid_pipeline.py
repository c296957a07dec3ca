"""The hybrid ranker as it is served: history scorers, pool, features, an ONNX scorer.

:class:`HybridPipeline` is what ``Recommend`` runs and what ``avrec evaluate --models served``
runs offline: given users' histories and the ``item_behaviour`` fields as of their cut, it
scores every generator from the history (:mod:`avrec.ranker.history_scorers`), fuses the candidate
pool, builds the features (:mod:`avrec.ranker.hybrid_features`) and scores the pool. The training
code (:class:`avrec.ranker.hybrid.HybridRecommender`) builds its features through the same object,
with the torch scorer in place of the ONNX one. No torch is imported here.

A saved pipeline is a directory::

    hybrid/
      pipeline.json        # PipelineConfig (generators, feature names, pool, slots, ...)
      scorers/<name>.npz   # one fitted history scorer per generator
      known_items.npy      # the items the generators were fitted on (all others are new)
      scorer.onnx          # [users, pool, features] -> [users, pool]

:meth:`HybridPipeline.load` binds it to the served catalogue (item ids, their vectors and the
catalogue table), so items added after training are scored by content alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import polars as pl

from avrec.errors import ModelError
from avrec.names import ITEM_BEHAVIOUR
from avrec.ranker.candidate_pool import (
    ItemStats,
    candidate_pool,
    new_item_neighbour_ranks,
    new_item_ranks,
    ranks,
)
from avrec.ranker.features import lookup_rows
from avrec.ranker.history_scorers import History, HistoryScorer, load_scorer, save_scorer
from avrec.ranker.hybrid_features import (
    CONTENT,
    ITEM_STATS,
    RECENT,
    CandidateFeatures,
    CatalogueFacts,
    ScoredPool,
    UnseenCatalogue,
    UserContext,
    with_exploration_slots,
)
from avrec.ranker.user_score_cache import GeneratorOutputs, UserScoreCache

CONFIG_FILE = "pipeline.json"
SCORER_FILE = "scorer.onnx"
KNOWN_FILE = "known_items.npy"
SCORER_KIND = "avrec-hybrid-scorer"
PoolScorer = Callable[[np.ndarray], np.ndarray]  # [users, pool, features] -> [users, pool]


ITEM_PREFIX = f"{ITEM_BEHAVIOUR}__"
AGE_COLUMN = "item_age_days"


def item_stats(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """:data:`~avrec.ranker.hybrid_features.ITEM_STATS` from item rows laid out as training sets and
    the server's item snapshot lay them out (``item_behaviour__*`` and ``item_age_days``);
    an item without a row has 0 counts and no rating or age (NaN)."""
    out = {}
    for name in ITEM_STATS:
        column = AGE_COLUMN if name == AGE_COLUMN else f"{ITEM_PREFIX}{name}"
        values = frame[column].cast(pl.Float64).to_numpy().astype(np.float64)
        out[name] = values if name in ("mean_rating", AGE_COLUMN) else np.nan_to_num(values)
    return out


class PipelineError(ModelError):
    """A saved pipeline that cannot be served (missing files, mismatched features)."""


@dataclass
class PipelineConfig:
    """Everything about the pipeline that is not an array."""

    generators: list[str]  # feature order; CONTENT, when present, fills the cold slots
    queries: list[str]  # generators also queried with the user's newest positives
    candidates: int = 200
    cold_slots: int = 20
    positive_threshold: float = 4.0
    content: bool = True  # content similarity features (item vectors)
    catalogue_facts: bool = True  # genre match and year offset
    trending_new_items: bool = False  # cold slots by content and recent popularity (else
    # by content alone, as pipelines saved before this option)
    explore: int = 0  # exploration slots: new items in the last places of the top ``depth``
    depth: int = 20
    feature_names: list[str] = field(default_factory=list)
    explore_min_history: int = 0  # the slots go to users with at least this many events (0: all)
    neighbours: int = 0  # k of the content-neighbour similarity (feature and cold slots; 0: none,
    # as pipelines saved before it)

    def slots_for(self, history_length: int) -> int:
        """Exploration slots in the answer to a user with ``history_length`` events.

        >>> PipelineConfig([], [], explore=3, explore_min_history=50).slots_for(49)
        0
        """
        return self.explore if history_length >= self.explore_min_history else 0

    @property
    def signature(self) -> str:
        """A hash of the feature names: the scorer must have been exported with it."""
        return hashlib.sha256("\n".join(self.feature_names).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ServedUser:
    """One user's inputs as the online store holds them (``user_history`` and the time of the
    newest rating; NaT or None: none)."""

    history_items: np.ndarray  # item ids, oldest first
    history_ratings: np.ndarray
    last_rated_at: np.datetime64 | None


@dataclass(frozen=True)
class Recommendation:
    """One user's answer, best first: catalogue columns, the softmax of the scores over the
    pool (the model's probability that this is the user's next liked item among the pool),
    the raw scores and whether each item had no interaction yet."""

    columns: np.ndarray
    probability: np.ndarray
    scores: np.ndarray
    cold: np.ndarray


def served_order(pool: np.ndarray, scores: np.ndarray, cold: np.ndarray, explore: int,
                 depth: int, top_k: int = 0) -> Recommendation:
    """One user's pool as served: best score first, the best ``explore`` cold items moved to
    the last places of the top ``depth``
    (:func:`~avrec.ranker.hybrid_features.with_exploration_slots`), cut to ``top_k`` (0: all);
    probabilities are the softmax of the scores over the pool."""
    order_scores = (with_exploration_slots(scores[None, :], cold[None, :], explore, depth)[0]
                    if explore else scores)
    order = np.argsort(-order_scores, kind="stable")
    if top_k:
        order = order[:top_k]
    shifted = np.exp(scores - scores.max())
    probability = shifted / shifted.sum()
    return Recommendation(pool[order], probability[order], scores[order], cold[order])


class HybridPipeline:
    """History scorers -> pool -> features -> pool scorer, over one catalogue."""

    def __init__(self, config: PipelineConfig, item_ids: np.ndarray,
                 scorers: dict[str, HistoryScorer], features: CandidateFeatures,
                 known: np.ndarray, model: PoolScorer | None = None) -> None:
        missing = [g for g in config.generators if g not in scorers]
        if missing:
            raise PipelineError(f"no history scorer for generator(s) {missing}")
        self.config, self.item_ids = config, np.asarray(item_ids, dtype=np.int64)
        self.scorers, self.features, self.model = scorers, features, model
        self.known = np.asarray(known, dtype=bool)  # per catalogue column: fitted on
        self._id_order = np.argsort(self.item_ids, kind="stable")
        self._sorted_ids = self.item_ids[self._id_order]
        # one user's generator outputs by history (a server sets it; None: computed each time)
        self.user_cache: UserScoreCache | None = None

    def generator_outputs(self, context: UserContext) -> GeneratorOutputs:
        """Every generator's scores and ranks over the catalogue, the recent-positives query
        scores, the moments of both over the unseen items and the features' per-user parts:
        what depends on the users' histories alone. For one user they come
        from :attr:`user_cache` when it holds their history (and are stored there when not)."""
        cache = self.user_cache if len(context.histories) == 1 else None
        key = None
        if cache is not None:
            history = context.histories[0]
            key = cache.key(history.columns, history.values)
            found = cache.get(key)
            if found is not None:
                return found
        cfg = self.config
        scores = [self.scorers[g].score(context.histories) for g in cfg.generators]
        recent = [History(p[-RECENT:], np.full(min(p.size, RECENT), cfg.positive_threshold))
                  for p in context.positives]
        queries = [self.scorers[g].score(recent) for g in cfg.queries]
        unseen = UnseenCatalogue(context.seen)
        outputs = GeneratorOutputs(scores, [ranks(s, context.seen) for s in scores], queries,
                                   [unseen.moments(s) for s in (*scores, *queries)],
                                   self.features.user_parts(context))
        if cache is not None and key is not None:
            cache.put(key, outputs)
        return outputs

    def pool(self, context: UserContext, item_stats: Sequence[ItemStats],
             candidates: np.ndarray | None = None) -> ScoredPool:
        """Each user's pool, its features and the catalogue's fused ranks (no scores yet).

        Cold items are those the generators were not fitted on (new to the model: only
        content can place them); ``CONTENT`` ranks fill the reserved cold slots. With
        ``candidates`` (``[users, n]`` catalogue columns) those are the pool instead.
        """
        cfg = self.config
        outputs = self.generator_outputs(context)
        scores, generator_ranks = outputs.scores, outputs.ranks
        if candidates is None:
            # the pool drawn from the catalogue: ranks as ranks() makes them (the cache keeps
            # them in 2 bytes; the caller's candidates only need them gathered)
            generator_ranks = [np.asarray(r, dtype=np.int64) for r in generator_ranks]
            cold = np.repeat(~self.known[None, :], len(context.histories), axis=0)
            content = (generator_ranks[cfg.generators.index(CONTENT)]
                       if CONTENT in cfg.generators else None)
            if cfg.trending_new_items:  # new items ranked only when the pool is chosen here
                content = new_item_ranks(content, item_stats, cold, context.seen)
            if cfg.neighbours and content is not None and self.features.vectors is not None:
                assert self.features.has_vector is not None
                content = new_item_neighbour_ranks(
                    content, self.features.vectors, self.features.has_vector,
                    context.histories, cold, context.seen, cfg.neighbours)
            pool = candidate_pool(generator_ranks, context.seen, cfg.candidates, cold, content,
                                  cfg.cold_slots)
        else:
            pool = candidates
        built = self.features.build(context, pool, scores, generator_ranks, item_stats,
                                    outputs.queries, outputs.moments, outputs.parts)
        return ScoredPool(pool, built, generator_ranks, context.seen, ~self.known[pool],
                          context.history)

    def score(self, context: UserContext, item_stats: Sequence[ItemStats],
              candidates: np.ndarray | None = None) -> ScoredPool:
        """:meth:`pool` with the scorer's output filled in."""
        if self.model is None:
            raise PipelineError("the pipeline has no pool scorer")
        scored = self.pool(context, item_stats, candidates)
        scored.scores = np.asarray(self.model(scored.features), dtype=np.float64)
        return scored

    def context(self, users: Sequence[ServedUser], now: np.datetime64) -> UserContext:
        """The features' view of users as a server reads them (history item ids outside the
        catalogue are dropped)."""
        histories = []
        for user in users:
            cols = lookup_rows(self.item_ids, self._id_order, user.history_items,
                               self._sorted_ids)
            known = cols >= 0
            ratings = np.asarray(user.history_ratings, dtype=np.float64)[known]
            histories.append(History(cols[known], ratings))
        last = np.asarray([u.last_rated_at for u in users], dtype="datetime64[us]")
        return UserContext.from_histories(histories, np.full(len(users), now), last,
                                          self.item_ids.size, self.config.positive_threshold)

    def recommend(self, user: ServedUser, item_stats: ItemStats, now: np.datetime64,
                  top_k: int, candidates: np.ndarray | None = None) -> Recommendation:
        """What ``Recommend`` (no ``candidates``) or ``Rank`` (catalogue columns) serves one
        user: the pool best first, exploration slots applied, cut to ``top_k`` (0: all)."""
        scored = self.score(self.context([user], now), [item_stats],
                            None if candidates is None else candidates[None, :])
        assert scored.scores is not None
        history = scored.history_lengths[0]
        explore = self.config.slots_for(history) if candidates is None else 0
        return served_order(scored.pool[0], scored.scores[0], scored.cold[0], explore,
                            self.config.depth, top_k)

    def save(self, directory: Path) -> None:
        """Write ``pipeline.json`` and the history scorers (the ONNX scorer is written by
        :func:`avrec.ranker.listwise_scorer.export_scorer`)."""
        (directory / "scorers").mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        np.save(directory / KNOWN_FILE, self.item_ids[self.known])
        for name, scorer in self.scorers.items():
            save_scorer(scorer, directory / "scorers" / f"{name}.npz")

    @classmethod
    def load(cls, directory: Path, item_ids: np.ndarray, vectors: np.ndarray | None,
             items: pl.DataFrame, threads: int | None = None) -> HybridPipeline:
        """:meth:`SavedPipeline.read` then :meth:`SavedPipeline.bind`."""
        return SavedPipeline.read(directory, threads).bind(item_ids, vectors, items)


@dataclass
class SavedPipeline:
    """A pipeline read from disk, not yet bound to a served catalogue."""

    directory: Path
    config: PipelineConfig
    scorers: dict[str, HistoryScorer]
    known_ids: np.ndarray
    model: PoolScorer

    @classmethod
    def read(cls, directory: Path, threads: int | None = None) -> SavedPipeline:
        """Read ``pipeline.json``, the history scorers and the ONNX scorer (checked to be
        exported for these feature names)."""
        from avrec.onnx_runtime import OnnxModel

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise PipelineError(f"{directory} holds no {CONFIG_FILE} (train with `avrec train`)")
        config = PipelineConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        scorers = {name: load_scorer(directory / "scorers" / f"{name}.npz")
                   for name in config.generators}
        onnx = OnnxModel(directory / SCORER_FILE, threads=threads)
        stamped = onnx.metadata.get("features")
        if onnx.metadata.get("kind") != SCORER_KIND or stamped != config.signature:
            raise PipelineError(f"{directory / SCORER_FILE} was not exported for these features "
                                f"(kind {onnx.metadata.get('kind')!r}, features {stamped!r})")

        def run(features: np.ndarray) -> np.ndarray:
            batch = np.ascontiguousarray(features, dtype=np.float32)
            return onnx.run({"features": batch}, ["scores"])["scores"]

        return cls(directory, config, scorers, np.load(directory / KNOWN_FILE), run)

    def bind(self, item_ids: np.ndarray, vectors: np.ndarray | None, items: pl.DataFrame
             ) -> HybridPipeline:
        """The pipeline over the served catalogue ``item_ids`` (any order; columns follow it),
        whose item vectors are ``vectors`` (rows aligned, zero rows: no vector) and whose
        catalogue table (genres, year) is ``items``."""
        config = replace(self.config)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if config.content and vectors is None:
            raise PipelineError("the pipeline was trained with item vectors; none were given")
        served = np.zeros((item_ids.size, 0)) if vectors is None else vectors
        scorers = {name: scorer.on(item_ids, served) for name, scorer in self.scorers.items()}
        facts = CatalogueFacts.from_items(items, item_ids) if config.catalogue_facts else None
        features = CandidateFeatures(config.generators, vectors if config.content else None,
                                     config.queries, facts, config.neighbours)
        if config.feature_names not in (features.names, features.legacy_names):
            raise PipelineError(f"{self.directory}: the saved feature names differ from this "
                                f"code's ({len(config.feature_names)} vs {len(features.names)})")
        known = np.isin(item_ids, self.known_ids)
        return HybridPipeline(config, item_ids, scorers, features, known, self.model)
