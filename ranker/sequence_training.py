"""Training the sequential model: next-item sampled softmax over every position, AdamW, early
stopping on the held-out NDCG@10 of each user's last events, best weights kept."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from avrec.ranker.sequence_data import (
    PAD,
    UserSequences,
    holdout_sizes,
    left_pad,
    length_batches,
    training_windows,
)
from avrec.ranker.sequence_encoder import SequenceEncoder
from avrec.ranker.training import BestWeights

if TYPE_CHECKING:
    from avrec.ranker.sequential import SequentialConfig


@dataclass
class SequentialHistory:
    """Per-epoch training loss and held-out NDCG@10; the epoch whose weights were kept."""

    train_loss: list[float] = field(default_factory=list)
    heldout_ndcg: list[float] = field(default_factory=list)
    best_epoch: int = -1


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
