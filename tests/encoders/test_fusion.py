"""Mixed embeddings: modules, ONNX parity, masking, seeding, the job's table, real neighbours.

The real-data fixtures ingest MovieLens into a temporary directory, embed its first
``SUBSET`` items with the real encoders (``avrec.encoders.embed_job``) and run ``avrec fuse`` on
them.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torch.nn import functional as F

from avrec.encoders import co_consumption, fusion, fusion_fit, fusion_training, mixed_job
from avrec.encoders.embed_job import run_embed
from avrec.encoders.fusion import ItemFusionModel
from avrec.encoders.neighbours import EmbeddingIndex
from avrec.encoders.onnx_export import MIN_COSINE
from avrec.ingest_movielens import ingest_movielens
from avrec.onnx_runtime import CPU_EP, OnnxModel

from .conftest import MOVIELENS, POSTERS

pytestmark = pytest.mark.slow  # real MovieLens items, posters and fusion training

SUBSET = 1000
CUTOFF = datetime(2015, 1, 1, tzinfo=UTC)
TOY_STORY = 1
KIDS = {"Animation", "Children"}
SMALL = fusion_fit.TrainConfig(epochs=1, batch_size=256)


def random_feeds(n: int, seed: int = 0, with_image: float = 0.5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return fusion.feeds(
        rng.normal(size=(n, fusion.TEXT_DIM)),
        np.abs(rng.normal(size=(n, fusion.IMAGE_DIM))),
        rng.random(n) < with_image,
    )


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real MovieLens (ratings, tags, posters) ingested into a temporary offline directory."""
    out = tmp_path_factory.mktemp("fusion-offline")
    ingest_movielens(MOVIELENS, out, POSTERS)
    return out


@pytest.fixture(scope="module")
def encodings_path(offline: Path, model_cache_dir: Path) -> Path:
    """Real text and poster encodings of the first ``SUBSET`` items."""
    items = pl.read_parquet(offline / "items.parquet").sort("item_id").head(SUBSET)
    out = offline / "item_encodings.parquet"
    run_embed(items, out, progress=False, cache_dir=model_cache_dir, prune=False)
    return out


@pytest.fixture(scope="module")
def features(encodings_path: Path) -> fusion_fit.ItemFeatures:
    return fusion_fit.ItemFeatures.from_encodings(pl.read_parquet(encodings_path))


@pytest.fixture(scope="module")
def fused(offline: Path, encodings_path: Path) -> dict:
    """``avrec fuse`` (through ``main``) on the subset; returns its paths and start time."""
    started = datetime.now(UTC)
    out = offline / "item_embeddings.parquet"
    models = offline / "models"
    argv = [
        *("--events", str(offline / "events.parquet")),
        *("--items", str(offline / "items.parquet")),
        *("--encodings", str(encodings_path)),
        *("--out", str(out)),
        *("--models-dir", str(models)),
        *("--cutoff", CUTOFF.date().isoformat()),
    ]
    assert mixed_job.main(argv) == 0
    return {"out": out, "models": models, "started": started}


def test_weighted_sum_with_a_one_is_the_text_projection() -> None:
    torch.manual_seed(0)
    model = ItemFusionModel.asum(a=1.0).eval()
    feeds = random_feeds(16)
    out = fusion.run_torch(model, feeds)
    with torch.inference_mode():
        text = F.normalize(model.text(torch.from_numpy(feeds["text_embedding"])), dim=1).numpy()
    np.testing.assert_allclose(out, text, atol=1e-6)
    a_zero = ItemFusionModel(fusion.WeightedSumFusion(0.0)).eval()
    a_zero.text, a_zero.image = model.text, model.image
    out_zero = fusion.run_torch(a_zero, feeds)
    has = feeds["has_image"] > 0
    np.testing.assert_allclose(out_zero[~has], text[~has], atol=1e-6)
    assert np.abs(out_zero[has] - text[has]).max() > 0.1


