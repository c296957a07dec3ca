"""The hybrid's per-user generator outputs, kept for the user's next request.

Of one served hybrid answer, about half the work depends on the user's history alone: every
generator's scores over the whole catalogue, their ranks, the "recent" query scores
(:meth:`avrec.ranker.hybrid_pipeline.HybridPipeline.pool`) and the features' per-user parts
(:class:`avrec.ranker.hybrid_features.UserParts`: profile vectors, nearest-history vectors,
genre profile). A user who asks again (a second
page, another shelf, a refresh) with the same history gets them from here; item statistics,
the candidates and the clock are applied afresh at each request, so an answer from the cache
equals the one computed anew (``tests/ranker/test_user_score_cache.py``).

Entries are keyed by the history's own bytes (item columns and ratings), so a new event makes
a new key and a stale entry is never read; the least recently used entries leave first. The
cache belongs to one binding of the pipeline (its columns and scorers): a new binding starts
empty.

>>> cache = UserScoreCache(entries=2)
>>> key = cache.key(np.array([3, 5]), np.array([4.0, 5.0]))
>>> cache.get(key) is None
True
>>> cache.put(key, GeneratorOutputs([np.zeros((1, 4))], [np.arange(4)[None]], [], []))
>>> cache.get(key).ranks[0].tolist(), cache.get(key).ranks[0].dtype
([[0, 1, 2, 3]], dtype('int16'))
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from avrec.ranker.hybrid_features import UserParts

RANK_TYPE = np.int16  # ranks are at most RANK_DEPTH (1,000): kept in 2 bytes, not 8


@dataclass(frozen=True)
class GeneratorOutputs:
    """Users' generator outputs over the catalogue (``[users, items]`` each): scores, ranks,
    the recent-positives query scores, and the mean and standard deviation of the scores then
    the query scores over each user's unseen items (``[users, 1]`` each)."""

    scores: list[np.ndarray]
    ranks: list[np.ndarray]
    queries: list[np.ndarray]
    moments: list[tuple[np.ndarray, np.ndarray]]
    parts: UserParts | None = None  # the features' per-user parts (profile vectors, ...)

    def arrays(self) -> list[np.ndarray]:
        parts = self.parts.arrays() if self.parts is not None else []
        return [*self.scores, *self.ranks, *self.queries, *(a for m in self.moments for a in m),
                *parts]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())

    def compact(self) -> GeneratorOutputs:
        """The same outputs with ranks in :data:`RANK_TYPE`, every array read-only (what the
        cache stores and later requests share)."""
        if any(r.size and r.max() > np.iinfo(RANK_TYPE).max for r in self.ranks):
            raise ValueError(f"ranks beyond {np.iinfo(RANK_TYPE).max} do not fit {RANK_TYPE}")
        stored = GeneratorOutputs(self.scores, [r.astype(RANK_TYPE) for r in self.ranks],
                                  self.queries, self.moments, self.parts)
        for array in stored.arrays():
            array.setflags(write=False)
        return stored



class UserScoreCache:
    """A bounded, thread-safe LRU of :class:`GeneratorOutputs` by history."""

    def __init__(self, entries: int) -> None:
        if entries < 0:
            raise ValueError("entries must be >= 0 (0: no cache)")
        self.entries = entries
        self._items: OrderedDict[bytes, GeneratorOutputs] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(columns: np.ndarray, values: np.ndarray) -> bytes:
        """A digest of one history (catalogue columns and ratings, in order)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.ascontiguousarray(columns, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(values, dtype=np.float64).tobytes())
        return digest.digest()

    def get(self, key: bytes) -> GeneratorOutputs | None:
        """The outputs stored under ``key`` (read-only, ranks in :data:`RANK_TYPE`), or None."""
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
        return found

    def put(self, key: bytes, outputs: GeneratorOutputs) -> None:
        """Store ``outputs`` (the least recently used entry leaves when full)."""
        if not self.entries:
            return
        compact = outputs.compact()
        with self._lock:
            self._items[key] = compact
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored arrays."""
        with self._lock:
            return sum(o.nbytes for o in self._items.values())
