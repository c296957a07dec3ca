"""Embed the catalogue (``avrec embed``): item text and posters to ``offline/item_encodings``.

Incremental by content: every row stores the hash of the composed item text and of the poster
file's bytes, and the versioned encoder that produced each embedding. A rerun re-embeds only
items whose text/poster hash or encoder changed and keeps every other row as it was (including
its timestamps). Items without a poster, and posters that cannot be read or decoded (a warning
is logged and they are counted), get a null ``image_embedding`` and ``has_image = False``, never
a zero vector.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from avrec import commands, tables
from avrec.commands import Subparsers
from avrec.encoders import item_text
from avrec.onnx_runtime import THREADS_ENV

log = logging.getLogger(__name__)

TABLE = "item_encodings"
BACKENDS = ("minilm", "e5")
ITEM_ENCODINGS_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.Int64(),
    "text_embedding": pl.List(pl.Float32()),  # 384-d, L2-normalised
    "image_embedding": pl.List(pl.Float32()),  # 1280-d pooled features; null without a poster
    "has_image": pl.Boolean(),
    "text_hash": pl.Utf8(),  # sha256 of the composed item text
    "image_hash": pl.Utf8(),  # sha256 of the poster bytes; null when there is no file
    "text_encoder": pl.Utf8(),  # e.g. "all-minilm-l6-v2:9624b3f6a1ae:v1"
    "image_encoder": pl.Utf8(),  # null when there is no poster file
    "event_timestamp": tables.TS,  # when this row's encodings were computed
    "created_timestamp": tables.TS,  # when this row was written
}


@dataclass(frozen=True)
class EmbedReport:
    """What one run did. ``*_embedded`` were computed now, ``*_reused`` kept from the previous
    table; ``unreadable_images`` counts items whose ``image_path`` is set but whose file could
    not be read or decoded (they count in ``without_image``)."""

    out_path: Path
    items: int
    text_embedded: int
    text_reused: int
    image_embedded: int
    image_reused: int
    with_image: int
    without_image: int
    unreadable_images: int
    removed: int
    text_encoder: str
    text_dim: int
    image_encoder: str
    image_dim: int
    seconds: float

    def summary(self) -> str:
        """A few human-readable lines."""
        return "\n".join(
            [
                f"item encodings: {self.items} items -> {self.out_path} ({self.seconds:.1f} s)",
                f"  text  [{self.text_encoder}, {self.text_dim}-d]: "
                f"{self.text_embedded} embedded, {self.text_reused} reused",
                f"  image [{self.image_encoder}, {self.image_dim}-d]: "
                f"{self.image_embedded} embedded, {self.image_reused} reused; "
                f"{self.with_image} with image, {self.without_image} without "
                f"({self.unreadable_images} of them with an unreadable image file)",
                f"  removed (no longer in the catalogue): {self.removed}",
            ]
        )


def _load_text_backend(backend: str, cache_dir: Path | None, threads: int):
    if backend == "minilm":
        from avrec.encoders.text_encoder import TextEncoder

        return TextEncoder.load(cache_dir, threads=threads)
    if backend == "e5":
        from avrec.encoders.multilingual import E5TextEncoder

        return E5TextEncoder.load(cache_dir, threads=threads)
    raise ValueError(f"unknown text backend {backend!r}; expected one of {BACKENDS}")


def _batch_threads(threads: int | None) -> int:
    """Threads for a batch job: explicit, else ``AVREC_ORT_THREADS``, else all cores."""
    if threads:
        return threads
    if os.environ.get(THREADS_ENV, "").strip():
        return int(os.environ[THREADS_ENV])
    return os.cpu_count() or 1


def _image_hashes(paths: list[str | None]) -> tuple[list[str | None], dict[int, str]]:
    """SHA-256 of each poster file; unreadable files get ``None`` and an entry in the dict."""
    hashes: list[str | None] = []
    unreadable: dict[int, str] = {}
    for row, path in enumerate(paths):
        if not path:
            hashes.append(None)
            continue
        try:
            hashes.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except OSError as exc:
            hashes.append(None)
            unreadable[row] = f"{type(exc).__name__}: {exc.strerror or exc}"
            log.warning("unreadable image %s: %s (treated as missing)", path, unreadable[row])
    return hashes, unreadable


class _Previous:
    """The previous table's values, aligned to the current items (``None`` where absent)."""

    def __init__(self, frame: pl.DataFrame | None, ids: list[int]) -> None:
        self.frame = frame
        self.ids = ids
        index: dict[int, int] = {}
        if frame is not None:
            index = {item_id: row for row, item_id in enumerate(frame["item_id"].to_list())}
        self.rows = [index.get(i) for i in ids]
        self.text_hash = self._aligned("text_hash")
        self.text_encoder = self._aligned("text_encoder")
        self.image_hash = self._aligned("image_hash")
        self.image_encoder = self._aligned("image_encoder")
        self.has_image = self._aligned("has_image")
        self.event_timestamp = self._aligned("event_timestamp")
        self.created_timestamp = self._aligned("created_timestamp")

    @classmethod
    def read(cls, out_path: Path, ids: list[int]) -> _Previous:
        if not out_path.exists():
            return cls(None, ids)
        frame = pl.read_parquet(out_path)
        missing = set(ITEM_ENCODINGS_SCHEMA) - set(frame.columns)
        if missing:
            log.warning("%s lacks columns %s; re-embedding everything", out_path, sorted(missing))
            return cls(None, ids)
        return cls(frame.select(list(ITEM_ENCODINGS_SCHEMA)).cast(ITEM_ENCODINGS_SCHEMA), ids)

    def _aligned(self, column: str) -> list:
        if self.frame is None:
            return [None] * len(self.ids)
        values = self.frame[column].to_list()
        return [values[r] if r is not None else None for r in self.rows]

    def has(self, k: int) -> bool:
        """Whether current item ``k`` has a row in the previous table."""
        return self.rows[k] is not None

    def vectors(self, column: str, ks: list[int]) -> np.ndarray:
        """Previous (non-null) embeddings of current items ``ks`` as a float32 matrix."""
        if self.frame is None:
            raise ValueError("no previous table")
        picked = self.frame[column].gather([self.rows[k] for k in ks])
        dim = picked.list.len().max()
        return picked.list.to_array(int(dim)).to_numpy().astype(np.float32, copy=False)

    def stale(self) -> pl.DataFrame:
        """Rows of items that are not in the current items frame."""
        if self.frame is None:
            return pl.DataFrame(schema=ITEM_ENCODINGS_SCHEMA)
        return self.frame.filter(~pl.col("item_id").is_in(self.ids))


