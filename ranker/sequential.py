"""A sequential recommender over each user's whole history (SASRec-style, causal attention).

Why: the deep ranker sees a user through the last 20 items and a few counts, while ALS and
EASE read the whole history. Here a causal self-attention encoder reads up to
``max_length`` items (oldest to newest, each with its rating) and its last position is the
user vector; an item's score is the dot product of that vector with the item's vector.

Item vectors (:class:`ItemEmbedding`) are an ID embedding **plus** a projection of the item's
content vector (the mixed embedding, or text / image / a-sum; or no content at all). Items
without interactions in the fit data have no trained ID: they are scored through their
content alone. Training drops each item's ID with probability ``id_dropout`` (DropoutNet-style)
so the content path learns to stand on its own.

Training (:func:`fit_sequences`): every position predicts the next item of the same user with
a sampled softmax over ``negatives`` items drawn uniformly per batch (accidental hits masked;
all items when the catalogue is smaller), AdamW, early stopping on the last
``holdout_fraction`` of each user's fit events (full-catalogue NDCG@10 of those held-out items
ranked from the events before them), best weights kept. Everything is seeded.

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

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from ranker.features import VectorSource, resolve_vectors
from ranker.recommender import Recommender
from ranker.training import BestWeights, torch_threads

PAD = 0  # item index 0 is padding; catalogue item j is index j + 1
RATING_BUCKETS = 11  # 0: no value; 1..10: half-star ratings 0.5..5 (other values are clipped)


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


@dataclass
class SequentialHistory:
    """Per-epoch training loss and held-out NDCG@10; the epoch whose weights were kept."""

    train_loss: list[float] = field(default_factory=list)
    heldout_ndcg: list[float] = field(default_factory=list)
    best_epoch: int = -1


class ItemEmbedding(nn.Module):
    """``vector(j) = id_j * keep_j + W content_j + b_has_content``.

    ``content`` is a fixed ``[n_items + 1, c]`` table (row 0: padding; rows without content
    are zeros, told apart by ``has_content``); ``id_allowed`` marks items whose ID may be used
    (those with fit interactions). Without content (``c = 0``) only IDs are used.

    >>> emb = ItemEmbedding(torch.zeros(4, 3), torch.tensor([0, 1, 1, 0.]),
    ...                     torch.tensor([0, 1, 1, 0.]), dim=8)
    >>> emb(torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 8])
    """

    def __init__(
        self,
        content: torch.Tensor,
        has_content: torch.Tensor,
        id_allowed: torch.Tensor,
        dim: int,
        use_ids: bool = True,
    ) -> None:
        super().__init__()
        n = content.shape[0]
        self.register_buffer("content", content.float())
        self.register_buffer("has_content", has_content.float())
        self.register_buffer("id_allowed", id_allowed.float() if use_ids else torch.zeros(n))
        self.ids = nn.Embedding(n, dim, padding_idx=PAD)
        nn.init.normal_(self.ids.weight, std=0.02)
        with torch.no_grad():
            self.ids.weight[PAD].zero_()
        self.project = nn.Linear(content.shape[1], dim) if content.shape[1] else None
        self.content_flag = nn.Parameter(torch.zeros(2, dim))

    def forward(self, index: torch.Tensor, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of item indices (any shape); ``id_keep`` optionally masks IDs per item."""
        keep = self.id_allowed[index]
        if id_keep is not None:
            keep = keep * id_keep[index]
        out = self.ids(index) * keep.unsqueeze(-1)
        flag = self.has_content[index].long()
        out = out + self.content_flag[flag]
        if self.project is not None:
            out = out + self.project(self.content[index]) * self.has_content[index].unsqueeze(-1)
        return out

    def table(self) -> torch.Tensor:
        """``[n_items + 1, dim]`` vectors of every index (row 0 is padding)."""
        return self.forward(torch.arange(self.content.shape[0]))


class CausalBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention then a feed-forward layer."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, d]``; ``mask`` ``[B, 1, L, L]`` True where attention is allowed."""
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, d // self.heads).unbind(2)
        attended = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            dropout_p=self.dropout.p if self.training else 0.0,
        )
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(b, length, d)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SequenceEncoder(nn.Module):
    """Left-padded item sequences (+ rating buckets) -> one hidden vector per position.

    Positions are counted from the most recent item (0 = newest), so a short history and the
    tail of a long one share their embeddings.
    """

    def __init__(self, items: ItemEmbedding, config: SequentialConfig) -> None:
        super().__init__()
        d = config.dim
        self.items = items
        self.ratings = nn.Embedding(RATING_BUCKETS, d)
        self.positions = nn.Embedding(config.max_length, d)
        self.blocks = nn.ModuleList(
            CausalBlock(d, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, index: torch.Tensor, ratings: torch.Tensor, id_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, L]`` item indices and rating buckets -> ``[B, L, d]``."""
        length = index.shape[1]
        recency = torch.arange(length - 1, -1, -1, device=index.device)
        x = self.items(index, id_keep) + self.ratings(ratings) + self.positions(recency)
        x = self.dropout(x)
        valid = index != PAD
        causal = torch.ones(length, length, dtype=torch.bool, device=index.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=index.device)
        mask = (causal & valid[:, None, :]) | eye  # a pad attends to itself only: no NaN rows
        for block in self.blocks:
            x = block(x, mask[:, None])
        return self.norm(x)

    def user_vectors(self, index: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
        """``[B, d]``: the newest position of each (left-padded) sequence."""
        return self.forward(index, ratings)[:, -1]


def rating_buckets(values: np.ndarray) -> np.ndarray:
    """Half-star buckets 1..10 for ratings in [0.5, 5]; 0 for missing values."""
    values = np.asarray(values, dtype=np.float64)
    buckets = np.clip(np.rint(values * 2), 1, 10)
    return np.where(np.isfinite(values), buckets, 0).astype(np.int64)


@dataclass(frozen=True)
class UserSequences:
    """Every user's fit history as item indices and rating buckets, oldest first."""

    user_ids: np.ndarray  # sorted
    offsets: np.ndarray  # user u's events are [offsets[u], offsets[u + 1])
    index: np.ndarray  # item index (catalogue position + 1)
    ratings: np.ndarray

    @classmethod
    def build(cls, interactions: pl.DataFrame, item_ids: np.ndarray) -> UserSequences:
        """From interactions (any event type) ordered by time, then item id."""
        frame = interactions.sort(["user_id", "event_timestamp", "item_id"])
        users, starts = np.unique(frame["user_id"].to_numpy(), return_index=True)
        index = np.searchsorted(item_ids, frame["item_id"].to_numpy()) + 1
        value = frame["value"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        offsets = np.append(starts, frame.height).astype(np.int64)
        return cls(users.astype(np.int64), offsets, index.astype(np.int64), rating_buckets(value))

    def of(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[row], self.offsets[row + 1]
        return self.index[lo:hi], self.ratings[lo:hi]

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Row of each user, -1 when the user has no history."""
        pos = np.clip(np.searchsorted(self.user_ids, user_ids), 0, max(self.user_ids.size - 1, 0))
        found = self.user_ids[pos] == user_ids if self.user_ids.size else np.zeros(0, bool)
        return np.where(found, pos, -1)


def left_pad(rows: list[np.ndarray], length: int) -> np.ndarray:
    """Right-aligned ``[len(rows), length]`` int64 array (the newest item last), zero padded."""
    out = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        tail = row[-length:]
        if tail.size:
            out[i, length - tail.size :] = tail
    return out


def training_windows(
    sequences: UserSequences, max_length: int, held: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Windows of ``max_length + 1`` events tiling each user's history from the newest end,
    without each user's last ``held[user]`` events (they early-stop training)."""
    items, ratings = [], []
    for row in range(sequences.user_ids.size):
        index, rating = sequences.of(row)
        keep = index.size - int(held[row])
        index, rating = index[:keep], rating[:keep]
        end = index.size
        while end >= 2:
            start = max(0, end - max_length - 1)
            items.append(index[start:end])
            ratings.append(rating[start:end])
            end = start + 1 if start > 0 else 0
    return items, ratings


def sampled_softmax_loss(
    hidden: torch.Tensor, targets: torch.Tensor, item_table: torch.Tensor,
    negatives: torch.Tensor | None,
) -> torch.Tensor:
    """Mean cross-entropy of each valid position's next item.

    ``negatives`` (item indices, shared by the batch) or, when None, every item: the softmax is
    over the target and the negatives, with negatives equal to the target masked out.
    """
    valid = targets != PAD
    h, t = hidden[valid], targets[valid]
    positive = (h * item_table[t]).sum(-1, keepdim=True)
    if negatives is None:
        logits = h @ item_table[1:].T
        return nn.functional.cross_entropy(logits, t - 1)
    negative = h @ item_table[negatives].T
    negative = negative.masked_fill(negatives[None, :] == t[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


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


def holdout_sizes(sequences: UserSequences, fraction: float) -> np.ndarray:
    """Events held out at the end of each user's history: ``round(fraction * n)``, at least 1
    while at least one event stays as input (users with one event hold out nothing)."""
    n = np.diff(sequences.offsets)
    return np.where(n >= 2, np.clip(np.rint(n * fraction), 1, n - 1), 0).astype(np.int64)


def heldout_ndcg(
    encoder: SequenceEncoder, sequences: UserSequences, held: np.ndarray, max_length: int,
    k: int = 10,
) -> float:
    """Mean NDCG@k of each user's held-out last events, ranked from the events before them
    (over the whole catalogue, items of the input excluded)."""
    rows = np.flatnonzero(held > 0)
    if rows.size == 0:
        return 0.0
    table = encoder.items.table()[1:]
    k = min(k, table.shape[0])  # a catalogue smaller than k ranks all of it
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values = []
    encoder.eval()
    for start in range(0, rows.size, 256):
        chunk = rows[start : start + 256]
        cut = sequences.offsets[chunk + 1] - held[chunk]
        spans = [(sequences.offsets[r], c) for r, c in zip(chunk, cut, strict=True)]
        inputs = [sequences.index[lo:hi] for lo, hi in spans]
        buckets = [sequences.ratings[lo:hi] for lo, hi in spans]
        index = torch.from_numpy(left_pad(inputs, max_length))
        rating = torch.from_numpy(left_pad(buckets, max_length))
        with torch.no_grad():
            scores = (encoder.user_vectors(index, rating) @ table.T).numpy()
        for i, r in enumerate(chunk):
            scores[i, inputs[i] - 1] = -np.inf
            relevant = np.setdiff1d(sequences.index[cut[i] : sequences.offsets[r + 1]] - 1,
                                    inputs[i] - 1)
            if relevant.size == 0:
                continue
            top = np.argpartition(-scores[i], k - 1)[:k]
            top = top[np.argsort(-scores[i, top], kind="stable")]
            gains = np.isin(top, relevant) @ discounts
            values.append(gains / discounts[: min(relevant.size, k)].sum())
    return float(np.mean(values)) if values else 0.0


def length_batches(
    sizes: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 16
) -> list[np.ndarray]:
    """Shuffled batches of windows of similar length (sorted within pools of ``pool`` batches),
    so a batch is trimmed to its longest window instead of ``max_length``."""
    order = rng.permutation(sizes.size)
    batches = []
    for start in range(0, order.size, batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort(sizes[chunk], kind="stable")]
        batches.extend(np.array_split(chunk, max(1, math.ceil(chunk.size / batch_size))))
    return [batches[i] for i in rng.permutation(len(batches))]


def fit_sequences(
    encoder: SequenceEncoder, sequences: UserSequences, cfg: SequentialConfig,
    rng: np.random.Generator,
) -> tuple[SequenceEncoder, SequentialHistory]:
    """Train ``encoder`` on every user's next-item predictions; keep the best held-out epoch."""
    held = holdout_sizes(sequences, cfg.holdout_fraction)
    items, ratings = training_windows(sequences, cfg.max_length, held)
    length = cfg.max_length + 1
    all_items = left_pad(items, length)
    all_ratings = left_pad(ratings, length)
    sizes = np.array([w.size for w in items])
    n_items = encoder.items.content.shape[0] - 1
    optimiser = torch.optim.AdamW(encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = SequentialHistory()
    keeper = BestWeights(encoder, cfg.patience, higher_is_better=True)
    for _epoch in range(cfg.epochs):
        encoder.train()
        losses = []
        for batch in length_batches(sizes, cfg.batch_size, rng):
            width = int(sizes[batch].max())
            seq = torch.from_numpy(all_items[batch, -width:])
            rat = torch.from_numpy(all_ratings[batch, -width:])
            id_keep = torch.from_numpy(
                (rng.random(n_items + 1) >= cfg.id_dropout).astype(np.float32)
            )
            hidden = encoder(seq[:, :-1], rat[:, :-1], id_keep)
            table = encoder.items(torch.arange(n_items + 1), id_keep)
            negatives = None
            if cfg.negatives < n_items:
                negatives = torch.from_numpy(rng.integers(1, n_items + 1, cfg.negatives))
            loss = sampled_softmax_loss(hidden, seq[:, 1:], table, negatives)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        history.train_loss.append(float(np.mean(losses)) if losses else float("nan"))
        score = heldout_ndcg(encoder, sequences, held, cfg.max_length)
        history.heldout_ndcg.append(score)
        if keeper.update(score):
            break
    keeper.restore()
    history.best_epoch = keeper.best_epoch
    return encoder, history
