"""Candidates from the whole catalogue: an ANN index over the item tower's vectors (faiss HNSW).

:class:`CandidateIndex` is built from an :class:`avrec.server.item_snapshot.ItemSnapshot` (the item
tower runs over every item's vector and behaviour features), so it is rebuilt whenever the
snapshot is, i.e. whenever embeddings or item features are re-materialized. A query is the user
tower's unit vector; the score is the inner product.

Example::

    index = CandidateIndex.build(models, snapshot)
    rows, scores = index.search(models.user_vector(user), k=200, exclude=seen_rows)
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its INFO lines tell CPU probing
import faiss  # noqa: E402

if TYPE_CHECKING:
    from avrec.server.item_snapshot import ItemSnapshot
    from avrec.server.models import ServingModels

HNSW_NEIGHBOURS = 32
EF_CONSTRUCTION = 80
EF_SEARCH = 256


@dataclass
class CandidateIndex:
    """A faiss HNSW (inner product) index whose ids are snapshot rows."""

    index: faiss.Index
    vectors: np.ndarray

    @classmethod
    def build(cls, models: ServingModels, snapshot: ItemSnapshot) -> CandidateIndex:
        """Run the item tower over the snapshot and index the result."""
        assert models.tower_encoder is not None
        dense = snapshot.dense_for(models.tower_encoder)
        vectors = models.item_vectors(snapshot.vectors, dense)
        return cls.from_vectors(vectors)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray) -> CandidateIndex:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_CONSTRUCTION
        index.hnsw.efSearch = EF_SEARCH
        index.add(vectors)
        return cls(index, vectors)

    def search(
        self, query: np.ndarray, k: int, exclude: Collection[int] = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` snapshot rows nearest to ``query`` (best first) and their scores,
        leaving out the rows in ``exclude``."""
        k = max(0, min(k, self.index.ntotal - len(exclude)))
        if k == 0:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        wanted = min(self.index.ntotal, k + len(exclude))
        params = faiss.SearchParametersHNSW(efSearch=max(EF_SEARCH, wanted))
        scores, rows = self.index.search(query.reshape(1, -1).astype(np.float32), wanted,
                                         params=params)
        keep = [(r, s) for r, s in zip(rows[0], scores[0], strict=True)
                if r >= 0 and int(r) not in exclude][:k]
        if not keep:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        out_rows, out_scores = zip(*keep, strict=True)
        return np.asarray(out_rows, np.int64), np.asarray(out_scores, np.float32)
