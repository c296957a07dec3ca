"""The sequential model's data: each user's history as item indices and rating buckets, the
left-padded windows it trains on, the held-out tail that early-stops it, and length-sorted
batches. Item index 0 is padding; catalogue item ``j`` is index ``j + 1``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

PAD = 0  # item index 0 is padding; catalogue item j is index j + 1
RATING_BUCKETS = 11  # 0: no value; 1..10: half-star ratings 0.5..5 (other values are clipped)


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


def holdout_sizes(sequences: UserSequences, fraction: float) -> np.ndarray:
    """Events held out at the end of each user's history: ``round(fraction * n)``, at least 1
    while at least one event stays as input (users with one event hold out nothing)."""
    n = np.diff(sequences.offsets)
    return np.where(n >= 2, np.clip(np.rint(n * fraction), 1, n - 1), 0).astype(np.int64)


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