@pytest.mark.parametrize("kind", fusion.KINDS)
def test_missing_image_never_reaches_the_output(kind: str, tmp_path: Path) -> None:
    """Without image: the text projection alone, whatever the image input holds."""
    torch.manual_seed(1)
    model = (ItemFusionModel.asum(0.5) if kind == "asum" else ItemFusionModel.gated()).eval()
    feeds = random_feeds(64, seed=2)
    without = feeds["has_image"] == 0
    assert 0 < without.sum() < len(without)
    changed = dict(feeds)
    noise = np.random.default_rng(3).normal(scale=50.0, size=feeds["image_embedding"].shape)
    changed["image_embedding"] = (feeds["image_embedding"] + noise).astype(np.float32)
    changed["image_embedding"][np.flatnonzero(without)[:2]] = np.nan
    path = tmp_path / "fusion.onnx"
    fusion.export_onnx(model, path, feeds)
    onnx_model = OnnxModel(path, providers=[CPU_EP])
    with torch.inference_mode():
        text_only = model.text(torch.from_numpy(feeds["text_embedding"])).numpy()
    for run in (lambda f: fusion.run_torch(model, f), lambda f: onnx_model.run(f)["mixed"]):
        before, after = run(feeds), run(changed)
        assert np.isfinite(after).all()
        np.testing.assert_array_equal(after[without], before[without])
        np.testing.assert_allclose(after[without], text_only[without], atol=1e-5)
        assert np.abs(after[~without] - before[~without]).max() > 1e-3
    bool_mask = {**feeds, "has_image": feeds["has_image"].astype(bool)}
    np.testing.assert_array_equal(
        fusion.run_torch(model, bool_mask), fusion.run_torch(model, feeds)
    )


