"""The hybrid ranker's numpy half: per-candidate features and exploration slots (the candidate
pool they are computed for: :mod:`avrec.ranker.candidate_pool`).

Everything here runs the same in training (:mod:`avrec.ranker.hybrid`, with torch) and in serving
(:mod:`avrec.ranker.hybrid_pipeline`, onnxruntime only), so the features a scorer is trained on
are computed by the code that computes them online:

* :class:`UserContext`: what the features know of each user as of their cut (their history as
  catalogue columns and ratings, oldest first; the last event's time);
* :class:`CandidateFeatures`: per (user, candidate) features: each generator's z-score and
  reciprocal rank, the item's ``item_behaviour`` fields as of the cut (:data:`ITEM_STATS`),
  content similarity to the user's positives, last item and nearest history items, genre
  match and year offset
  (:class:`CatalogueFacts`), the user's history length and days since their last event;
* :class:`ScoredPool` and :func:`with_exploration_slots`: scores over the catalogue, with new
  items in the last places of the top K.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from avrec.behaviour_features import HISTORY_CAP
from avrec.names import DAY_US
from avrec.ranker.candidate_pool import (
    RRF_K,
    ItemStats,
    neighbour_similarity,
    neighbour_vectors,
    unit_rows,
)
from avrec.ranker.history_scorers import History
from avrec.ranker.item_history import naive_utc

Moments = tuple[np.ndarray, np.ndarray]  # mean and std over the unseen items, [users, 1] each
CONTENT = "content"  # the generator name whose ranks fill the cold slots
RECENT = 10  # the newest positives that make the "recent" query of item-item generators
# The item_behaviour fields the features read (a server reads them from the online store,
# training from :meth:`avrec.ranker.item_history.ItemTimeline.behaviour_at`).
ITEM_STATS = ("popularity_7d", "popularity_30d", "popularity_all", "mean_rating",
              "item_age_days")


@dataclass
class UserContext:
    """What features need to know about the scored users (arrays aligned with them)."""

    cuts: np.ndarray  # datetime64[us]: features are as of just before these instants
    histories: list[History]  # events before the cut, oldest first
    seen: np.ndarray  # bool [users, items]
    positives: list[np.ndarray]  # catalogue columns of positive events, oldest first
    last_item: np.ndarray  # catalogue column of the newest event (-1: none)
    history: np.ndarray  # events per user
    last_time: np.ndarray  # datetime64[us] of the newest event (NaT: none)

    @classmethod
    def from_histories(
        cls, histories: Sequence[History], cuts: np.ndarray, last_time: np.ndarray,
        n_items: int, positive_threshold: float, counts: np.ndarray | None = None,
    ) -> UserContext:
        """From each user's history (``counts``: events per user when the history is capped)."""
        seen = np.zeros((len(histories), n_items), dtype=bool)
        for row, h in enumerate(histories):
            seen[row, h.columns] = True
        lengths = np.asarray([h.columns.size for h in histories], dtype=np.int64)
        return cls(
            np.asarray(cuts, dtype="datetime64[us]"), list(histories), seen,
            [h.columns[h.values >= positive_threshold] for h in histories],
            np.asarray([h.columns[-1] if h.columns.size else -1 for h in histories], np.int64),
            lengths if counts is None else np.asarray(counts, dtype=np.int64),
            np.asarray(last_time, dtype="datetime64[us]"),
        )


