"""Where avrec keeps things: data directory, offline tables, Redis URL, datasets.

Every location can be moved with an environment variable, so the same code runs from a
clean clone, in CI and on a server:

- ``AVREC_DATA_DIR``: offline tables, registry, models (default ``<repo>/data``).
- ``AVREC_DATASETS``: the raw datasets (default ``<repo>/../shared/datasets``, or that of the
  local checkout the repo was cloned from).
- ``REDIS_URL``: the online store (default ``redis://127.0.0.1:6379/0``).
"""

from __future__ import annotations

import os
import subprocess
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


def _origin_checkout() -> Path | None:
    """The local checkout this repository was cloned from, if it was cloned from a path."""
    try:
        url = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "config", "--get", "remote.origin.url"],
            capture_output=True, text=True, timeout=5, check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    origin = Path(url.removeprefix("file://"))
    return origin.resolve() if url and origin.is_absolute() and origin.is_dir() else None


def datasets_dir() -> Path:
    """Raw datasets (MovieLens, posters): ``$AVREC_DATASETS``, else ``shared/datasets`` beside
    the checkout, else beside the local checkout it was cloned from (a scratch clone in
    ``/tmp`` of a checkout that sits next to ``shared/``). Without any, the first is returned
    and readers report it missing."""
    if "AVREC_DATASETS" in os.environ:
        return Path(os.environ["AVREC_DATASETS"]).resolve()
    beside = (REPO_ROOT.parent / "shared" / "datasets").resolve()
    if beside.is_dir():
        return beside
    origin = _origin_checkout()
    if origin is not None and (origin.parent / "shared" / "datasets").is_dir():
        return (origin.parent / "shared" / "datasets").resolve()
    return beside


def redis_url() -> str:
    """URL of the online store's Redis."""
    return os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
