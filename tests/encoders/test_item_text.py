"""Item text composition: natural titles, year, genres, tags; stable content hash."""

from __future__ import annotations

import polars as pl

from avrec.encoders import item_text

from .conftest import movielens_items


def test_display_title() -> None:
    assert item_text.display_title("Shawshank Redemption, The") == "The Shawshank Redemption"
    assert item_text.display_title("Bug's Life, A") == "A Bug's Life"
    assert (
        item_text.display_title("City of Lost Children, The (Cité des enfants perdus, La)")
        == "The City of Lost Children (Cité des enfants perdus, La)"
    )
    assert item_text.display_title("Crouching Tiger, Hidden Dragon (Wo hu cang long)") == (
        "Crouching Tiger, Hidden Dragon (Wo hu cang long)"
    )
    assert item_text.display_title("Toy Story") == "Toy Story"


def test_compose() -> None:
    text = item_text.compose(
        "Toy Story", 1995, ["Adventure", "Animation"], ["pixar", "Pixar", "fun"], None
    )
    assert text == "Toy Story (1995). Genres: Adventure, Animation. Tags: pixar, fun"
    assert item_text.compose("Untitled", None, ["(no genres listed)"], [], "  ") == "Untitled"
    many = item_text.compose("X", None, [], [f"t{i}" for i in range(20)])
    assert many.count(",") == item_text.MAX_TAGS - 1
    assert item_text.compose("X", 2001, [], [], "A heist.") == "X (2001). A heist."


def test_item_texts_on_real_items() -> None:
    items = movielens_items([1, 6, 1214])
    texts = item_text.item_texts(items)
    assert texts[0].startswith("Toy Story (1995). Genres: Adventure, Animation, Children")
    assert "pixar" in texts[0]
    assert texts[1].startswith("Heat (1995). Genres: Action, Crime, Thriller")
    assert texts[2].startswith("Alien (1979). Genres: Horror, Sci-Fi")
    no_optional = items.select("item_id", "title")
    assert item_text.item_texts(no_optional) == ["Toy Story", "Heat", "Alien"]


def test_text_hash_follows_content() -> None:
    items = movielens_items([1, 2])
    before = [item_text.text_hash(t) for t in item_text.item_texts(items)]
    changed = items.with_columns(
        pl.when(pl.col("item_id") == 2).then(pl.lit("Jumanji 2")).otherwise("title").alias("title")
    )
    after = [item_text.text_hash(t) for t in item_text.item_texts(changed)]
    assert before[0] == after[0] and before[1] != after[1]
    assert len(before[0]) == 64
