"""Train the fusion contrastively on co-consumed items, and measure it against one modality.

**Signal.** Item2vec-style pairs: two items a user rated positively (rating >= 4) one after
the other in their time-ordered history, at most ``max_gap`` apart. Pairs used for training
have both events strictly before the cutoff; held-out pairs have both events at or after it.

**Objective.** Symmetric InfoNCE with in-batch negatives and a fixed temperature: the mixed
embedding of one item of a pair must pick its partner out of the batch. Rows whose item equals
the positive (popular items recur within a batch) are masked out as negatives. Both fusions are
trained the same way, seeded: the weighted sum (projections learned, ``a`` fixed; ``a`` chosen
on a validation slice, the last ``val_fraction`` of the pre-cutoff pairs) and the gated fusion.

**Why contrastive on co-consumption, not joint training with the ranker.** The mixed embedding
is a content representation shared by retrieval (nearest neighbours), the ranker and cold-start
items; trained once per cutoff against a cheap, label-free signal it is decoupled from any one
model, reusable, and the same vector is served everywhere. Joint training would tie it to one
ranker and its label split. Because the embedding only sees interactions before its cutoff
(stamped as its ``event_timestamp``), a ranker that evaluates on later data does not leak; a
ranker whose training split ends earlier can retrain this fusion with that cutoff.

**Evaluation.** Recall@k of the partner item among all items (either direction of each distinct
held-out pair, the query item excluded, ties counted against), for raw MiniLM text, raw
EfficientNet image features (only pairs and candidates with image), the weighted sum and the
gated fusion; popularity (pre-cutoff) as a reference. Genre agreement: share of 10-NN pairs
sharing a genre vs random pairs (:func:`encoders.neighbours.genre_agreement`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import torch
from torch.nn import functional as F

from avrec.errors import InputError
from encoders.fusion import IMAGE_DIM, D, GatedFusion, ItemFusionModel, WeightedSumFusion
from encoders.neighbours import EmbeddingIndex, genre_agreement

log = logging.getLogger(__name__)

RATING = "rating"
A_GRID = (0.3, 0.5, 0.7)
KS = (10, 50)
TEXT_RAW = "text-only (MiniLM raw)"
IMAGE_RAW = "image-only (EffNet raw)"


class NotEnoughDataError(InputError):
    """Too few events, pairs or items to train on."""


@dataclass(frozen=True)
class PairConfig:
    """Which consecutive events make a co-consumption pair."""

    min_rating: float = 4.0
    max_gap: timedelta = timedelta(hours=1)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by both fusions."""

    d: int = D
    epochs: int = 3
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 0.07
    seed: int = 0


