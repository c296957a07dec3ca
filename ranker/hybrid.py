"""The hybrid (stacked) ranker: candidate generators, point-in-time features, a listwise MLP.

Pieces, each small:

* **generators**: any :class:`~ranker.recommender.Recommender` (EASE, ALS, ItemKNN, content
  kNN over the mixed embedding, the sequential model, ...), fitted on the same interactions;
* :func:`candidate_pool`: each user's ``candidates`` best items by reciprocal-rank fusion of
  the generators (seen items excluded), so every generator, content kNN included, can bring
  items (new ones too) into the pool;
* :class:`CandidateFeatures`: per (user, candidate) features, all as of the user's cut: each
  generator's per-user z-score and reciprocal rank, the item's popularity in the last 30 /
  365 days and all time, mean rating and age (:class:`ranker.item_history.ItemTimeline`),
  content similarity of the item to the user's positives and last item, genre match and
  year offset (:class:`CatalogueFacts`), and the user's history length and days since their
  last event;
* :class:`ListwiseScorer`: an MLP scoring each candidate, trained with a softmax over the
  user's pool (cross-entropy against the user's positives, ListNet-style), a bag of seeds;
* :func:`with_exploration_slots`: new items shown in the last places of the top K.

Point-in-time training (:meth:`HybridRecommender._fit`): the fit interactions are cut per user
into blocks from the newest end (:func:`inner_split`); for each of ``inner_folds`` blocks the
generators and the item vectors (a fusion factory is refitted too) are fitted on the events
before it, features are read at each user's block cut, and the block's positives are the
learner's labels; then the generators are refitted on all fit interactions for scoring. No
generator score used as a training feature comes from a model that saw the label it is
trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl
import torch
from torch import nn

from ranker.baselines import ContentKNN
from ranker.features import VectorSource, resolve_vectors
from ranker.item_history import ItemTimeline, naive_utc
from ranker.recommender import InteractionMatrix, Recommender
from ranker.training import BestWeights, torch_threads

CONTENT = "content"  # the generator name whose ranks fill the cold slots
RRF_K = 60.0  # reciprocal-rank fusion constant (Cormack et al. 2009)
GeneratorFactory = Callable[[], Recommender]


@dataclass
class HybridConfig:
    """Pool size, inner split and the learner's optimisation."""

    candidates: int = 200
    cold_slots: int = 20  # pool slots reserved for the content generator's best cold items
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


def ranks(scores: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """0-based rank of every item per row (best first), excluded items ranked last."""
    masked = np.where(exclude, -np.inf, scores)
    order = np.argsort(-masked, axis=1, kind="stable")
    out = np.empty_like(order)
    np.put_along_axis(out, order, np.arange(scores.shape[1])[None, :], axis=1)
    return out


def _best(scores: np.ndarray, size: int) -> np.ndarray:
    top = np.argpartition(-scores, size - 1, axis=1)[:, :size]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def candidate_pool(
    generator_ranks: Sequence[np.ndarray], exclude: np.ndarray, size: int,
    cold: np.ndarray | None = None, cold_ranks: np.ndarray | None = None, cold_slots: int = 0,
) -> np.ndarray:
    """``[users, size]`` catalogue columns: best reciprocal-rank-fusion items, seen excluded.

    With ``cold_slots``, that many of the slots go to the user's best ``cold`` items (items
    without interactions before the cut) by ``cold_ranks`` (a content generator's ranks).

    >>> r1, r2 = np.array([[0, 1, 2]]), np.array([[2, 0, 1]])
    >>> candidate_pool([r1, r2], np.array([[False, False, True]]), 2).tolist()
    [[1, 0]]
    """
    fused = sum(1.0 / (RRF_K + r) for r in generator_ranks)
    fused = np.where(exclude, -np.inf, fused)
    size = min(size, exclude.shape[1])
    if not cold_slots or cold is None or cold_ranks is None:
        return _best(fused, size)
    cold_score = np.where(cold & ~exclude, -cold_ranks.astype(np.float64), -np.inf)
    reserved = _best(cold_score, min(cold_slots, size))
    reserved_ok = np.take_along_axis(cold_score, reserved, 1) > -np.inf
    rest = fused.copy()
    np.put_along_axis(rest, reserved, np.where(reserved_ok, -np.inf, np.take_along_axis(
        rest, reserved, 1)), axis=1)
    warm = _best(rest, size - reserved.shape[1])
    # a user with fewer cold items than slots gets the RRF items ranked next instead
    filler = _best(rest, size)[:, size - reserved.shape[1]:]
    return np.concatenate([warm, np.where(reserved_ok, reserved, filler)], axis=1)


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)


