"""Nearest neighbours and genre agreement on real encodings; an extra ("mixed") source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from avrec.encoders import neighbours
from avrec.encoders.embed_job import run_embed
from avrec.encoders.neighbours import EmbeddingIndex, EmbeddingSource, genre_agreement

from .conftest import movielens_items

# Toy Story, its sequels, other animation, Heat and crime films, Alien and sci-fi/horror, others
IDS = [
    1,
    3114,
    78499,
    2355,
    364,
    588,
    595,
    6,
    16,
    47,
    50,
    111,
    1214,
    1200,
    1320,
    2288,
    260,
    1196,
    2,
    3,
    4,
    5,
    7,
    11,
    17,
    21,
    25,
    32,
    34,
    36,
]


@pytest.fixture(scope="module")
def items() -> pl.DataFrame:
    return movielens_items(IDS)


@pytest.fixture(scope="module")
def encodings(items, model_cache_dir, text_onnx, image_onnx, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nb") / "item_encodings.parquet"
    run_embed(items, out, progress=False, cache_dir=model_cache_dir)
    return out


def test_text_neighbours_of_toy_story(encodings: Path) -> None:
    index = EmbeddingIndex.from_source(neighbours.DEFAULT_SOURCES[0], encodings)
    assert len(index) == len(IDS)
    top = [item for item, _ in index.neighbours(1, k=3)]
    assert 3114 in top and 78499 in top  # Toy Story 2 and 3
    sims = [cos for _, cos in index.neighbours(1, k=len(IDS) - 1)]
    assert sims == sorted(sims, reverse=True) and 1 not in [i for i, _ in index.neighbours(1)]


def test_image_index_skips_items_without_poster(items: pl.DataFrame, encodings: Path) -> None:
    index = EmbeddingIndex.from_source(neighbours.DEFAULT_SOURCES[1], encodings)
    assert len(index) == items["image_path"].is_not_null().sum()
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, atol=1e-5)


def test_genre_agreement_can_tell_signal_from_noise() -> None:
    """Vectors that encode the genre agree perfectly; random vectors agree like random pairs."""
    genres = {i: [["Drama"], ["Comedy"], ["Horror"], ["Sci-Fi"]][i % 4] for i in range(400)}
    onehot = np.eye(4, dtype=np.float32)[np.arange(400) % 4] + 0.01 * np.random.default_rng(
        0
    ).normal(size=(400, 4)).astype(np.float32)
    ids = np.arange(400)
    signal = genre_agreement(EmbeddingIndex("signal", ids, onehot), genres, k=5)
    assert signal.knn_share == 1.0 and signal.knn_jaccard == 1.0
    assert signal.random_share == pytest.approx(0.25, abs=0.03)
    noise = np.random.default_rng(1).normal(size=(400, 16)).astype(np.float32)
    random = genre_agreement(EmbeddingIndex("noise", ids, noise), genres, k=5)
    assert random.knn_share == pytest.approx(0.25, abs=0.06)


def test_real_text_beats_random_pairs(items: pl.DataFrame, encodings: Path) -> None:
    genres = dict(zip(items["item_id"].to_list(), items["genres"].to_list(), strict=True))
    index = EmbeddingIndex.from_source(neighbours.DEFAULT_SOURCES[0], encodings)
    result = genre_agreement(index, genres, k=3)
    assert result.knn_share > result.random_share and result.lift > 1.2


def test_extra_source_joined_by_item_id(items, encodings: Path, tmp_path: Path) -> None:
    """A third kind ("mixed") in its own table is just another source."""
    enc = pl.read_parquet(encodings)
    mixed = enc.select("item_id", pl.col("text_embedding").alias("mixed_embedding")).reverse()
    path = tmp_path / "fusion.parquet"
    mixed.write_parquet(path)
    source = EmbeddingSource("mixed", "mixed_embedding", path)
    index = EmbeddingIndex.from_source(source)
    text = EmbeddingIndex.from_source(neighbours.DEFAULT_SOURCES[0], encodings)
    got, expected = index.neighbours(1, 3), text.neighbours(1, 3)
    assert [i for i, _ in got] == [i for i, _ in expected]
    assert [c for _, c in got] == pytest.approx([c for _, c in expected], abs=1e-6)
    report = neighbours.neighbours_report(items, [text, index], ["Toy Story"], k=2, agreement_k=3)
    assert "  mixed:" in report and "Toy Story 2 (1999)" in report


def test_main(items: pl.DataFrame, encodings: Path, tmp_path: Path, capsys) -> None:
    items_path = tmp_path / "items.parquet"
    items.write_parquet(items_path)
    argv = [
        "--items",
        str(items_path),
        "--encodings",
        str(encodings),
        "-k",
        "3",
        "--agreement-k",
        "3",
        "--source",
        f"mixed={encodings}:text_embedding",
    ]
    assert neighbours.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("Toy Story (1995)")
    for part in ("Heat (1995)", "Alien (1979)", "  text:", "  image:", "  mixed:", "lift"):
        assert part in out
    assert (
        neighbours.main(
            [
                "Nonexistent Film",
                "--items",
                str(items_path),
                "--encodings",
                str(encodings),
                "--no-agreement",
            ]
        )
        == 0
    )
    assert "not in the catalogue" in capsys.readouterr().out
    assert neighbours.main(["--items", str(items_path), "--encodings", str(tmp_path / "x")]) == 2
