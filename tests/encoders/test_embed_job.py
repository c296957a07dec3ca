"""The embed job on real items and posters: table contents, missing/corrupt images, increments."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from avrec.encoders import embed_job, item_text
from avrec.encoders.embed_job import ITEM_ENCODINGS_SCHEMA, run_embed
from avrec.encoders.image_encoder import ImageEncoder
from avrec.encoders.onnx_export import MIN_COSINE, compare
from avrec.encoders.text_encoder import TextEncoder

from .conftest import MOVIELENS, POSTERS, movielens_items


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> pl.DataFrame:
    """45 real items (15 without a poster); one poster swapped for a corrupt file, one pointing
    at a missing file."""
    tmp = tmp_path_factory.mktemp("bad-posters")
    corrupt = tmp / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg " * 20)
    movie_ids = pl.read_csv(MOVIELENS / "movies.csv")["movieId"].to_list()
    ids = [i for i in movie_ids if not (POSTERS / f"{i}.jpg").exists()][:15]
    base = movielens_items([*range(1, 31), *ids])
    with_poster = base.filter(pl.col("image_path").is_not_null())["item_id"].to_list()
    assert len(with_poster) >= 10 and base.height - len(with_poster) >= 3
    bad = {with_poster[0]: str(corrupt), with_poster[1]: str(tmp / "gone.jpg")}
    return base.with_columns(
        pl.col("item_id").replace_strict(bad, default=pl.col("image_path")).alias("image_path")
    )


@pytest.fixture(scope="module")
def first_run(items, model_cache_dir, text_onnx, image_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("encodings") / "item_encodings.parquet"
    report = run_embed(items, out, batch_size=16, progress=False, cache_dir=model_cache_dir)
    return report, out


def test_first_run_table(items: pl.DataFrame, first_run) -> None:
    report, out = first_run
    table = pl.read_parquet(out)
    assert table.schema == pl.Schema(ITEM_ENCODINGS_SCHEMA)
    assert table["item_id"].to_list() == items["item_id"].to_list()
    posters = items["image_path"].is_not_null().sum()
    assert report.text_embedded == items.height and report.text_reused == 0
    assert report.unreadable_images == 2
    assert report.image_embedded == posters - 2 == report.with_image
    assert report.without_image == items.height - report.with_image
    assert table["text_embedding"].list.len().unique().to_list() == [384]
    texts = np.stack(table["text_embedding"].to_list())
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    with_image = table.filter(pl.col("has_image"))
    assert with_image["image_embedding"].list.len().unique().to_list() == [1280]
    without = table.filter(~pl.col("has_image"))
    assert without["image_embedding"].null_count() == without.height  # null, never zeros
    assert table["text_encoder"].unique().to_list() == [report.text_encoder]
    now = datetime.now(UTC)
    assert (table["event_timestamp"] > now - timedelta(minutes=10)).all()
    assert table["event_timestamp"].dtype == pl.Datetime("us", "UTC")


def test_missing_and_corrupt_posters(items: pl.DataFrame, first_run) -> None:
    _, out = first_run
    table = pl.read_parquet(out).join(items.select("item_id", "image_path"), on="item_id")
    no_path = table.filter(pl.col("image_path").is_null())
    assert no_path.height >= 3
    assert not no_path["has_image"].any() and no_path["image_hash"].null_count() == no_path.height
    corrupt = table.filter(pl.col("image_path").str.ends_with("corrupt.jpg"))
    assert corrupt.height == 1 and not corrupt["has_image"][0]
    assert corrupt["image_hash"][0] is not None and corrupt["image_embedding"][0] is None
    gone = table.filter(pl.col("image_path").str.ends_with("gone.jpg"))
    assert gone.height == 1 and not gone["has_image"][0] and gone["image_hash"][0] is None


def test_table_matches_the_encoders(items, first_run, text_onnx, image_onnx) -> None:
    """Stored vectors are the encoders' outputs for the composed text and the poster."""
    _, out = first_run
    table = pl.read_parquet(out)
    texts = item_text.item_texts(items)
    assert table["text_hash"].to_list() == [item_text.text_hash(t) for t in texts]
    direct = TextEncoder(text_onnx).encode(texts)
    assert compare(np.stack(table["text_embedding"].to_list()), direct).min_cosine >= MIN_COSINE
    sample = table.filter(pl.col("has_image")).head(4).join(items, on="item_id")
    images = ImageEncoder(image_onnx).encode_files(sample["image_path"].to_list())
    parity = compare(np.stack(sample["image_embedding"].to_list()), np.stack(images.embeddings))
    assert parity.min_cosine >= MIN_COSINE


