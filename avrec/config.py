"""Where avrec keeps things: data directory, offline tables, Redis URL, datasets.

Every location can be moved with an environment variable, so the same code runs from a
clean clone, in CI and on a server:

- ``AVREC_DATA_DIR``: offline tables, registry, models (default ``<repo>/data``).
- ``AVREC_DATASETS``: the raw datasets (default ``<repo>/../shared/datasets``).
- ``REDIS_URL``: the online store (default ``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FEATURE_REPO = REPO_ROOT / "feature_repo"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def data_dir() -> Path:
    """Root of everything avrec writes (absolute)."""
    return Path(os.environ.get("AVREC_DATA_DIR", REPO_ROOT / "data")).resolve()


def offline_dir() -> Path:
    """Directory of the offline Parquet tables that DuckDB and Feast read."""
    return data_dir() / "offline"


def registry_path() -> Path:
    """The SQLite file behind Feast's SQL registry."""
    return data_dir() / "registry.db"


def datasets_dir() -> Path:
    """Raw datasets (MovieLens, posters)."""
    return Path(
        os.environ.get("AVREC_DATASETS", REPO_ROOT.parent / "shared" / "datasets")
    ).resolve()


def redis_url() -> str:
    """URL of the online store's Redis."""
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
