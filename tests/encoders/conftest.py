"""Encoder fixtures: real MovieLens items and posters, ONNX exports made once per session.

Items are built here straight from ``movies.csv``/``tags.csv`` (ITEMS_SCHEMA), so the encoder
tests do not depend on the ingest. Exports go to a session temporary model cache.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pytest

from avrec import config, tables

DATASETS = config.datasets_dir()
MOVIELENS = DATASETS / "ml-latest-small"
POSTERS = DATASETS / "posters"
_YEAR = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")


def movielens_items(ids: Sequence[int] | None = None) -> pl.DataFrame:
    """Real MovieLens items in ITEMS_SCHEMA (``ids`` selects, default all)."""
    if not MOVIELENS.is_dir():
        pytest.fail(f"dataset missing: {MOVIELENS} (see shared/datasets/README.md)")
    movies = pl.read_csv(MOVIELENS / "movies.csv", schema_overrides={"movieId": pl.Int64})
    if ids is not None:
        movies = movies.filter(pl.col("movieId").is_in(list(ids)))
    tags = (
        pl.read_csv(MOVIELENS / "tags.csv", schema_overrides={"movieId": pl.Int64})
        .group_by("movieId", "tag")
        .len()
        .sort(["movieId", "len", "tag"], descending=[False, True, False])
        .group_by("movieId", maintain_order=True)
        .agg(pl.col("tag").alias("tags"))
    )
    tag_map = dict(zip(tags["movieId"].to_list(), tags["tags"].to_list(), strict=True))
    rows = []
    for movie_id, raw_title, genres in movies.iter_rows():
        match = _YEAR.match(raw_title.strip())
        title, year = (match["title"], int(match["year"])) if match else (raw_title.strip(), None)
        poster = POSTERS / f"{movie_id}.jpg"
        rows.append(
            {
                "item_id": movie_id,
                "title": title,
                "year": year,
                "genres": [g for g in genres.split("|") if g != "(no genres listed)"],
                "tags": tag_map.get(movie_id, []),
                "description": None,
                "image_path": str(poster) if poster.is_file() else None,
            }
        )
    return pl.DataFrame(rows, schema=tables.ITEMS_SCHEMA).sort("item_id")


def poster_paths(n: int) -> list[Path]:
    """The first ``n`` real posters (sorted by movie id)."""
    found = sorted(POSTERS.glob("*.jpg"), key=lambda p: int(p.stem))[:n]
    if len(found) < n:
        pytest.fail(f"need {n} posters under {POSTERS}, found {len(found)}")
    return found


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh exported-model cache for this test session."""
    return tmp_path_factory.mktemp("encoder-cache")


@pytest.fixture(scope="session")
def text_onnx(model_cache_dir: Path) -> Path:
    """all-MiniLM-L6-v2 exported once per session (the export checks parity itself)."""
    from avrec.encoders import text_encoder

    return text_encoder.onnx_path(model_cache_dir)


@pytest.fixture(scope="session")
def image_onnx(model_cache_dir: Path) -> Path:
    """EfficientNet-Lite0 exported once per session."""
    from avrec.encoders import image_encoder

    return image_encoder.onnx_path(model_cache_dir)


@pytest.fixture(scope="session")
def text_torch():
    from avrec.encoders.onnx_export import torch_text_model

    return torch_text_model()


@pytest.fixture(scope="session")
def image_torch():
    from avrec.encoders.onnx_export import torch_image_model

    return torch_image_model()


@pytest.fixture(scope="session")
def catalogue() -> pl.DataFrame:
    """All real MovieLens items (9,742), built once."""
    return movielens_items()