@pytest.mark.parametrize("kind", fusion.KINDS)
def test_onnx_matches_torch_with_dynamic_batch(
    kind: str, features: fusion_fit.ItemFeatures, tmp_path: Path
) -> None:
    rng = np.random.default_rng(4)
    pairs = rng.integers(0, len(features), size=(600, 2))
    model, _ = fusion_fit.fit(kind, features, pairs, SMALL, a=0.7)
    sample = mixed_job.parity_sample(features)
    parity = fusion.export_onnx(model, tmp_path / "m.onnx", sample, {"fusion_kind": kind})
    assert parity.min_cosine >= MIN_COSINE and parity.max_abs_diff < 1e-4
    onnx_model = OnnxModel(tmp_path / "m.onnx", providers=[CPU_EP])
    assert onnx_model.metadata["fusion_kind"] == kind
    assert float(onnx_model.metadata["parity_min_cosine"]) >= MIN_COSINE
    for n in (1, 3, 257):
        feeds = fusion.feeds(features.text[:n], features.image[:n], features.has_image[:n])
        out = onnx_model.run(feeds)["mixed"]
        assert out.shape == (n, fusion.D)
        np.testing.assert_allclose(out, fusion.run_torch(model, feeds), atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_training_is_seeded(features: fusion_fit.ItemFeatures) -> None:
    pairs = np.random.default_rng(5).integers(0, len(features), size=(800, 2))
    first, losses = fusion_fit.fit("gated", features, pairs, SMALL)
    again, losses_again = fusion_fit.fit("gated", features, pairs, SMALL)
    other, _ = fusion_fit.fit("gated", features, pairs, replace(SMALL, seed=1))
    assert losses == losses_again
    for name, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert not torch.equal(first.text.linear.weight, other.text.linear.weight)


def test_pairs_are_consecutive_positive_ratings_within_the_gap() -> None:
    t0 = datetime(2015, 1, 1, tzinfo=UTC)
    rows = [
        (1, 10, "rating", 5.0, t0),
        (1, 11, "rating", 4.0, t0 + timedelta(minutes=5)),
        (1, 12, "rating", 2.0, t0 + timedelta(minutes=6)),  # negative: skipped
        (1, 13, "rating", 4.5, t0 + timedelta(minutes=7)),  # pairs with 11, across the negative
        (1, 14, "tag", None, t0 + timedelta(minutes=8)),  # not a rating
        (1, 15, "rating", 5.0, t0 + timedelta(hours=3)),  # gap too large
        (2, 10, "rating", 4.0, t0 + timedelta(minutes=1)),  # other user: no pair with user 1
        (2, 10, "rating", 4.0, t0 + timedelta(minutes=2)),  # same item twice: no pair
    ]
    events = pl.DataFrame(
        rows,
        schema=["user_id", "item_id", "event_type", "value", "event_timestamp"],
        orient="row",
    )
    pairs = co_consumption.co_consumption_pairs(events)
    assert pairs.select("item_a", "item_b").rows() == [(10, 11), (11, 13)]
    before = co_consumption.between(pairs, end=t0 + timedelta(minutes=7))
    assert before.select("item_a", "item_b").rows() == [(10, 11)]
    after = co_consumption.between(pairs, start=t0 + timedelta(minutes=1))
    assert after.select("item_a", "item_b").rows() == [(11, 13)]


def test_events_after_the_cutoff_do_not_change_the_fusion(
    offline: Path, features: fusion_fit.ItemFeatures
) -> None:
    events = pl.read_parquet(offline / "events.parquet")
    items = pl.read_parquet(offline / "items.parquet")
    kwargs = {"a_grid": (0.5,), "config": SMALL, "ablations": False}
    full = fusion_training.train_fusion(events, features, items, CUTOFF, **kwargs)
    early = events.filter(pl.col("event_timestamp") < CUTOFF)
    cut = fusion_training.train_fusion(early, features, items, CUTOFF, **kwargs)
    assert full.pair_counts["test"] > 0 and cut.pair_counts["test"] == 0
    for name, value in full.gated.state_dict().items():
        assert torch.equal(value, cut.gated.state_dict()[name]), name


def test_the_gated_fusion_alone_is_the_one_train_fusion_returns(
    offline: Path, features: fusion_fit.ItemFeatures
) -> None:
    events = pl.read_parquet(offline / "events.parquet")
    items = pl.read_parquet(offline / "items.parquet")
    run = fusion_training.train_fusion(events, features, items, CUTOFF, a_grid=(0.5,),
                                       config=SMALL, ablations=False)
    alone = fusion_training.fit_gated_fusion(events, features, CUTOFF, config=SMALL)
    for name, value in run.gated.state_dict().items():
        assert torch.equal(value, alone.state_dict()[name]), name


def test_the_weighted_sum_alone_is_the_one_train_fusion_returns(
    offline: Path, features: fusion_fit.ItemFeatures
) -> None:
    events = pl.read_parquet(offline / "events.parquet")
    items = pl.read_parquet(offline / "items.parquet")
    grid = (0.25, 0.75)
    run = fusion_training.train_fusion(events, features, items, CUTOFF, a_grid=grid,
                                       config=SMALL, ablations=False)
    alone = fusion_training.fit_asum_fusion(events, features, CUTOFF, a_grid=grid, config=SMALL)
    assert float(alone.a) == pytest.approx(run.a)
    for name, value in run.asum.state_dict().items():
        assert torch.equal(value, alone.state_dict()[name]), name


def test_job_writes_the_table(fused: dict, encodings_path: Path) -> None:
    table = pl.read_parquet(fused["out"])
    assert table.schema == pl.Schema(mixed_job.ITEM_EMBEDDINGS_SCHEMA)
    encodings = pl.read_parquet(encodings_path).sort("item_id")
    assert table["item_id"].to_list() == encodings["item_id"].to_list()
    assert table["has_image"].to_list() == encodings["has_image"].to_list()
    assert 0 < table["has_image"].sum() < table.height
    for column in ("embedding", "embedding_asum"):
        assert table[column].list.len().unique().to_list() == [fusion.D]
        vectors = np.stack(table[column].to_list())
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert table["event_timestamp"].unique().to_list() == [CUTOFF]
    assert table["created_timestamp"].min() >= fused["started"]
    (version,) = table["embedding_version"].unique().to_list()
    model_dir = fused["models"] / version
    for name in (mixed_job.GATED_FILE, mixed_job.ASUM_FILE, mixed_job.METRICS_FILE):
        assert (model_dir / name).is_file(), name
    gated = OnnxModel(model_dir / mixed_job.GATED_FILE, providers=[CPU_EP])
    assert gated.metadata["embedding_version"] == version
    assert gated.metadata["fusion_kind"] == "gated"
    assert gated.metadata["training_cutoff"] == CUTOFF.isoformat()
    assert float(gated.metadata["parity_min_cosine"]) >= MIN_COSINE
    asum = OnnxModel(model_dir / mixed_job.ASUM_FILE, providers=[CPU_EP])
    assert float(asum.metadata["fusion_a"]) in fusion_training.A_GRID
    features = fusion_fit.ItemFeatures.from_encodings(encodings)
    feeds = fusion.feeds(features.text, features.image, features.has_image)
    np.testing.assert_allclose(
        np.stack(table["embedding"].to_list()), gated.run(feeds)["mixed"], atol=1e-6
    )


def test_toy_story_neighbours_are_animated_or_for_children(fused: dict, offline: Path) -> None:
    table = pl.read_parquet(fused["out"])
    items = pl.read_parquet(offline / "items.parquet").filter(
        pl.col("item_id").is_in(table["item_id"].to_list())
    )
    kids = {i for i, g in zip(items["item_id"], items["genres"], strict=True) if KIDS & set(g)}
    base_rate = len(kids) / items.height
    for column in ("embedding", "embedding_asum"):
        index = EmbeddingIndex(
            column,
            table["item_id"].to_numpy(),
            np.stack(table[column].to_list()).astype(np.float32),
        )
        found = [item_id for item_id, _ in index.neighbours(TOY_STORY, k=10)]
        share = sum(item_id in kids for item_id in found) / len(found)
        assert share >= max(0.3, 3 * base_rate), (column, share, base_rate)
