"""Nearest neighbours of items by cosine, and how often neighbours share a genre.

An embedding kind is an :class:`EmbeddingSource`: a ``List(Float32)`` column of a table keyed by
``item_id`` (default: ``offline/item_encodings``'s ``text_embedding`` and ``image_embedding``).
Another kind, e.g. fused ``"mixed"`` embeddings in their own table, is added by passing one
more source (``--source mixed=path/to/table.parquet:mixed_embedding`` on the command line).

Genre agreement: over all items that have an embedding and at least one genre, the share of
(item, k-nearest neighbour) pairs sharing at least one genre and their mean genre Jaccard,
against the same numbers for as many uniformly random pairs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from avrec import commands, tables
from avrec.commands import Subparsers
from avrec.encoders.item_text import display_title

DEFAULT_NAMES = ("Toy Story", "Heat", "Alien")
ENCODINGS_TABLE = "item_encodings"


@dataclass(frozen=True)
class EmbeddingSource:
    """One kind of embedding: ``column`` of ``table`` (frame or parquet path; None: encodings)."""

    kind: str
    column: str
    table: pl.DataFrame | Path | None = None


DEFAULT_SOURCES = (
    EmbeddingSource("text", "text_embedding"),
    EmbeddingSource("image", "image_embedding"),
)


@dataclass
class EmbeddingIndex:
    """L2-normalised vectors of the items that have this kind of embedding."""

    kind: str
    item_ids: np.ndarray
    vectors: np.ndarray

    @classmethod
    def from_source(
        cls, source: EmbeddingSource, encodings: pl.DataFrame | Path | None = None
    ) -> EmbeddingIndex:
        """Load ``source`` (its own table, else ``encodings``, else the offline table)."""
        table = source.table if source.table is not None else encodings
        if table is None:
            table = tables.table_path(ENCODINGS_TABLE)
        frame = table if isinstance(table, pl.DataFrame) else pl.read_parquet(table)
        if source.column not in frame.columns:
            raise KeyError(f"{source.kind}: no column {source.column!r} in its table")
        present = frame.select("item_id", source.column).filter(pl.col(source.column).is_not_null())
        column = present[source.column]
        if present.height == 0:
            return cls(source.kind, np.zeros(0, dtype=np.int64), np.zeros((0, 0), np.float32))
        dim = int(column.list.len().max())
        vectors = column.list.to_array(dim).to_numpy().astype(np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return cls(
            source.kind,
            present["item_id"].to_numpy().astype(np.int64),
            vectors / np.maximum(norms, 1e-12),
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def row_of(self, item_id: int) -> int | None:
        """Row of ``item_id``, or None when it has no embedding of this kind."""
        hits = np.flatnonzero(self.item_ids == item_id)
        return int(hits[0]) if len(hits) else None

    def neighbours(self, item_id: int, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` most cosine-similar other items as ``(item_id, cosine)``."""
        row = self.row_of(item_id)
        if row is None:
            return []
        sims = self.vectors @ self.vectors[row]
        sims[row] = -np.inf
        top = np.argsort(-sims, kind="stable")[:k]
        return [(int(self.item_ids[j]), float(sims[j])) for j in top]

    def knn(self, k: int, rows: np.ndarray | None = None, block: int = 1024) -> np.ndarray:
        """Row indices of the ``k`` nearest other items of each row in ``rows`` (default all)."""
        rows = np.arange(len(self)) if rows is None else rows
        out = np.zeros((len(rows), k), dtype=np.int64)
        for start in range(0, len(rows), block):
            chunk = rows[start : start + block]
            sims = self.vectors[chunk] @ self.vectors.T
            sims[np.arange(len(chunk)), chunk] = -np.inf
            part = np.argpartition(-sims, k, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
            out[start : start + len(chunk)] = np.take_along_axis(part, order, axis=1)
        return out


@dataclass(frozen=True)
class GenreAgreement:
    """Genre agreement of kNN pairs against random pairs for one embedding kind."""

    kind: str
    items: int
    k: int
    knn_share: float
    knn_jaccard: float
    random_share: float
    random_jaccard: float

    @property
    def lift(self) -> float:
        """kNN share / random share."""
        return self.knn_share / self.random_share if self.random_share else float("nan")


def _pair_stats(genre_sets: Sequence[frozenset[str]], a: np.ndarray, b: np.ndarray):
    shared = np.fromiter(
        (len(genre_sets[i] & genre_sets[j]) for i, j in zip(a, b, strict=True)), dtype=np.float64
    )
    union = np.fromiter(
        (len(genre_sets[i] | genre_sets[j]) for i, j in zip(a, b, strict=True)), dtype=np.float64
    )
    return float((shared > 0).mean()), float((shared / union).mean())


def genre_agreement(
    index: EmbeddingIndex, genres: Mapping[int, Sequence[str]], k: int = 10, seed: int = 0
) -> GenreAgreement:
    """Share of kNN pairs sharing >= 1 genre (and mean Jaccard) vs as many random pairs.

    Only items with at least one genre take part, as queries and as neighbours.
    """
    keep = np.array([bool(genres.get(int(i))) for i in index.item_ids], dtype=bool)
    sub = EmbeddingIndex(index.kind, index.item_ids[keep], index.vectors[keep])
    n = len(sub)
    if n <= k:
        raise ValueError(f"{index.kind}: {n} items with genres, need more than k={k}")
    genre_sets = [frozenset(genres[int(i)]) for i in sub.item_ids]
    neighbours = sub.knn(k)
    queries = np.repeat(np.arange(n), k)
    knn_share, knn_jaccard = _pair_stats(genre_sets, queries, neighbours.ravel())
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=n * k)
    b = (a + rng.integers(1, n, size=n * k)) % n
    random_share, random_jaccard = _pair_stats(genre_sets, a, b)
    return GenreAgreement(index.kind, n, k, knn_share, knn_jaccard, random_share, random_jaccard)