def test_rerun_embeds_only_what_changed(
    items: pl.DataFrame, first_run, model_cache_dir: Path, tmp_path: Path
) -> None:
    _, first_out = first_run
    out = tmp_path / "item_encodings.parquet"
    shutil.copy(first_out, out)
    before = pl.read_parquet(out)

    again = run_embed(items, out, progress=False, cache_dir=model_cache_dir)
    assert (again.text_embedded, again.image_embedded) == (0, 0)
    assert again.text_reused == items.height and again.removed == 0
    assert pl.read_parquet(out).equals(before)

    with_poster = items.filter(pl.col("image_path").str.starts_with(str(POSTERS)))["item_id"]
    retitled = with_poster[2:4].to_list()
    retagged = items.filter(~pl.col("item_id").is_in(with_poster))["item_id"][0]
    new_poster_item, poster_dropped = with_poster[4], with_poster[5]
    removed = with_poster[6]
    replacement = tmp_path / "other.jpg"
    shutil.copy(POSTERS / "1214.jpg", replacement)
    changed = (
        items.filter(pl.col("item_id") != removed)
        .with_columns(
            pl.when(pl.col("item_id").is_in(retitled))
            .then(pl.col("title") + " (Director's Cut)")
            .otherwise(pl.col("title"))
            .alias("title"),
            pl.when(pl.col("item_id") == retagged)
            .then(pl.col("tags").list.concat(pl.lit(["cult classic"])))
            .otherwise(pl.col("tags"))
            .alias("tags"),
            pl.when(pl.col("item_id") == new_poster_item)
            .then(pl.lit(str(replacement)))
            .when(pl.col("item_id") == poster_dropped)
            .then(pl.lit(None, dtype=pl.Utf8))
            .otherwise(pl.col("image_path"))
            .alias("image_path"),
        )
        .vstack(movielens_items([1214]))
    )
    report = run_embed(changed, out, progress=False, cache_dir=model_cache_dir)
    assert report.text_embedded == len(retitled) + 1 + 1  # retitled, retagged, new item
    assert report.image_embedded == 1 + 1  # replaced poster, new item's poster
    assert report.removed == 1
    after = pl.read_parquet(out)
    assert removed not in after["item_id"].to_list() and 1214 in after["item_id"].to_list()

    touched = {*retitled, retagged, new_poster_item, poster_dropped, 1214}
    old = before.filter(~pl.col("item_id").is_in(list(touched)) & (pl.col("item_id") != removed))
    kept = after.filter(pl.col("item_id").is_in(old["item_id"].to_list()))
    assert kept.equals(old)  # same vectors, hashes and timestamps
    fresh = after.filter(pl.col("item_id").is_in(list(touched)))
    assert (fresh["event_timestamp"] > before["event_timestamp"].max()).all()
    dropped = after.filter(pl.col("item_id") == poster_dropped).row(0, named=True)
    assert not dropped["has_image"] and dropped["image_embedding"] is None
    assert dropped["image_hash"] is None


def test_partial_run_keeps_other_rows(items, first_run, model_cache_dir, tmp_path) -> None:
    _, first_out = first_run
    out = tmp_path / "item_encodings.parquet"
    shutil.copy(first_out, out)
    report = run_embed(items.head(5), out, progress=False, cache_dir=model_cache_dir, prune=False)
    assert report.removed == 0 and report.text_reused == 5
    assert pl.read_parquet(out).equals(pl.read_parquet(first_out))


def test_cli(items, model_cache_dir, text_onnx, image_onnx, tmp_path, capsys) -> None:
    items_path = tmp_path / "items.parquet"
    items.write_parquet(items_path)
    out = tmp_path / "enc.parquet"
    argv = [
        "--items",
        str(items_path),
        "--out",
        str(out),
        "--limit",
        "6",
        "--no-progress",
        "--model-cache",
        str(model_cache_dir),
    ]
    assert embed_job.main(argv) == 0
    assert pl.read_parquet(out).height == 6
    assert "6 embedded" in capsys.readouterr().out
    assert embed_job.main(["--items", str(tmp_path / "nope.parquet")]) != 0