def user_context(
    interactions: pl.DataFrame, item_ids: np.ndarray, users: np.ndarray, cuts: np.ndarray | None,
    positive_threshold: float, cap: int = HISTORY_CAP,
) -> UserContext:
    """Per-user facts from the fit interactions before each user's cut, the newest ``cap``
    of them (as the served ``user_history`` keeps them)."""
    frame = interactions.sort("user_id", "event_timestamp", "item_id")
    times = naive_utc(frame["event_timestamp"])
    if cuts is None:
        cuts = np.full(users.size, times.max() + np.timedelta64(1, "us"))
    cuts = np.asarray(cuts, dtype="datetime64[us]")
    user_col = frame["user_id"].to_numpy()
    starts = np.searchsorted(user_col, users, side="left")
    stops = np.searchsorted(user_col, users, side="right")
    cols = np.searchsorted(item_ids, frame["item_id"].to_numpy())
    values = frame["value"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    histories = []
    last_time = np.full(users.size, np.datetime64("NaT"), dtype="datetime64[us]")
    for row, (lo, hi) in enumerate(zip(starts, stops, strict=True)):
        keep = np.arange(lo, hi)[times[lo:hi] < cuts[row]][-cap:]
        histories.append(History(cols[keep], values[keep]))
        if keep.size:
            last_time[row] = times[keep[-1]]
    return UserContext.from_histories(histories, cuts, last_time, item_ids.size,
                                      positive_threshold)


class UnseenCatalogue:
    """Each user's unseen catalogue items, the population a generator's z-score is taken over;
    built once per batch and shared by every generator's :meth:`z_scores`.

    >>> unseen = UnseenCatalogue(np.array([[True, False, False, False]]))
    >>> unseen.z_scores(np.array([[9.0, 1.0, 2.0, 3.0]]), np.array([[3, 1]])).tolist()
    [[1.224744871391589, -1.224744871391589]]
    """

    def __init__(self, seen: np.ndarray) -> None:
        self.unseen = ~seen
        self.count = np.maximum(np.count_nonzero(self.unseen, axis=1), 1)[:, None]

    def moments(self, scores: np.ndarray) -> Moments:
        """Mean and standard deviation (``[users, 1]``) of each row over its unseen items."""
        mean = np.where(self.unseen, scores, 0.0).sum(axis=1, keepdims=True) / self.count
        deviation = np.where(self.unseen, scores - mean, 0.0)
        std = np.sqrt(np.einsum("ui,ui->u", deviation, deviation)[:, None] / self.count)
        return mean, std

    def z_scores(self, scores: np.ndarray, pool: np.ndarray,
                 moments: Moments | None = None) -> np.ndarray:
        """Each pool item's score as a z-score over the user's unseen items, clipped to
        [-10, 50] (NaN: 0); ``moments``: :meth:`moments` of ``scores`` when known."""
        return z_scores([scores], pool, [self.moments(scores) if moments is None else moments])[0]


@dataclass(frozen=True)
class CatalogueFacts:
    """Genres (multi-hot, unit rows) and years of the catalogue, in catalogue order."""

    genres: np.ndarray  # [items, genres] float64, rows scaled to unit length
    years: np.ndarray  # float64, NaN where unknown

    @classmethod
    def from_items(cls, items: pl.DataFrame, item_ids: np.ndarray) -> CatalogueFacts:
        frame = pl.DataFrame({"item_id": item_ids}).join(
            items.unique("item_id"), on="item_id", how="left", maintain_order="left")
        lists = (frame["genres"].to_list() if "genres" in frame.columns
                 else [None] * frame.height)
        vocabulary = sorted({g for row in lists if row for g in row if g})
        index = {g: i for i, g in enumerate(vocabulary)}
        genres = np.zeros((item_ids.size, len(vocabulary)))
        for row, values in enumerate(lists):
            for g in values or []:
                if g in index:
                    genres[row, index[g]] = 1.0
        years = (frame["year"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
                 if "year" in frame.columns else np.full(item_ids.size, np.nan))
        return cls(unit_rows(genres), years)

    def user_parts(self, context: UserContext) -> tuple[np.ndarray, np.ndarray]:
        """What :meth:`features` takes from the users' histories alone: their positives'
        genre profile (unit rows, ``[users, genres, 1]``) and the mean known year of their
        newest positives (``[users]``)."""
        profile = unit_rows(np.stack([self.genres[p].sum(0) for p in context.positives])
                            if context.positives else np.zeros((0, self.genres.shape[1])))
        recent_year = np.array([_known_mean(self.years[p[-RECENT:]])
                                for p in context.positives])
        return profile[:, :, None], recent_year

    def features(self, context: UserContext, pool: np.ndarray,
                 parts: tuple[np.ndarray, np.ndarray] | None = None) -> list[np.ndarray]:
        """Genre match to the user's positives; year offset/distance to their newest ones
        (``parts``: :meth:`user_parts` of ``context`` when known)."""
        profile, recent_year = self.user_parts(context) if parts is None else parts
        match = np.matmul(self.genres[pool], profile)[..., 0]
        offset = (self.years[pool] - recent_year[:, None]) / 10.0
        missing = np.isnan(offset)
        offset[missing] = 0.0
        return [match, offset, np.abs(offset), missing.astype(np.float64)]


def _known_mean(values: np.ndarray) -> float:
    """The mean of the finite ``values`` (NaN when none is): ``np.nanmean`` without its
    warning and its cost for one short row."""
    known = values[np.isfinite(values)]
    return float(known.mean()) if known.size else np.nan


def z_scores(scores: Sequence[np.ndarray], pool: np.ndarray, moments: Sequence[Moments]
             ) -> np.ndarray:
    """:meth:`UnseenCatalogue.z_scores` of several score arrays at once, given their
    moments: ``[len(scores), users, pool]``.

    >>> scores = [np.array([[9.0, 1.0, 2.0, 3.0]])]
    >>> moments = [UnseenCatalogue(np.array([[True, False, False, False]])).moments(scores[0])]
    >>> z_scores(scores, np.array([[3, 1]]), moments)[0].tolist()
    [[1.224744871391589, -1.224744871391589]]
    """
    if not scores:
        return np.zeros((0, *pool.shape))
    taken = gather(scores, pool)
    mean = np.stack([m[0] for m in moments])
    std = np.stack([m[1] for m in moments])
    z = (taken - mean) / np.where(std > 0, std, 1.0)
    z[np.isnan(z)] = 0.0
    return np.minimum(np.maximum(z, -10.0, out=z), 50.0, out=z)  # +-inf to the bounds


def gather(arrays: Sequence[np.ndarray], pool: np.ndarray) -> np.ndarray:
    """``[len(arrays), users, pool]``: each ``[users, items]`` array at each user's pool
    columns (``np.take_along_axis`` on axis 1, at a fifth of its cost for a few users).

    >>> gather([np.array([[5, 6, 7]])], np.array([[2, 0]])).tolist()
    [[[7, 5]]]
    """
    users = np.arange(pool.shape[0])[:, None]
    return np.stack([a[users, pool] for a in arrays])


def item_stat_columns(stats: ItemStats) -> np.ndarray:
    """The features made of :data:`ITEM_STATS` (float64 arrays of any one shape: the
    catalogue, or each user's pool), stacked on a new last axis: log1p of the three
    popularity counts, never_seen, mean_rating - 3.5 (0 when unknown), mean_rating_missing,
    log1p of the age in days.

    >>> stats = {"popularity_7d": np.array([0.0]), "popularity_30d": np.array([1.0]),
    ...          "popularity_all": np.array([3.0]), "mean_rating": np.array([np.nan]),
    ...          "item_age_days": np.array([np.e - 1])}
    >>> item_stat_columns(stats).round(3).tolist()
    [[0.0, 0.693, 1.386, 0.0, 0.0, 1.0, 1.0]]
    """
    rating = stats["mean_rating"]
    return np.stack([
        *(np.log1p(np.nan_to_num(stats[name]).clip(0)) for name in ITEM_STATS[:3]),
        (np.nan_to_num(stats["popularity_all"]) == 0).astype(np.float64),
        np.nan_to_num(rating - 3.5), np.isnan(rating).astype(np.float64),
        np.log1p(np.nan_to_num(stats["item_age_days"], nan=0.0).clip(0)),
    ], axis=-1)


@dataclass(frozen=True)
class UserParts:
    """What :meth:`CandidateFeatures.build` takes from users' histories alone, whatever the
    pool: kept with a user's generator outputs (:mod:`avrec.ranker.user_score_cache`), so a
    repeat request only applies them to its candidates."""

    profile_and_last: np.ndarray | None  # [users, dim, 2]: unit mean of the positives'
    # vectors, the newest item's vector (None without item vectors)
    neighbours: list[np.ndarray] | None  # per user: neighbour_vectors of the history
    catalogue: tuple[np.ndarray, np.ndarray] | None  # CatalogueFacts.user_parts

    def arrays(self) -> list[np.ndarray]:
        out = [] if self.profile_and_last is None else [self.profile_and_last]
        return out + list(self.neighbours or []) + list(self.catalogue or ())


class CandidateFeatures:
    """Builds the ``[users, pool, features]`` tensor for the listwise scorer."""

    def __init__(self, generator_names: Sequence[str], vectors: np.ndarray | None,
                 query_names: Sequence[str] = (), catalogue: CatalogueFacts | None = None,
                 neighbours: int = 0) -> None:
        self.generator_names = list(generator_names)
        self.query_names = list(query_names)
        self.catalogue = catalogue
        self.neighbours = neighbours if vectors is not None else 0  # 0: no sim_neighbours
        self.vectors = None if vectors is None else unit_rows(vectors)
        self.has_vector = None if vectors is None else np.linalg.norm(vectors, axis=1) > 0
        self._stat_columns: tuple[ItemStats, np.ndarray] | None = None  # the last stats seen

    def _stat_table(self, stats: ItemStats) -> np.ndarray:
        """:func:`item_stat_columns` over the whole catalogue for one ``stats`` mapping,
        kept until another mapping comes (a server's snapshot holds one for its lifetime)."""
        cached = self._stat_columns
        if cached is None or cached[0] is not stats:
            table = item_stat_columns({name: np.asarray(stats[name], dtype=np.float64)
                                       for name in ITEM_STATS})
            cached = self._stat_columns = (stats, table)
        return cached[1]

    @property
    def names(self) -> list[str]:
        """Feature names in column order (the scorer's input contract)."""
        return self._names(queries_first=True)

    @property
    def legacy_names(self) -> list[str]:
        """The names as pipelines saved before 2026-12 list them: the same columns, the
        query z-scores' names misplaced after the item statistics' (a label error only: the
        scorer was trained and is served on the columns :meth:`build` makes)."""
        return self._names(queries_first=False)

    def _names(self, queries_first: bool) -> list[str]:
        out = [f"{g}_{kind}" for g in self.generator_names for kind in ("z", "rr")]
        queries = [f"{g}_recent{RECENT}_z" for g in self.query_names]
        out += queries if queries_first else []
        out += [f"log_{name}" for name in ITEM_STATS[:3]] + ["never_seen"]
        out += ["mean_rating", "mean_rating_missing", "log_age_days"]
        out += [] if queries_first else queries
        if self.vectors is not None:
            out += ["sim_profile", "sim_last", "no_vector"]
            out += ["sim_neighbours"] if self.neighbours else []
        if self.catalogue is not None:
            out += ["genre_match", "year_offset", "year_distance", "year_missing"]
        return [*out, "log_history", "log_days_since_last"]

    def user_parts(self, context: UserContext) -> UserParts:
        """The :class:`UserParts` of ``context``'s users."""
        profile_and_last = neighbours = None
        if self.vectors is not None:
            assert self.has_vector is not None
            profile = np.stack([
                unit_rows(self.vectors[p[self.has_vector[p]]].mean(0, keepdims=True))[0]
                if self.has_vector[p].any() else np.zeros(self.vectors.shape[1])
                for p in context.positives
            ])
            last = np.where(context.last_item[:, None] >= 0,
                            self.vectors[np.maximum(context.last_item, 0)], 0.0)
            profile_and_last = np.stack([profile, last], axis=2)
            if self.neighbours:
                neighbours = [neighbour_vectors(self.vectors, self.has_vector, h.columns)
                              for h in context.histories]
        catalogue = self.catalogue.user_parts(context) if self.catalogue is not None else None
        return UserParts(profile_and_last, neighbours, catalogue)

    def build(
        self, context: UserContext, pool: np.ndarray, generator_scores: Sequence[np.ndarray],
        generator_ranks: Sequence[np.ndarray], item_stats: Sequence[ItemStats],
        query_scores: Sequence[np.ndarray] = (), moments: Sequence[Moments] | None = None,
        parts: UserParts | None = None,
    ) -> np.ndarray:
        """Features of each user's pool; ``item_stats[u]`` holds :data:`ITEM_STATS` over the
        catalogue as of user ``u``'s cut (one mapping shared by every user, as a server
        passes it, is turned into feature columns once: read-only by contract);
        ``moments``: :meth:`UnseenCatalogue.moments` of the generator scores then the query
        scores, ``parts``: :meth:`user_parts` of ``context``, when known."""
        if parts is None:
            parts = self.user_parts(context)
        size = pool.shape[1]
        every = [*generator_scores, *query_scores]
        if moments is None:
            unseen = UnseenCatalogue(context.seen)
            moments = [unseen.moments(scores) for scores in every]
        z = z_scores(every, pool, moments)
        columns: list[np.ndarray] = []
        if generator_ranks:
            reciprocal = 1.0 / np.log2(2.0 + gather(generator_ranks, pool))
            for g in range(len(generator_scores)):
                columns += [z[g], reciprocal[g]]
        columns += list(z[len(generator_scores):])
        if item_stats and all(stats is item_stats[0] for stats in item_stats):
            stat_block = self._stat_table(item_stats[0])[pool]
        else:
            stat_block = item_stat_columns({
                name: np.stack([np.asarray(stats[name], dtype=np.float64)[pool[row]]
                                for row, stats in enumerate(item_stats)])
                for name in ITEM_STATS})
        columns += list(np.moveaxis(stat_block, -1, 0))
        if self.vectors is not None:
            assert self.has_vector is not None and parts.profile_and_last is not None
            candidate = self.vectors[pool]
            similarity = np.matmul(candidate, parts.profile_and_last)
            columns += [
                similarity[..., 0], similarity[..., 1],
                (~self.has_vector[pool]).astype(np.float64),
            ]
            if self.neighbours:
                assert parts.neighbours is not None
                columns.append(np.stack([
                    neighbour_similarity(self.vectors, self.has_vector, h.columns, row,
                                         self.neighbours, rows, near)
                    for h, row, rows, near in zip(context.histories, pool, candidate,
                                                  parts.neighbours, strict=True)]))
        if self.catalogue is not None:
            columns += self.catalogue.features(context, pool, parts.catalogue)
        days = (context.cuts - context.last_time).astype(np.int64) / DAY_US
        days = np.where(np.isnat(context.last_time), 0.0, np.maximum(days, 0.0))
        columns.append(np.repeat(np.log1p(context.history)[:, None], size, 1).astype(np.float64))
        columns.append(np.repeat(np.log1p(days)[:, None], size, 1))
        return np.stack(columns, axis=-1).astype(np.float32)


@dataclass
class ScoredPool:
    """A batch of users' pools: columns, features, RRF of the whole catalogue, cold flags."""

    pool: np.ndarray  # [users, pool] catalogue columns
    features: np.ndarray  # [users, pool, features]
    generator_ranks: Sequence[np.ndarray]  # [users, items] each generator's ranks
    seen: np.ndarray  # [users, items] bool
    cold: np.ndarray  # [users, pool] no interaction before the user's cut
    history_lengths: np.ndarray  # [users] events in each user's history
    scores: np.ndarray | None = None  # [users, pool] the scorer's output

    @functools.cached_property
    def fused(self) -> np.ndarray:
        """``[users, items]`` reciprocal-rank fusion of the generators (0 for seen items):
        the order of the items outside the pool (computed once, when first asked: serving
        never asks; an exploration sweep's rescoring asks many times)."""
        fused = sum(1.0 / (RRF_K + r) for r in self.generator_ranks)
        return np.where(self.seen, 0.0, fused)

    def catalogue_scores(self, explore: int = 0, depth: int = 20, min_history: int = 0
                         ) -> np.ndarray:
        """Full-catalogue scores: pool items by the scorer, every other item below them in RRF
        order; with ``explore`` > 0, the best ``explore`` cold pool items (by the scorer) of
        each user with at least ``min_history`` events take the last ``explore`` places of the
        top ``depth`` (exploration slots)."""
        assert self.scores is not None
        pool_scores = self.scores.copy()
        if explore > 0:
            slots = np.where(self.history_lengths >= min_history, explore, 0)
            pool_scores = with_exploration_slots(pool_scores, self.cold, slots, depth)
        floor = pool_scores.min(axis=1, keepdims=True) - 2.0
        top = self.fused.max(axis=1, keepdims=True)
        out = floor + self.fused / np.where(top > 0, top, 1.0)
        np.put_along_axis(out, self.pool, pool_scores, axis=1)
        return out


def with_exploration_slots(scores: np.ndarray, cold: np.ndarray, slots: int | np.ndarray,
                           depth: int) -> np.ndarray:
    """Scores re-ordered so that each row's best ``slots`` cold entries (not already in its top
    ``depth - slots``) sit at places ``depth - slots + 1 .. depth``, in their own order;
    ``slots`` is one count for every row or one per row.

    >>> with_exploration_slots(np.array([[4.0, 3, 2, 1]]), np.array([[0, 0, 0, 1]], bool), 1, 2)
    array([[4. , 3. , 2. , 3.5]])
    """
    out = scores.copy()
    per_row = np.broadcast_to(np.asarray(slots, dtype=np.int64), (scores.shape[0],))
    for row in range(scores.shape[0]):
        if per_row[row] <= 0:
            continue
        keep = max(depth - int(per_row[row]), 0)
        order = np.argsort(-scores[row], kind="stable")
        rest = order[keep:]
        chosen = rest[cold[row, rest]][:per_row[row]]
        if chosen.size == 0:
            continue
        above = scores[row, order[keep - 1]] if keep else scores[row].max() + 1.0
        below = scores[row, rest[0]]
        # between the last kept entry and the next one, in the chosen entries' own order
        steps = np.linspace(above, below, chosen.size + 2)[1:-1]
        out[row, chosen] = steps
    return out


