"""EfficientNet-Lite0 through ONNX: parity on real posters, metadata, unreadable images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avrec.encoders import image_encoder, model_cache
from avrec.encoders.image_encoder import ImageEncoder, UnreadableImageError
from avrec.encoders.onnx_export import MIN_COSINE, compare

from .conftest import poster_paths


@pytest.fixture(scope="module")
def posters() -> list[Path]:
    return poster_paths(24)


@pytest.fixture(scope="module")
def encoder(image_onnx: Path) -> ImageEncoder:
    return ImageEncoder(image_onnx, threads=2)


def test_onnx_matches_torch_on_real_posters(encoder: ImageEncoder, image_torch, posters) -> None:
    result = encoder.encode_files(posters, batch_size=8)
    assert not result.failures
    onnx_out = np.stack(result.embeddings)
    pixels = np.stack([image_encoder.load_pixels(p) for p in posters])
    with torch.inference_mode():
        ref = image_torch(torch.from_numpy(pixels)).numpy()
    parity = compare(onnx_out, ref)
    print(
        f"\nimage ONNX vs torch on {parity.rows} real posters: "
        f"max abs diff {parity.max_abs_diff:.2e}, min cosine {parity.min_cosine:.8f}"
    )
    assert parity.min_cosine >= MIN_COSINE
    assert onnx_out.shape == (24, 1280) and onnx_out.dtype == np.float32
    assert (onnx_out >= 0).all() and (onnx_out <= 6).all()  # pooled ReLU6 activations


def test_features_are_the_classifier_input(image_torch, posters) -> None:
    """The 1280-d output is exactly what the ImageNet head consumes (nothing dropped or added)."""
    pixels = torch.from_numpy(np.stack([image_encoder.load_pixels(p) for p in posters[:4]]))
    net = image_torch.net
    with torch.inference_mode():
        np.testing.assert_allclose(
            net._fc(image_torch(pixels)).numpy(), net(pixels).numpy(), rtol=1e-4, atol=1e-4
        )


def test_preprocessing(posters) -> None:
    pixels = image_encoder.load_pixels(posters[0])
    assert pixels.shape == (3, 224, 224) and pixels.dtype == np.float32
    assert pixels.min() >= -127 / 128 - 1e-6 and pixels.max() <= 128 / 128 + 1e-6
    assert pixels.std() > 0.1  # a real picture, not a constant


def test_greyscale_and_png_are_converted(tmp_path: Path, posters) -> None:
    grey = tmp_path / "grey.png"
    Image.open(posters[0]).convert("L").save(grey)
    rgba = tmp_path / "rgba.png"
    Image.open(posters[1]).convert("RGBA").save(rgba)
    assert image_encoder.load_pixels(grey).shape == (3, 224, 224)
    assert image_encoder.load_pixels(rgba).shape == (3, 224, 224)


def test_metadata(encoder: ImageEncoder) -> None:
    meta = encoder.model.metadata
    for key in model_cache.REQUIRED_METADATA:
        assert meta.get(key), key
    assert meta["output_dim"] == "1280" and encoder.dim == 1280
    assert meta["source_sha256"] == image_encoder.source_hash()
    assert "(x - 127) / 128" in meta["preprocessing"]
    assert float(meta["parity_min_cosine"]) >= MIN_COSINE
    (batch, channels, height, width) = encoder.model.session.get_inputs()[0].shape
    assert isinstance(batch, str) and (channels, height, width) == (3, 224, 224)


def test_unreadable_images_are_reported_not_fatal(
    encoder: ImageEncoder, posters, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 10)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(posters[2].read_bytes()[:200])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    missing = tmp_path / "missing.jpg"
    paths = [posters[0], corrupt, truncated, posters[1], empty, text, missing]
    with caplog.at_level(logging.WARNING, logger="avrec.encoders.image_encoder"):
        result = encoder.encode_files(paths, batch_size=3)
    assert sorted(result.failures) == [1, 2, 4, 5, 6]
    assert [e is None for e in result.embeddings] == [False, True, True, False, True, True, True]
    good = encoder.encode_files([posters[0], posters[1]])
    np.testing.assert_allclose(result.embeddings[0], good.embeddings[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.embeddings[3], good.embeddings[1], rtol=1e-5, atol=1e-6)
    warned = [r.getMessage() for r in caplog.records if "unreadable image" in r.getMessage()]
    assert len(warned) == 5 and any("corrupt.jpg" in w for w in warned)
    with pytest.raises(UnreadableImageError):
        image_encoder.load_pixels(corrupt)


def test_cache_hit_does_not_reexport(image_onnx: Path, model_cache_dir: Path) -> None:
    before = image_onnx.stat().st_mtime_ns
    assert image_encoder.onnx_path(model_cache_dir) == image_onnx
    assert image_onnx.stat().st_mtime_ns == before
    assert image_onnx.parent.name == f"efficientnet-lite0-{image_encoder.source_hash()[:16]}-v1"
