"""all-MiniLM-L6-v2 through ONNX: parity with torch and sentence-transformers, metadata, cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from avrec.encoders import item_text, model_cache, text_encoder
from avrec.encoders.onnx_export import MIN_COSINE, compare
from avrec.encoders.text_encoder import TextEncoder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def real_texts(catalogue: pl.DataFrame) -> list[str]:
    """200 real item texts of varied length (every 49th item), plus edge cases."""
    texts = item_text.item_texts(catalogue.gather_every(49))
    long_text = " ".join(["a very long description of a film"] * 80)
    return [*texts, "x", long_text, "Crouching Tiger, Hidden Dragon 卧虎藏龙"]


def torch_embed(model, texts: list[str]) -> np.ndarray:
    feeds = text_encoder.tokenize(text_encoder.load_tokenizer(), texts)
    with torch.inference_mode():
        return model(*(torch.from_numpy(feeds[n]) for n in text_encoder.INPUT_NAMES)).numpy()


@pytest.fixture(scope="module")
def torch_ref(text_torch, real_texts: list[str]) -> np.ndarray:
    """Torch eager embeddings of ``real_texts``, in padded batches of 32."""
    batches = [real_texts[i : i + 32] for i in range(0, len(real_texts), 32)]
    return np.concatenate([torch_embed(text_torch, batch) for batch in batches])


def test_onnx_matches_torch_on_real_titles(text_onnx: Path, torch_ref, real_texts) -> None:
    onnx_out = TextEncoder(text_onnx).encode(real_texts, batch_size=32)
    ref = torch_ref
    parity = compare(onnx_out, ref)
    print(
        f"\ntext ONNX vs torch on {parity.rows} real texts: "
        f"max abs diff {parity.max_abs_diff:.2e}, min cosine {parity.min_cosine:.8f}"
    )
    assert parity.min_cosine >= MIN_COSINE
    assert onnx_out.shape == (len(real_texts), 384) and onnx_out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(onnx_out, axis=1), 1.0, atol=1e-5)


def test_torch_reference_is_sentence_transformers(torch_ref, real_texts) -> None:
    """Mean pooling + normalisation exactly like sentence-transformers (truncation at 256)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(text_encoder.model_dir()), device="cpu")
    assert st.max_seq_length == text_encoder.MAX_SEQ_LENGTH
    expected = st.encode(real_texts, batch_size=32, convert_to_numpy=True)
    parity = compare(torch_ref, expected)
    print(f"\ntorch reference vs sentence-transformers: max abs diff {parity.max_abs_diff:.2e}")
    assert parity.max_abs_diff < 1e-5


def test_batching_does_not_change_embeddings(text_onnx: Path, real_texts) -> None:
    encoder = TextEncoder(text_onnx)
    alone = np.stack([encoder.encode([t])[0] for t in real_texts[:20]])
    batched = encoder.encode(real_texts[:20], batch_size=7)
    assert compare(alone, batched).min_cosine >= MIN_COSINE


def test_metadata(text_onnx: Path) -> None:
    encoder = TextEncoder(text_onnx)
    meta = encoder.model.metadata
    for key in model_cache.REQUIRED_METADATA:
        assert meta.get(key), key
    assert meta["model_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["output_dim"] == "384" and encoder.dim == 384
    assert meta["source_sha256"] == text_encoder.source_hash()
    assert "mean pooling" in meta["preprocessing"]
    assert float(meta["parity_min_cosine"]) >= MIN_COSINE
    assert encoder.name == f"all-minilm-l6-v2:{text_encoder.source_hash()[:12]}:v1"
    assert [i.name for i in encoder.model.session.get_inputs()] == list(text_encoder.INPUT_NAMES)
    shapes = [i.shape for i in encoder.model.session.get_inputs()]
    assert all(isinstance(d, str) for shape in shapes for d in shape), shapes


def test_cache_hit_does_not_reexport(text_onnx: Path, model_cache_dir: Path) -> None:
    before = text_onnx.stat().st_mtime_ns
    again = text_encoder.onnx_path(model_cache_dir)
    assert again == text_onnx and again.stat().st_mtime_ns == before
    assert text_onnx.parent.name.startswith(f"all-minilm-l6-v2-{text_encoder.source_hash()[:16]}")


def test_onnx_text_inference_needs_no_torch(text_onnx: Path) -> None:
    code = (
        "import sys\n"
        "from avrec.encoders.text_encoder import TextEncoder\n"
        f"v = TextEncoder.load({str(text_onnx.parents[1])!r}).encode(['Heat', 'Alien'])\n"
        "assert v.shape == (2, 384), v.shape\n"
        "bad = [m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