def _validate(items: pl.DataFrame) -> pl.DataFrame:
    for column in ("item_id", "title", "image_path"):
        if column not in items.columns:
            raise ValueError(f"items frame lacks column {column!r}")
    items = items.with_columns(pl.col("item_id").cast(pl.Int64))
    if items["item_id"].null_count():
        raise ValueError("items frame has null item_id")
    if items["item_id"].is_duplicated().any():
        dupes = items.filter(pl.col("item_id").is_duplicated())["item_id"].unique().to_list()
        raise ValueError(f"items frame has duplicate item_id: {dupes[:10]}")
    if items.height == 0:
        raise ValueError("items frame is empty")
    return items.sort("item_id")


def run_embed(
    items: pl.DataFrame | None = None,
    out_path: str | Path | None = None,
    backend: str = "minilm",
    batch_size: int = 64,
    progress: bool = True,
    *,
    image_batch_size: int = 16,
    threads: int | None = None,
    cache_dir: Path | None = None,
    prune: bool = True,
) -> EmbedReport:
    """Embed new/changed items and write ``offline/item_encodings.parquet``.

    ``items`` defaults to the offline ``items`` table; ``cache_dir`` is the exported-model
    cache (default ``<data_dir>/models/encoders``); ``prune=False`` keeps rows of items that
    are not in ``items`` (for partial runs).
    """
    from avrec.encoders.image_encoder import ImageEncoder

    started = time.perf_counter()
    items = _validate(items if items is not None else tables.read_table("items"))
    out_path = Path(out_path) if out_path is not None else tables.table_path(TABLE)
    threads = _batch_threads(threads)
    text_model = _load_text_backend(backend, cache_dir, threads)
    image_model = ImageEncoder.load(cache_dir, threads=threads)

    ids = items["item_id"].to_list()
    texts = item_text.item_texts(items)
    text_hashes = [item_text.text_hash(t) for t in texts]
    paths = items["image_path"].to_list()
    image_hashes, unreadable = _image_hashes(paths)

    prev = _Previous.read(out_path, ids)
    text_todo = [
        k
        for k in range(len(ids))
        if not prev.has(k)
        or prev.text_hash[k] != text_hashes[k]
        or prev.text_encoder[k] != text_model.name
    ]
    image_todo = [
        k
        for k in range(len(ids))
        if image_hashes[k] is not None
        and (
            not prev.has(k)
            or prev.image_hash[k] != image_hashes[k]
            or prev.image_encoder[k] != image_model.name
        )
    ]
    todo_images = set(image_todo)
    image_reuse = [
        k for k in range(len(ids)) if image_hashes[k] is not None and k not in todo_images
    ]

    text_matrix = np.zeros((len(ids), text_model.dim), dtype=np.float32)
    image_matrix = np.zeros((len(ids), image_model.dim), dtype=np.float32)
    has_image = np.zeros(len(ids), dtype=bool)
    todo_texts = set(text_todo)
    text_matrix_reuse = [k for k in range(len(ids)) if k not in todo_texts]
    if text_matrix_reuse:
        text_matrix[text_matrix_reuse] = prev.vectors("text_embedding", text_matrix_reuse)
    image_vectors_reuse = [k for k in image_reuse if prev.has_image[k]]
    if image_vectors_reuse:
        image_matrix[image_vectors_reuse] = prev.vectors("image_embedding", image_vectors_reuse)
        has_image[image_vectors_reuse] = True

    if text_todo:
        text_matrix[text_todo] = text_model.encode(
            [texts[k] for k in text_todo], batch_size=batch_size, progress=progress
        )
    if image_todo:
        result = image_model.encode_files(
            [paths[k] for k in image_todo], batch_size=image_batch_size, progress=progress
        )
        for local, vector in enumerate(result.embeddings):
            if vector is not None:
                image_matrix[image_todo[local]] = vector
                has_image[image_todo[local]] = True
        unreadable.update({image_todo[local]: why for local, why in result.failures.items()})

    now = datetime.now(UTC)
    changed = todo_texts | todo_images
    changed.update(
        k for k in range(len(ids)) if not prev.has(k) or prev.image_hash[k] != image_hashes[k]
    )
    frame = pl.DataFrame(
        {
            "item_id": pl.Series(ids, dtype=pl.Int64),
            "text_embedding": pl.Series(text_matrix).cast(pl.List(pl.Float32)),
            "image_embedding": pl.Series(image_matrix).cast(pl.List(pl.Float32)),
            "has_image": pl.Series(has_image),
            "text_hash": pl.Series(text_hashes, dtype=pl.Utf8),
            "image_hash": pl.Series(image_hashes, dtype=pl.Utf8),
            "text_encoder": [text_model.name] * len(ids),
            "image_encoder": [image_model.name if h else None for h in image_hashes],
            "event_timestamp": [
                now if k in changed else prev.event_timestamp[k] for k in range(len(ids))
            ],
            "created_timestamp": [
                now if k in changed else prev.created_timestamp[k] for k in range(len(ids))
            ],
        },
        schema=ITEM_ENCODINGS_SCHEMA,
    ).with_columns(
        pl.when(pl.col("has_image")).then(pl.col("image_embedding")).alias("image_embedding")
    )

    stale = prev.stale()
    if not prune:
        frame = pl.concat([frame, stale])
    frame = frame.sort("item_id")
    _write(frame, out_path)

    with_image = int(has_image.sum())
    return EmbedReport(
        out_path=out_path,
        items=len(ids),
        text_embedded=len(text_todo),
        text_reused=len(ids) - len(text_todo),
        image_embedded=len(image_todo) - sum(1 for k in image_todo if k in unreadable),
        image_reused=len(image_reuse),
        with_image=with_image,
        without_image=len(ids) - with_image,
        unreadable_images=sum(1 for k in range(len(ids)) if paths[k] and not has_image[k]),
        removed=stale.height if prune else 0,
        text_encoder=text_model.name,
        text_dim=text_model.dim,
        image_encoder=image_model.name,
        image_dim=image_model.dim,
        seconds=time.perf_counter() - started,
    )


