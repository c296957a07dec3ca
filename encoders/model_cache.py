"""Exported encoder models on disk, keyed by a hash of their source weights.

Layout: ``<data_dir>/models/encoders/<slug>-<sha256[:16]>-v<ENCODER_VERSION>/model.onnx``.
A model whose weights (or avrec's export recipe version) change gets a new directory, so a
rerun with the same sources finds the export and does not redo it.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from pathlib import Path

from avrec import config
from avrec.encoders import ENCODER_VERSION

MODEL_FILE = "model.onnx"

# metadata_props keys written into every exported encoder
META_MODEL_NAME = "model_name"
META_ENCODER_ID = "encoder_id"
META_OUTPUT_NAME = "output_name"
META_OUTPUT_DIM = "output_dim"
META_PREPROCESSING = "preprocessing"
META_SOURCE_HASH = "source_sha256"
META_SOURCE_FILES = "source_files"
META_VERSION = "avrec_encoder_version"
META_PARITY_MAX_ABS = "parity_max_abs_diff"
META_PARITY_MIN_COS = "parity_min_cosine"
REQUIRED_METADATA = (
    META_MODEL_NAME,
    META_ENCODER_ID,
    META_OUTPUT_NAME,
    META_OUTPUT_DIM,
    META_PREPROCESSING,
    META_SOURCE_HASH,
    META_VERSION,
)


@functools.cache
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime)."""
    stat = path.stat()
    return _file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


def sources_sha256(paths: Sequence[Path]) -> str:
    """One hash over several source files (names and contents, in the given order)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(bytes.fromhex(file_sha256(path)))
    return digest.hexdigest()


def cache_root(root: Path | None = None) -> Path:
    """Directory holding exported encoders (default ``<data_dir>/models/encoders``)."""
    return Path(root) if root is not None else config.data_dir() / "models" / "encoders"


def model_path(slug: str, source_hash: str, root: Path | None = None) -> Path:
    """Where the export of ``slug`` built from sources hashing to ``source_hash`` lives."""
    return cache_root(root) / f"{slug}-{source_hash[:16]}-v{ENCODER_VERSION}" / MODEL_FILE


def encoder_id(slug: str, source_hash: str) -> str:
    """Versioned encoder name stored next to every embedding, e.g. ``slug:1a2b3c4d5e6f:v1``."""
    return f"{slug}:{source_hash[:12]}:v{ENCODER_VERSION}"