def find_item(items: pl.DataFrame, name: str) -> int | None:
    """Item id for a title: exact (case-insensitive, articles normalised), else prefix match.

    Among several matches the lowest ``item_id`` wins.
    """
    wanted = name.strip().lower()
    titles = [(t or "").lower() for t in items["title"].to_list()]
    shown = [display_title(t or "").lower() for t in items["title"].to_list()]
    ids = items["item_id"].to_list()
    for match in (
        lambda i: titles[i] == wanted or shown[i] == wanted,
        lambda i: titles[i].startswith(wanted) or shown[i].startswith(wanted),
    ):
        hits = [ids[i] for i in range(len(ids)) if match(i)]
        if hits:
            return min(hits)
    return None


def _label(info: Mapping[int, tuple[str, int | None, list[str]]], item_id: int) -> str:
    title, year, genres = info.get(item_id, (f"item {item_id}", None, []))
    when = f" ({year})" if year is not None else ""
    return f"{display_title(title)}{when}  [{'|'.join(genres) or '-'}]"


def neighbours_report(
    items: pl.DataFrame,
    indexes: Sequence[EmbeddingIndex],
    names: Sequence[str] = DEFAULT_NAMES,
    k: int = 5,
    agreement_k: int | None = 10,
) -> str:
    """Text report: neighbours of ``names`` per embedding kind, then genre agreement."""
    info = {
        row["item_id"]: (row["title"], row.get("year"), list(row.get("genres") or []))
        for row in items.iter_rows(named=True)
    }
    lines: list[str] = []
    for name in names:
        item_id = find_item(items, name)
        if item_id is None:
            lines.append(f"{name!r}: not in the catalogue")
            continue
        lines.append(f"{_label(info, item_id)}  (item {item_id})")
        for index in indexes:
            found = index.neighbours(item_id, k)
            if not found:
                lines.append(f"  {index.kind}: no {index.kind} embedding")
                continue
            lines.append(f"  {index.kind}:")
            lines.extend(f"    {cos:.3f}  {_label(info, other)}" for other, cos in found)
    if agreement_k:
        genres = {row["item_id"]: list(row["genres"] or []) for row in items.iter_rows(named=True)}
        lines.append("")
        lines.append(
            f"genre agreement of {agreement_k}-NN pairs vs random pairs (items with >= 1 genre)"
        )
        lines.append(
            f"  {'kind':<8}{'items':>7}{'kNN>=1':>9}{'rand>=1':>9}{'lift':>7}"
            f"{'kNN Jacc':>10}{'rand Jacc':>11}"
        )
        for index in indexes:
            g = genre_agreement(index, genres, agreement_k)
            lines.append(
                f"  {g.kind:<8}{g.items:>7}{g.knn_share:>9.3f}{g.random_share:>9.3f}"
                f"{g.lift:>7.2f}{g.knn_jaccard:>10.3f}{g.random_jaccard:>11.3f}"
            )
    return "\n".join(lines)


def _parse_source(spec: str) -> EmbeddingSource:
    kind, sep, rest = spec.partition("=")
    path, sep2, column = rest.rpartition(":")
    if not (sep and sep2 and kind and path and column):
        raise argparse.ArgumentTypeError(f"expected KIND=PATH:COLUMN, got {spec!r}")
    return EmbeddingSource(kind, column, Path(path))


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """``avrec neighbours``: nearest neighbours of named items and genre agreement."""
    parser = subparsers.add_parser("neighbours", description=register.__doc__)
    parser.add_argument("names", nargs="*", default=list(DEFAULT_NAMES), help="item titles")
    parser.add_argument("--encodings", type=Path, help="item_encodings parquet (default: offline)")
    parser.add_argument("--items", type=Path, help="items parquet (default: offline items)")
    parser.add_argument(
        "--kind",
        action="append",
        choices=["text", "image"],
        help="built-in kinds to show (default: both)",
    )
    parser.add_argument(
        "--source",
        action="append",
        type=_parse_source,
        default=[],
        metavar="KIND=PATH:COLUMN",
        help="another embedding kind, joined by item_id",
    )
    parser.add_argument("-k", type=int, default=5, help="neighbours shown per item")
    parser.add_argument("--agreement-k", type=int, default=10, help="k for genre agreement")
    parser.add_argument("--no-agreement", action="store_true")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``avrec neighbours`` with its parsed options."""
    items = pl.read_parquet(args.items) if args.items else tables.read_table("items")
    encodings = args.encodings or tables.table_path(ENCODINGS_TABLE)
    if not Path(encodings).exists():
        raise FileNotFoundError(f"{encodings} not found; run `avrec embed` first")
    kinds = set(args.kind or ["text", "image"])
    sources = [s for s in DEFAULT_SOURCES if s.kind in kinds] + args.source
    indexes = [EmbeddingIndex.from_source(s, encodings) for s in sources]
    agreement_k = None if args.no_agreement else args.agreement_k
    print(neighbours_report(items, indexes, args.names, args.k, agreement_k))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``avrec neighbours`` from ``argv`` (tests, ``python -m avrec.encoders.neighbours``)."""
    return commands.main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