@dataclass
class ItemFeatures:
    """Precomputed encodings of a catalogue, row-aligned (image rows are zeros where absent)."""

    item_ids: np.ndarray
    text: np.ndarray
    image: np.ndarray
    has_image: np.ndarray
    text_encoders: tuple[str, ...]
    image_encoders: tuple[str, ...]

    @classmethod
    def from_encodings(cls, encodings: pl.DataFrame) -> ItemFeatures:
        """From an ``item_encodings`` frame (sorted by ``item_id``)."""
        frame = encodings.sort("item_id")
        text_dim = int(frame["text_embedding"].list.len().max())
        text = frame["text_embedding"].list.to_array(text_dim).to_numpy().astype(np.float32)
        has_image = (
            frame["has_image"].fill_null(False) & frame["image_embedding"].is_not_null()
        ).to_numpy()
        image_dim = int(frame["image_embedding"].list.len().max() or IMAGE_DIM)
        image = np.zeros((frame.height, image_dim), dtype=np.float32)
        if has_image.any():
            present = frame.filter(pl.Series(has_image))["image_embedding"]
            image[has_image] = present.list.to_array(image_dim).to_numpy()
        return cls(
            item_ids=frame["item_id"].to_numpy().astype(np.int64),
            text=text,
            image=image,
            has_image=has_image.astype(bool),
            text_encoders=_distinct(frame["text_encoder"]),
            image_encoders=_distinct(frame["image_encoder"]),
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each id (``-1`` where the id has no encodings)."""
        pos = np.searchsorted(self.item_ids, item_ids)
        pos = np.clip(pos, 0, max(len(self.item_ids) - 1, 0))
        found = len(self.item_ids) > 0
        return np.where(found & (self.item_ids[pos] == item_ids), pos, -1)

    def tensors(self, rows: np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model inputs of ``rows``."""
        return (
            torch.from_numpy(self.text[rows]),
            torch.from_numpy(self.image[rows]),
            torch.from_numpy(self.has_image[rows]),
        )


def _distinct(column: pl.Series) -> tuple[str, ...]:
    return tuple(sorted(v for v in column.unique().to_list() if v))


def co_consumption_pairs(events: pl.DataFrame, config: PairConfig = PairConfig()) -> pl.DataFrame:
    """Consecutive positive ratings per user: ``item_a, item_b, first_at, second_at``.

    Each user's positive ratings are ordered by time (ties by ``item_id``); a pair is two
    neighbours in that order, distinct items, at most ``config.max_gap`` apart.
    """
    positive = events.filter(
        (pl.col("event_type") == RATING) & (pl.col("value") >= config.min_rating)
    ).sort(["user_id", "event_timestamp", "item_id"])
    return (
        positive.select(
            pl.col("item_id").shift(1).over("user_id").alias("item_a"),
            pl.col("item_id").alias("item_b"),
            pl.col("event_timestamp").shift(1).over("user_id").alias("first_at"),
            pl.col("event_timestamp").alias("second_at"),
        )
        .drop_nulls()
        .filter(
            (pl.col("item_a") != pl.col("item_b"))
            & (pl.col("second_at") - pl.col("first_at") <= config.max_gap)
        )
    )


def between(
    pairs: pl.DataFrame, start: datetime | None = None, end: datetime | None = None
) -> pl.DataFrame:
    """Pairs whose both events lie in ``[start, end)`` (open ends when None)."""
    keep = pl.lit(True)
    if start is not None:
        keep = keep & (pl.col("first_at") >= start)
    if end is not None:
        keep = keep & (pl.col("second_at") < end)
    return pairs.filter(keep)


def pair_rows(pairs: pl.DataFrame, features: ItemFeatures) -> np.ndarray:
    """``[m, 2]`` feature rows of the pairs whose both items have encodings."""
    a = features.rows(pairs["item_a"].to_numpy())
    b = features.rows(pairs["item_b"].to_numpy())
    keep = (a >= 0) & (b >= 0)
    return np.stack([a[keep], b[keep]], axis=1).astype(np.int64)


def info_nce(
    za: torch.Tensor, zb: torch.Tensor, a: torch.Tensor, b: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Symmetric InfoNCE of unit vectors ``za[i] <-> zb[i]``; same-item negatives masked."""
    logits = za @ zb.T / temperature
    eye = torch.eye(len(a), dtype=torch.bool)
    clash_ab = (b.unsqueeze(0) == b.unsqueeze(1)) | (b.unsqueeze(0) == a.unsqueeze(1))
    clash_ba = (a.unsqueeze(0) == a.unsqueeze(1)) | (a.unsqueeze(0) == b.unsqueeze(1))
    target = torch.arange(len(a))
    loss_ab = F.cross_entropy(logits.masked_fill(clash_ab & ~eye, float("-inf")), target)
    loss_ba = F.cross_entropy(logits.T.masked_fill(clash_ba & ~eye, float("-inf")), target)
    return (loss_ab + loss_ba) / 2


def fit(
    kind: str,
    features: ItemFeatures,
    pairs: np.ndarray,
    config: TrainConfig = TrainConfig(),
    a: float = 0.5,
) -> tuple[ItemFusionModel, list[float]]:
    """Train a fresh ``kind`` (``"asum"`` with ``a``, or ``"gated"``) on feature-row ``pairs``.

    Seeded by ``config.seed``: the same inputs give bit-identical weights. Returns the model
    (eval mode) and the mean loss of each epoch.
    """
    if len(pairs) < 2:
        raise NotEnoughDataError(f"need at least 2 training pairs, got {len(pairs)}")
    torch.manual_seed(config.seed)
    if kind == "asum":
        fusion: WeightedSumFusion | GatedFusion = WeightedSumFusion(a)
    elif kind == "gated":
        fusion = GatedFusion(config.d)
    else:
        raise ValueError(f"unknown fusion kind {kind!r}")
    dims = features.text.shape[1], features.image.shape[1]
    model = ItemFusionModel(fusion, config.d, *dims)
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    pair_tensor = torch.from_numpy(pairs)
    steps_per_epoch = max(1, len(pairs) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1
    )
    losses: list[float] = []
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(pairs), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = pair_tensor[order[step * config.batch_size : (step + 1) * config.batch_size]]
            a_rows, b_rows = batch[:, 0], batch[:, 1]
            za = model(*features.tensors(a_rows.numpy()))
            zb = model(*features.tensors(b_rows.numpy()))
            loss = info_nce(za, zb, a_rows, b_rows, config.temperature)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        losses.append(total / steps_per_epoch)
    return model.eval(), losses


def embed(model: ItemFusionModel, features: ItemFeatures, batch_size: int = 4096) -> np.ndarray:
    """Mixed embeddings of every catalogue row (torch eager)."""
    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            rows = slice(start, start + batch_size)
            parts.append(model(*features.tensors(rows)).numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.d), np.float32)


def unit(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def recall_at_k(
    scores_of: np.ndarray,
    pairs: np.ndarray,
    ks: Sequence[int] = KS,
    candidates: np.ndarray | None = None,
    block: int = 1024,
) -> dict[int, float]:
    """Recall@k of the partner of each distinct pair, both directions, among ``candidates``.

    ``scores_of`` is an ``[n, d]`` matrix of unit vectors (cosine ranking) or an ``[n]``
    vector of query-independent scores (e.g. popularity). The query item is never a
    candidate; candidates tied with the partner rank ahead of it.
    """
    n = len(scores_of)
    allowed = np.ones(n, dtype=bool) if candidates is None else candidates.astype(bool)
    distinct = np.unique(np.sort(pairs, axis=1), axis=0)
    queries = np.concatenate([distinct[:, 0], distinct[:, 1]])
    targets = np.concatenate([distinct[:, 1], distinct[:, 0]])
    if len(queries) == 0:
        return {k: float("nan") for k in ks}
    ranks = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), block):
        q, t = queries[start : start + block], targets[start : start + block]
        if scores_of.ndim == 1:
            sims = np.tile(scores_of.astype(np.float32), (len(q), 1))
        else:
            sims = scores_of[q] @ scores_of.T
        sims[:, ~allowed] = -np.inf
        sims[np.arange(len(q)), q] = -np.inf
        target_score = sims[np.arange(len(q)), t].copy()
        sims[np.arange(len(q)), t] = -np.inf
        ranks[start : start + len(q)] = (sims >= target_score[:, None]).sum(axis=1)
    return {k: float((ranks < k).mean()) for k in ks}


@dataclass(frozen=True)
class MethodMetrics:
    """One row of the metrics table."""

    method: str
    recall_all: dict[int, float]
    recall_image: dict[int, float]
    genre_knn_share: float
    genre_random_share: float
    genre_items: int

    @property
    def genre_lift(self) -> float:
        return self.genre_knn_share / self.genre_random_share if self.genre_random_share else 0.0


def evaluate(
    methods: Mapping[str, np.ndarray],
    features: ItemFeatures,
    pairs: np.ndarray,
    genres: Mapping[int, Sequence[str]],
    popularity: np.ndarray | None = None,
    ks: Sequence[int] = KS,
    image_only: Collection[str] = (),
) -> list[MethodMetrics]:
    """Recall@k on all pairs (all candidates) and on image pairs (image candidates), genre lift.

    ``methods`` maps a name to ``[n, d]`` vectors of every catalogue row; methods named in
    ``image_only`` have vectors only for rows with image and are scored on image pairs only.
    ``popularity`` (``[n]`` counts) adds a reference row without genre agreement.
    """
    has = features.has_image
    image_pairs = pairs[has[pairs[:, 0]] & has[pairs[:, 1]]] if len(pairs) else pairs
    nan = {k: float("nan") for k in ks}
    rows = []
    if popularity is not None:
        pop = popularity.astype(np.float64)
        rows.append(
            MethodMetrics(
                "popularity",
                recall_at_k(pop, pairs, ks),
                recall_at_k(pop, image_pairs, ks, has),
                float("nan"),
                float("nan"),
                0,
            )
        )
    for name, vectors in methods.items():
        vectors = unit(vectors)
        only_image = name in image_only
        recall_all = nan if only_image else recall_at_k(vectors, pairs, ks)
        keep = has if only_image else np.ones(len(features), dtype=bool)
        index = EmbeddingIndex(name, features.item_ids[keep], vectors[keep])
        agreement = genre_agreement(index, genres, k=10)
        rows.append(
            MethodMetrics(
                name,
                recall_all,
                recall_at_k(vectors, image_pairs, ks, has),
                agreement.knn_share,
                agreement.random_share,
                agreement.items,
            )
        )
    return rows


def metrics_table(rows: Sequence[MethodMetrics], title: str = "") -> str:
    """Fixed-width text table of ``rows``."""
    ks = sorted(next(iter(rows)).recall_all) if rows else list(KS)
    head = (
        f"{'method':<22}"
        + "".join(f"{'R@' + str(k) + ' all':>10}" for k in ks)
        + "".join(f"{'R@' + str(k) + ' img':>10}" for k in ks)
        + f"{'genre10NN':>11}{'random':>8}{'lift':>6}"
    )
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        cells = [r.recall_all[k] for k in ks] + [r.recall_image[k] for k in ks]
        genre = (
            f"{r.genre_knn_share:>11.3f}{r.genre_random_share:>8.3f}{r.genre_lift:>6.2f}"
            if r.genre_items
            else f"{'-':>11}{'-':>8}{'-':>6}"
        )
        lines.append(
            f"{r.method:<22}"
            + "".join(f"{'-':>10}" if np.isnan(c) else f"{c:>10.4f}" for c in cells)
            + genre
        )
    return "\n".join(lines)


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

    def to_json(self) -> dict:
        """JSON-ready summary (metrics, choice of ``a``, windows, settings)."""

        def rows(metrics: list[MethodMetrics]) -> list[dict]:
            return [
                {
                    "method": m.method,
                    "recall_all": {str(k): v for k, v in m.recall_all.items()},
                    "recall_image": {str(k): v for k, v in m.recall_image.items()},
                    "genre_knn_share": m.genre_knn_share,
                    "genre_random_share": m.genre_random_share,
                    "genre_lift": m.genre_lift,
                    "genre_items": m.genre_items,
                }
                for m in metrics
            ]

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
            "validation": rows(self.validation),
            "test": rows(self.test),
            "losses": self.losses,
            "train_config": asdict(self.config),
            "pair_config": {
                "min_rating": self.pair_config.min_rating,
                "max_gap_seconds": self.pair_config.max_gap.total_seconds(),
            },
            "seconds": self.seconds,
            "notes": self.notes,
        }


def _popularity(pairs: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(pairs.ravel(), minlength=n).astype(np.float64)


def fit_gated_fusion(
    events: pl.DataFrame,
    features: ItemFeatures,
    cutoff: datetime,
    *,
    config: TrainConfig = TrainConfig(),
    pair_config: PairConfig = PairConfig(),
) -> ItemFusionModel:
    """The gated fusion fitted on every pre-cutoff pair, alone: bit for bit the ``gated``
    model :func:`train_fusion` returns, without choosing ``a``, fitting the weighted sum or
    scoring anything (what a consumer of the mixed vectors needs: one fit instead of six)."""
    _, before = _pairs_before(events, cutoff, pair_config)
    return fit("gated", features, pair_rows(before, features), config)[0]


def _pairs_before(events: pl.DataFrame, cutoff: datetime, pair_config: PairConfig
                  ) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(all co-consumption pairs, those completed before ``cutoff``); NotEnoughDataError below 2."""
    pairs = co_consumption_pairs(events, pair_config)
    before = between(pairs, end=cutoff)
    if before.height < 2:
        raise NotEnoughDataError(
            f"{before.height} co-consumption pairs before {cutoff.isoformat()}")
    return pairs, before


def train_fusion(
    events: pl.DataFrame,
    features: ItemFeatures,
    items: pl.DataFrame,
    cutoff: datetime,
    *,
    a_grid: Sequence[float] = A_GRID,
    config: TrainConfig = TrainConfig(),
    pair_config: PairConfig = PairConfig(),
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
    pairs, before = _pairs_before(events, cutoff, pair_config)
    validation_start = before["second_at"].quantile(1.0 - val_fraction, "lower")
    train_part = pair_rows(between(before, end=validation_start), features)
    val_part = pair_rows(between(before, start=validation_start), features)
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

    grid: dict[float, dict[int, float]] = {}
    val_vectors: dict[str, np.ndarray] = {}
    for a in a_grid:
        model, _ = fit("asum", features, train_part, config, a)
        vectors = embed(model, features)
        grid[float(a)] = recall_at_k(unit(vectors), val_part)
        val_vectors[f"a-sum (a={a})"] = vectors
    best_a = max(grid, key=lambda a: (np.nan_to_num(grid[a][50], nan=-1.0), -abs(a - 0.5)))
    gated_val, _ = fit("gated", features, train_part, config)
    val_vectors["gated"] = embed(gated_val, features)
    validation = evaluate(
        {**raw, **val_vectors},
        features,
        val_part,
        genres,
        _popularity(train_part, len(features)),
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
            _popularity(fit_all, len(features)),
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
