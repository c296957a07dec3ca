"""A sequential recommender over each user's whole history (SASRec-style, causal attention).

Why: the deep ranker sees a user through the last 20 items and a few counts, while ALS and
EASE read the whole history. Here a causal self-attention encoder reads up to
``max_length`` items (oldest to newest, each with its rating) and its last position is the
user vector; an item's score is the dot product of that vector with the item's vector.

Item vectors (:class:`avrec.ranker.sequence_encoder.ItemEmbedding`) are an ID embedding **plus** a
projection of the item's content vector (the mixed embedding, or text / image / a-sum; or no
content at all). Items without interactions in the fit data have no trained ID: they are scored
through their content alone. Training drops each item's ID with probability ``id_dropout``
(DropoutNet-style) so the content path learns to stand on its own.

Training (:func:`avrec.ranker.sequence_training.fit_sequences`): every position predicts the next
item of the same user with a sampled softmax over ``negatives`` items drawn uniformly per batch
(accidental hits masked; all items when the catalogue is smaller), AdamW, early stopping on the
last ``holdout_fraction`` of each user's fit events (full-catalogue NDCG@10 of those held-out
items ranked from the events before them), best weights kept. Everything is seeded. The data
side (histories, windows, padding) is :mod:`avrec.ranker.sequence_data`.

    >>> import polars as pl
    >>> rows = pl.DataFrame({
    ...     "user_id": [1, 1, 1, 2, 2, 2], "item_id": [10, 20, 30, 10, 20, 30],
    ...     "value": [5.0] * 6,
    ...     "event_timestamp": pl.datetime_range(
    ...         pl.datetime(2020, 1, 1), pl.datetime(2020, 1, 6), "1d", eager=True,
    ...     ).head(6)})
    >>> model = SequentialRecommender(SequentialConfig(epochs=2, dim=8)).fit(
    ...     rows, pl.DataFrame({"item_id": [10, 20, 30, 40]}))
    >>> model.score([1, 2]).shape
    (2, 4)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl
import torch

from avrec.ranker.features import VectorSource, resolve_vectors
from avrec.ranker.recommender import Recommender
from avrec.ranker.sequence_data import UserSequences, left_pad
from avrec.ranker.sequence_encoder import ItemEmbedding, SequenceEncoder
from avrec.ranker.sequence_training import SequentialHistory, fit_sequences
from avrec.ranker.training import torch_threads


@dataclass
class SequentialConfig:
    """Model size and optimisation; sizes follow the data where it matters (see ``fit``)."""

    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_length: int = 200
    dropout: float = 0.5
    id_dropout: float = 0.2  # chance an item's ID vector is dropped in a batch (content only)
    negatives: int = 1024
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs: int = 60
    patience: int = 10  # epochs without a better held-out NDCG@10 before stopping
    holdout_fraction: float = 0.1  # each user's last events that early-stop training
    use_ids: bool = True
    seed: int = 0
    threads: int = 1  # one thread: deterministic reductions, and faster for models this small


class SequentialRecommender(Recommender):
    """The sequential model behind the :class:`Recommender` interface (full-catalogue scores).

    ``vectors``: a fixed :class:`ItemVectors` table, a factory fitted on the stage's
    interactions (e.g. the learned fusion), or None for an ID-only model.
    """

    name = "sequential"

    def __init__(
        self,
        config: SequentialConfig | None = None,
        vectors: VectorSource | None = None,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(seed)
        self.config = config or SequentialConfig(seed=seed)
        self.vectors = vectors
        self.name = name or self.name
        self.encoder: SequenceEncoder | None = None
        self.sequences: UserSequences | None = None
        self.history = SequentialHistory()
        self.warm = np.empty(0, dtype=bool)

    def _content(self, interactions: pl.DataFrame, items: pl.DataFrame) -> tuple[Any, Any]:
        n = self.item_ids.size + 1
        if self.vectors is None:
            return torch.zeros(n, 0), torch.zeros(n)
        table = resolve_vectors(self.vectors, interactions, items)
        rows = table.rows(self.item_ids)
        content = np.zeros((n, table.dim), dtype=np.float32)
        content[1:][rows >= 0] = table.vectors[rows[rows >= 0]]
        scale = np.linalg.norm(content, axis=1, keepdims=True)
        content = np.divide(content, scale, out=np.zeros_like(content), where=scale > 0)
        has = np.concatenate([[0.0], (rows >= 0).astype(np.float32)])
        return torch.from_numpy(content), torch.from_numpy(has.astype(np.float32))

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        self.sequences = UserSequences.build(interactions, self.item_ids)
        counts = np.bincount(self.sequences.index, minlength=self.item_ids.size + 1)
        self.warm = counts[1:] > 0
        content, has_content = self._content(interactions, items)
        id_allowed = torch.from_numpy(np.concatenate([[0.0], self.warm]).astype(np.float32))
        embedding = ItemEmbedding(content, has_content, id_allowed, cfg.dim, cfg.use_ids)
        if self.vectors is None:  # nothing to fall back on: an ID-only model drops no IDs
            cfg = replace(cfg, id_dropout=0.0)
        with torch_threads(cfg.threads):
            self.encoder, self.history = fit_sequences(
                SequenceEncoder(embedding, cfg), self.sequences, cfg, rng
            )

    def _known(self, user_ids: np.ndarray) -> np.ndarray:
        assert self.sequences is not None
        return self.sequences.rows(user_ids) >= 0

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.encoder is not None and self.sequences is not None
        rows = self.sequences.rows(user_ids)
        with torch_threads(self.config.threads):
            return score_users(self.encoder, self.sequences, rows, self.config.max_length)


@torch.no_grad()
def score_users(
    encoder: SequenceEncoder, sequences: UserSequences, rows: np.ndarray, max_length: int,
    block: int = 256,
) -> np.ndarray:
    """``[len(rows), n_items]`` scores: user vector (newest position) . item vector."""
    encoder.eval()
    table = encoder.items.table()[1:]
    out = []
    for start in range(0, rows.size, block):
        part = [sequences.of(int(r)) for r in rows[start : start + block]]
        index = torch.from_numpy(left_pad([p[0] for p in part], max_length))
        rating = torch.from_numpy(left_pad([p[1] for p in part], max_length))
        out.append((encoder.user_vectors(index, rating) @ table.T).numpy().astype(np.float64))
    return np.concatenate(out) if out else np.empty((0, table.shape[0]))