def _write(frame: pl.DataFrame, out_path: Path) -> None:
    """Write atomically (temp file + rename) so readers never see a half-written table."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, out_path)


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """``avrec embed``: embed the catalogue's text and posters into the offline table."""
    parser = subparsers.add_parser("embed", description=register.__doc__)
    parser.add_argument("--items", type=Path, help="items parquet (default: offline items table)")
    parser.add_argument("--out", type=Path, help="output parquet (default: offline item_encodings)")
    parser.add_argument("--backend", choices=BACKENDS, default="minilm", help="text encoder")
    parser.add_argument("--batch-size", type=int, default=64, help="text batch size")
    parser.add_argument("--image-batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="embed only the first N items (quick runs)")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: all cores)")
    parser.add_argument("--model-cache", type=Path, help="exported-model cache directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``avrec embed`` with its parsed options."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    items = pl.read_parquet(args.items) if args.items else tables.read_table("items")
    if args.limit is not None:
        items = items.sort("item_id").head(args.limit)
    report = run_embed(
        items,
        args.out,
        backend=args.backend,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        image_batch_size=args.image_batch_size,
        threads=args.threads,
        cache_dir=args.model_cache,
        prune=args.limit is None,
    )
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``avrec embed`` from ``argv`` (tests, ``python -m avrec.encoders.embed_job``)."""
    return commands.main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
