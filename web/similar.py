"""Nearest neighbours of an item by text, by image and by mixed vectors: the offline vector
tables the service itself is built from (``item_encodings``: MiniLM text and poster vectors;
``item_embeddings``: the mixed, gated-fusion vectors), loaded on first use."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from avrec import tables
from avrec.encoders.neighbours import EmbeddingIndex, EmbeddingSource
from avrec.names import ITEM_EMBEDDINGS_TABLE

KINDS = ("text", "image", "mixed")


@dataclass(frozen=True)
class VectorTables:
    """Where each kind's vectors live (defaults: the offline tables)."""

    encodings: Path
    embeddings: Path

    @classmethod
    def offline(cls, root: Path | None = None) -> VectorTables:
        return cls(tables.table_path("item_encodings", root),
                   tables.table_path(ITEM_EMBEDDINGS_TABLE, root))

    def source(self, kind: str) -> EmbeddingSource:
        if kind == "mixed":
            return EmbeddingSource("mixed", "embedding", self.embeddings)
        return EmbeddingSource(kind, f"{kind}_embedding", self.encodings)


@dataclass(frozen=True)
class Neighbours:
    kind: str
    items: list[tuple[int, float]]
    missing: str | None = None  # why there are none, for the page


class Similar:
    """One lazily loaded index per kind; a kind whose table is missing says so."""

    def __init__(self, vectors: VectorTables) -> None:
        self.vectors = vectors
        self._indexes: dict[str, EmbeddingIndex | str] = {}
        self._lock = threading.Lock()

    def _index(self, kind: str) -> EmbeddingIndex | str:
        with self._lock:
            if kind not in self._indexes:
                source = self.vectors.source(kind)
                if not Path(source.table).exists():
                    self._indexes[kind] = f"no {kind} vectors ({Path(source.table).name} missing)"
                else:
                    try:
                        self._indexes[kind] = EmbeddingIndex.from_source(source)
                    except KeyError:
                        self._indexes[kind] = f"no {kind} vectors in {Path(source.table).name}"
            return self._indexes[kind]

    def neighbours(self, item_id: int, k: int = 6) -> list[Neighbours]:
        rows = []
        for kind in KINDS:
            index = self._index(kind)
            if isinstance(index, str):
                rows.append(Neighbours(kind, [], index))
                continue
            found = index.neighbours(item_id, k)
            rows.append(Neighbours(kind, found, None if found else f"this item has no {kind} "
                                                                   "vector"))
        return rows
