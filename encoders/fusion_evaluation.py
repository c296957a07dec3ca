"""Score item vectors on held-out co-consumption pairs: Recall@k, genre agreement, the table.

Recall@k of the partner item among all items (either direction of each distinct held-out
pair, the query item excluded, ties counted against), for raw MiniLM text, raw EfficientNet
image features (only pairs and candidates with image), the weighted sum and the gated
fusion; popularity (pre-cutoff) as a reference. Genre agreement: share of 10-NN pairs
sharing a genre vs random pairs (:func:`avrec.encoders.neighbours.genre_agreement`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from avrec.encoders.neighbours import EmbeddingIndex, genre_agreement

if TYPE_CHECKING:
    from avrec.encoders.fusion_fit import ItemFeatures

KS = (10, 50)
TEXT_RAW = "text-only (MiniLM raw)"
IMAGE_RAW = "image-only (EffNet raw)"


def unit(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def pair_popularity(pairs: np.ndarray, n: int) -> np.ndarray:
    """How often each of ``n`` feature rows occurs in ``pairs`` (the reference scores)."""
    return np.bincount(pairs.ravel(), minlength=n).astype(np.float64)


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

    def to_json(self) -> dict[str, Any]:
        """JSON-ready row (recall keys as strings)."""
        return {
            "method": self.method,
            "recall_all": {str(k): v for k, v in self.recall_all.items()},
            "recall_image": {str(k): v for k, v in self.recall_image.items()},
            "genre_knn_share": self.genre_knn_share,
            "genre_random_share": self.genre_random_share,
            "genre_lift": self.genre_lift,
            "genre_items": self.genre_items,
        }


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