@dataclass
class UserContext:
    """What features need to know about the scored users (arrays aligned with them)."""

    users: np.ndarray
    cuts: np.ndarray  # datetime64[us]
    seen: np.ndarray  # bool [users, items]
    positives: list[np.ndarray]  # catalogue columns of positive fit items, oldest first
    last_item: np.ndarray  # catalogue column of the newest fit event (-1: none)
    history: np.ndarray  # fit events per user
    last_time: np.ndarray  # datetime64[us] of the newest fit event


def user_context(
    interactions: pl.DataFrame, item_ids: np.ndarray, users: np.ndarray, cuts: np.ndarray | None,
    positive_threshold: float,
) -> UserContext:
    """Per-user facts from the fit interactions (only those before each user's cut count)."""
    frame = interactions.sort("user_id", "event_timestamp", "item_id")
    times = naive_utc(frame["event_timestamp"])
    if cuts is None:
        cuts = np.full(users.size, times.max() + np.timedelta64(1, "us"))
    cuts = np.asarray(cuts, dtype="datetime64[us]")
    by_user = np.searchsorted(frame["user_id"].to_numpy(), users, side="left"), np.searchsorted(
        frame["user_id"].to_numpy(), users, side="right"
    )
    cols = np.searchsorted(item_ids, frame["item_id"].to_numpy())
    values = frame["value"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
    seen = np.zeros((users.size, item_ids.size), dtype=bool)
    positives, last_item = [], np.full(users.size, -1)
    history = np.zeros(users.size, dtype=np.int64)
    last_time = np.full(users.size, np.datetime64("NaT"), dtype="datetime64[us]")
    for row, (lo, hi) in enumerate(zip(*by_user, strict=True)):
        keep = np.arange(lo, hi)[times[lo:hi] < cuts[row]]
        seen[row, cols[keep]] = True
        positives.append(cols[keep][values[keep] >= positive_threshold])
        history[row] = keep.size
        if keep.size:
            last_item[row], last_time[row] = cols[keep[-1]], times[keep[-1]]
    return UserContext(users, cuts, seen, positives, last_item, history, last_time)


RECENT = 10  # the newest positives that make the "recent" query of item-item generators


def pool_z_scores(scores: np.ndarray, seen: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """Each pool item's score as a z-score over the user's unseen catalogue (clipped)."""
    valid = np.where(seen, np.nan, scores)
    mean = np.nanmean(valid, axis=1, keepdims=True)
    std = np.nanstd(valid, axis=1, keepdims=True)
    z = (np.take_along_axis(scores, pool, 1) - mean) / np.where(std > 0, std, 1.0)
    return np.clip(np.nan_to_num(z), -10, 50)


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

    def features(self, context: UserContext, pool: np.ndarray) -> list[np.ndarray]:
        """Genre match to the user's positives; year offset/distance to their newest ones."""
        profile = unit_rows(np.stack([self.genres[p].sum(0) for p in context.positives])
                            if context.positives else np.zeros((0, self.genres.shape[1])))
        match = np.einsum("upg,ug->up", self.genres[pool], profile)
        recent_year = np.array([np.nanmean(self.years[p[-RECENT:]])
                                if np.isfinite(self.years[p[-RECENT:]]).any() else np.nan
                                for p in context.positives])
        offset = (self.years[pool] - recent_year[:, None]) / 10.0
        missing = np.isnan(offset)
        offset = np.nan_to_num(offset)
        return [match, offset, np.abs(offset), missing.astype(np.float64)]


class CandidateFeatures:
    """Builds the ``[users, pool, features]`` tensor for the listwise scorer."""

    WINDOWS = (30.0, 365.0)

    def __init__(self, generator_names: Sequence[str], vectors: np.ndarray | None,
                 query_names: Sequence[str] = (), catalogue: CatalogueFacts | None = None
                 ) -> None:
        self.generator_names = list(generator_names)
        self.query_names = list(query_names)
        self.catalogue = catalogue
        self.vectors = None if vectors is None else unit_rows(vectors)
        self.has_vector = None if vectors is None else np.linalg.norm(vectors, axis=1) > 0

    @property
    def names(self) -> list[str]:
        """Feature names in column order (the scorer's input contract)."""
        out = [f"{g}_{kind}" for g in self.generator_names for kind in ("z", "rr")]
        out += [f"log_count_{w:g}d" for w in self.WINDOWS] + ["log_count_all", "never_seen"]
        out += ["mean_rating", "mean_rating_missing", "log_age_days"]
        out += [f"{g}_recent{RECENT}_z" for g in self.query_names]
        if self.vectors is not None:
            out += ["sim_profile", "sim_last", "no_vector"]
        if self.catalogue is not None:
            out += ["genre_match", "year_offset", "year_distance", "year_missing"]
        return [*out, "log_history", "log_days_since_last"]

    def build(
        self, context: UserContext, pool: np.ndarray, generator_scores: Sequence[np.ndarray],
        generator_ranks: Sequence[np.ndarray], timeline: ItemTimeline,
        query_scores: Sequence[np.ndarray] = (),
    ) -> np.ndarray:
        n_users, size = pool.shape
        columns: list[np.ndarray] = []
        for scores, rank in zip(generator_scores, generator_ranks, strict=True):
            z = pool_z_scores(scores, context.seen, pool)
            columns += [z, 1.0 / np.log2(2.0 + np.take_along_axis(rank, pool, 1))]
        columns += [pool_z_scores(scores, context.seen, pool) for scores in query_scores]
        item_cols: dict[str, list[np.ndarray]] = {}
        for row in range(n_users):
            stats = timeline.at(context.cuts[row], self.WINDOWS)
            for key, value in stats.items():
                item_cols.setdefault(key, []).append(value[pool[row]])
        stack = {k: np.stack(v) for k, v in item_cols.items()}
        for w in self.WINDOWS:
            columns.append(np.log1p(stack[f"count_{w:g}d"]))
        columns += [np.log1p(stack["count_all"]), (stack["count_all"] == 0).astype(np.float64)]
        rating = stack["mean_rating"]
        columns += [np.nan_to_num(rating - 3.5), np.isnan(rating).astype(np.float64)]
        columns.append(np.log1p(np.nan_to_num(stack["age_days"], nan=0.0).clip(0)))
        if self.vectors is not None:
            assert self.has_vector is not None
            profile = np.stack([
                unit_rows(self.vectors[p[self.has_vector[p]]].mean(0, keepdims=True))[0]
                if self.has_vector[p].any() else np.zeros(self.vectors.shape[1])
                for p in context.positives
            ])
            last = np.where(context.last_item[:, None] >= 0,
                            self.vectors[np.maximum(context.last_item, 0)], 0.0)
            candidate = self.vectors[pool]
            columns += [
                np.einsum("upd,ud->up", candidate, profile),
                np.einsum("upd,ud->up", candidate, last),
                (~self.has_vector[pool]).astype(np.float64),
            ]
        if self.catalogue is not None:
            columns += self.catalogue.features(context, pool)
        days = (context.cuts - context.last_time).astype(np.int64) / 86_400e6
        days = np.where(np.isnat(context.last_time), 0.0, np.maximum(days, 0.0))
        columns.append(np.repeat(np.log1p(context.history)[:, None], size, 1).astype(np.float64))
        columns.append(np.repeat(np.log1p(days)[:, None], size, 1))
        return np.stack(columns, axis=-1).astype(np.float32)


class ListwiseScorer(nn.Module):
    """Standardised features -> MLP -> one score per candidate.

    >>> scorer = ListwiseScorer(np.zeros(3), np.ones(3), hidden=8)
    >>> scorer(torch.zeros(2, 5, 3)).shape
    torch.Size([2, 5])
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.where(std > 0, std, 1.0),
                                                    dtype=torch.float32))
        width = len(mean)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.mean) / self.std).squeeze(-1)


class ScorerBag(nn.Module):
    """The mean of several scorers' outputs (a bag of seeds: less variance, same interface)."""

    def __init__(self, scorers: Sequence[ListwiseScorer]) -> None:
        super().__init__()
        self.scorers = nn.ModuleList(scorers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([s(features) for s in self.scorers]).mean(0)


def listwise_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the softmax over a pool and its positives (uniform over them)."""
    target = labels / labels.sum(1, keepdim=True)
    return -(target * torch.log_softmax(scores, dim=1)).sum(1).mean()


@dataclass
class HybridHistory:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1


def fit_scorer(features: np.ndarray, labels: np.ndarray, cfg: HybridConfig
               ) -> tuple[ListwiseScorer, HybridHistory]:
    """Train the listwise scorer; 20% of the users early-stop it (seeded)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    users = rng.permutation(features.shape[0])
    n_val = max(1, users.size // 5)
    val, train = users[:n_val], users[n_val:]
    flat = features[train].reshape(-1, features.shape[-1])
    model = ListwiseScorer(flat.mean(0), flat.std(0), cfg.hidden)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = torch.from_numpy(features), torch.from_numpy(labels.astype(np.float32))
    history, keeper = HybridHistory(), BestWeights(model, cfg.patience, higher_is_better=False)
    for _ in range(cfg.epochs):
        model.train()
        losses = []
        for start in range(0, train.size, cfg.batch_users):
            batch = torch.from_numpy(train[start : start + cfg.batch_users])
            loss = listwise_loss(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        rng.shuffle(train)
        model.eval()
        with torch.no_grad():
            held = torch.from_numpy(val)
            val_loss = float(listwise_loss(model(x[held]), y[held]))
        history.train_loss.append(float(np.mean(losses)))
        history.val_loss.append(val_loss)
        if keeper.update(val_loss):
            break
    keeper.restore()
    history.best_epoch = keeper.best_epoch
    return model, history


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


@dataclass
class ScoredPool:
    """A batch of users' pools: columns, features, RRF of the whole catalogue, cold flags."""

    pool: np.ndarray  # [users, pool] catalogue columns
    features: np.ndarray  # [users, pool, features]
    fused: np.ndarray  # [users, items] reciprocal-rank fusion (0 for seen items)
    cold: np.ndarray  # [users, pool] no interaction before the user's cut
    scores: np.ndarray | None = None  # [users, pool] the scorer's output

    def catalogue_scores(self, explore: int = 0, depth: int = 20) -> np.ndarray:
        """Full-catalogue scores: pool items by the scorer, every other item below them in RRF
        order; with ``explore`` > 0, the user's best ``explore`` cold pool items (by the scorer)
        take the last ``explore`` places of the top ``depth`` (exploration slots)."""
        assert self.scores is not None
        pool_scores = self.scores.copy()
        if explore > 0:
            pool_scores = with_exploration_slots(pool_scores, self.cold, explore, depth)
        floor = pool_scores.min(axis=1, keepdims=True) - 2.0
        top = self.fused.max(axis=1, keepdims=True)
        out = floor + self.fused / np.where(top > 0, top, 1.0)
        np.put_along_axis(out, self.pool, pool_scores, axis=1)
        return out


def with_exploration_slots(scores: np.ndarray, cold: np.ndarray, slots: int, depth: int
                           ) -> np.ndarray:
    """Scores re-ordered so that each row's best ``slots`` cold entries (not already in its top
    ``depth - slots``) sit at places ``depth - slots + 1 .. depth``, in their own order.

    >>> with_exploration_slots(np.array([[4.0, 3, 2, 1]]), np.array([[0, 0, 0, 1]], bool), 1, 2)
    array([[4. , 3. , 2. , 3.5]])
    """
    out = scores.copy()
    keep = max(depth - slots, 0)
    for row in range(scores.shape[0]):
        order = np.argsort(-scores[row], kind="stable")
        rest = order[keep:]
        chosen = rest[cold[row, rest]][:slots]
        if chosen.size == 0:
            continue
        above = scores[row, order[keep - 1]] if keep else scores[row].max() + 1.0
        below = scores[row, rest[0]]
        # between the last kept entry and the next one, in the chosen entries' own order
        steps = np.linspace(above, below, chosen.size + 2)[1:-1]
        out[row, chosen] = steps
    return out


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


class HybridRecommender(Recommender):
    """Generators -> pool -> point-in-time features -> listwise MLP (see the module docstring).

    Items outside a user's pool rank below it, in reciprocal-rank-fusion order.
    """

    name = "hybrid"

    def __init__(
        self,
        generators: dict[str, GeneratorFactory],
        vectors: VectorSource | None = None,
        config: HybridConfig | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(seed)
        if not generators:
            raise ValueError("the hybrid ranker needs at least one candidate generator")
        self.factories = generators
        self.vector_source = vectors
        self.config = config or HybridConfig(seed=seed)
        self.name = name or self.name
        self.fitted: dict[str, Recommender] = {}
        self.scorer: ScorerBag | None = None
        self.features: CandidateFeatures | None = None
        self.interactions = pl.DataFrame()
        self.history = HybridHistory()
        self.explore = 0  # exploration slots for cold items at the end of the top ``depth``
        self.depth = 20
        self.last_pool: ScoredPool | None = None

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

    def _fit_generators(self, interactions: pl.DataFrame, items: pl.DataFrame
                        ) -> dict[str, Recommender]:
        return {name: make().fit(interactions, items) for name, make in self.factories.items()}

    def _candidate_features(
        self, generators: dict[str, Recommender], interactions: pl.DataFrame,
        items: pl.DataFrame,
    ) -> CandidateFeatures:
        """The feature builder for generators fitted on ``interactions``."""
        queries = [n for n, g in generators.items() if hasattr(g, "query")]
        return CandidateFeatures(list(generators), self._vectors(interactions, items), queries,
                                 self._catalogue(items))

    def _pool_features(
        self, generators: dict[str, Recommender], features: CandidateFeatures,
        interactions: pl.DataFrame, users: np.ndarray, cuts: np.ndarray | None,
    ) -> ScoredPool:
        """Pool and features of ``users`` as of ``cuts`` (see :class:`ScoredPool`)."""
        cfg = self.config
        context = user_context(interactions, self.item_ids, users, cuts, cfg.positive_threshold)
        timeline = ItemTimeline.build(interactions, self.item_ids)
        # cold: no interaction in the fit data, i.e. unknown to every generator (when serving,
        # the same as "none before now")
        known = np.zeros(self.item_ids.size, dtype=bool)
        known[np.searchsorted(self.item_ids, interactions["item_id"].unique().to_numpy())] = True
        cold = np.repeat(~known[None, :], users.size, axis=0)
        scores = [g.score(users, context.cuts) for g in generators.values()]
        generator_ranks = [ranks(s, context.seen) for s in scores]
        content = [r for n, r in zip(generators, generator_ranks, strict=True) if n == CONTENT]
        pool = candidate_pool(generator_ranks, context.seen, cfg.candidates, cold,
                              content[0] if content else None, cfg.cold_slots)
        recent = [p[-RECENT:] for p in context.positives]
        queries = [g.query(recent) for g in generators.values() if hasattr(g, "query")]
        built = features.build(context, pool, scores, generator_ranks, timeline, queries)
        fused = sum(1.0 / (RRF_K + r) for r in generator_ranks)
        return ScoredPool(pool, built, np.where(context.seen, 0.0, fused),
                          np.take_along_axis(cold, pool, 1))

    def _fold_examples(
        self, interactions: pl.DataFrame, items: pl.DataFrame, fold: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(features, pool labels) of one inner fold: generators fitted before its labels."""
        cfg = self.config
        before, labels = inner_split(interactions, cfg.inner_fraction, fold)
        inner = self._fit_generators(before, items)
        features = self._candidate_features(inner, before, items)
        positive = labels.filter(pl.col("value") >= cfg.positive_threshold)
        users = np.unique(positive["user_id"].to_numpy())
        users = users[np.isin(users, before["user_id"].unique().to_numpy())]
        cuts = labels.group_by("user_id").agg(pl.col("event_timestamp").min()).join(
            pl.DataFrame({"user_id": users}), on="user_id", how="right"
        )
        cut_times = naive_utc(cuts.sort("user_id")["event_timestamp"])
        scored = self._pool_features(inner, features, before, users, cut_times)
        pool, features = scored.pool, scored.features
        target = InteractionMatrix.build(positive, self.item_ids)
        label_rows = np.asarray(target.matrix[target.rows(users)].todense()) > 0
        pool_labels = np.take_along_axis(label_rows, pool, 1)
        keep = pool_labels.any(1)
        return features[keep], pool_labels[keep]

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        cfg = self.config
        folds = [self._fold_examples(interactions, items, f) for f in range(cfg.inner_folds)]
        features = np.concatenate([f for f, _ in folds])
        labels = np.concatenate([y for _, y in folds])
        with torch_threads(cfg.threads):
            fitted = [
                fit_scorer(features, labels, replace(cfg, seed=cfg.seed + b))
                for b in range(cfg.bag)
            ]
        self.scorer = ScorerBag([model for model, _ in fitted])
        self.history = fitted[0][1]
        self.fitted = self._fit_generators(interactions, items)
        self.features = self._candidate_features(self.fitted, interactions, items)
        self.interactions = interactions

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.scorer is not None and self.features is not None
        scored = self._pool_features(self.fitted, self.features, self.interactions, user_ids,
                                     as_of)
        with torch_threads(self.config.threads), torch.no_grad():
            scored.scores = self.scorer(torch.from_numpy(scored.features)).numpy().astype(
                np.float64)
        self.last_pool = scored
        return scored.catalogue_scores(self.explore, self.depth)

    def set_exploration(self, slots: int, depth: int) -> None:
        """Serve ``slots`` new items in the last places of the top ``depth`` from now on."""
        if not 0 <= slots <= depth:
            raise ValueError(f"need 0 <= slots <= depth, got {slots} and {depth}")
        self.explore, self.depth = slots, depth

    @property
    def can_explore(self) -> bool:
        """Whether new items can reach the pool at all (through a content generator)."""
        return CONTENT in self.factories

    def rescore(self, explore: int, depth: int | None = None) -> np.ndarray:
        """The last ``score`` call's users again with ``explore`` slots in the top ``depth``
        (default: the model's), without recomputing anything."""
        if self.last_pool is None:
            raise RuntimeError("rescore() needs a score() call first")
        return self.last_pool.catalogue_scores(explore, depth or self.depth)
