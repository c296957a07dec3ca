"""The torch side of the encoders: reference modules, ONNX export, parity check, metadata.

Export uses ``torch.onnx.export(dynamo=True)`` with a dynamic batch axis (and a dynamic sequence
axis for text). Before an export is moved into the model cache, onnxruntime's output is compared
with torch eager on sample inputs: every row must reach cosine >= 0.9999, otherwise the export
fails. The result (max abs diff, min cosine) is stored in the model's ``metadata_props`` next to
the model name, output dim, preprocessing, source hash and avrec encoder version.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from avrec import config
from avrec.encoders import ENCODER_VERSION, image_encoder, model_cache, text_encoder
from avrec.names import OPSET
from avrec.onnx_runtime import CPU_EP, OnnxModel

log = logging.getLogger(__name__)

MIN_COSINE = 0.9999

SAMPLE_TEXTS = (
    "Toy Story (1995). Genres: Adventure, Animation, Children, Comedy, Fantasy. Tags: pixar, fun",
    "Heat (1995). Genres: Action, Crime, Thriller",
    "Alien (1979). Genres: Horror, Sci-Fi. Tags: space, suspense, creature",
    "Crouching Tiger, Hidden Dragon (Wo hu cang long) (2000). Genres: Action, Drama, Romance",
    "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001). Genres: Comedy, Romance",
    "Kids",
)


class SentenceEmbedder(nn.Module):
    """BERT + mean pooling over the attention mask + L2 normalisation (sentence-transformers)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        counts = torch.clamp(mask.sum(dim=1), min=1e-9)
        return nn.functional.normalize(summed / counts, p=2.0, dim=1)


class PooledFeatures(nn.Module):
    """EfficientNet features, globally average-pooled: the 1280-d input of the classifier."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.net.extract_features(pixel_values)
        return self.net._avg_pooling(features).flatten(1)


def torch_text_model() -> SentenceEmbedder:
    """The torch reference text encoder (eval mode, CPU), loaded offline from the package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    bert = AutoModel.from_pretrained(str(text_encoder.model_dir()), local_files_only=True)
    return SentenceEmbedder(bert).eval()


def torch_image_model() -> PooledFeatures:
    """The torch reference image encoder (eval mode, CPU), weights loaded strictly."""
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(image_encoder.weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return PooledFeatures(net).eval()


@dataclass(frozen=True)
class Parity:
    """Agreement of ONNX and torch on the same inputs."""

    rows: int
    max_abs_diff: float
    min_cosine: float

    @property
    def ok(self) -> bool:
        return self.min_cosine >= MIN_COSINE


def compare(onnx_out: np.ndarray, torch_out: np.ndarray) -> Parity:
    """Row-wise cosine and max abs diff between two ``[n, d]`` arrays."""
    a = onnx_out.astype(np.float64)
    b = torch_out.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.maximum(norms, 1e-12)
    return Parity(len(a), float(np.abs(a - b).max()), float(cos.min()))


def text_parity(path: Path, model: SentenceEmbedder, texts: Sequence[str]) -> Parity:
    """ONNX vs torch eager on ``texts`` (padded batch, so padding handling is exercised)."""
    feeds = text_encoder.tokenize(text_encoder.load_tokenizer(), texts)
    onnx_out = OnnxModel(path, providers=[CPU_EP]).run(feeds)[text_encoder.OUTPUT_NAME]
    with torch.inference_mode():
        ref = model(*(torch.from_numpy(feeds[n]) for n in text_encoder.INPUT_NAMES)).numpy()
    return compare(onnx_out, ref)


def image_parity(path: Path, model: PooledFeatures, pixels: np.ndarray) -> Parity:
    """ONNX vs torch eager on preprocessed ``pixels``."""
    onnx_out = OnnxModel(path, providers=[CPU_EP]).run({image_encoder.INPUT_NAME: pixels})
    with torch.inference_mode():
        ref = model(torch.from_numpy(pixels)).numpy()
    return compare(onnx_out[image_encoder.OUTPUT_NAME], ref)


def sample_pixels(limit: int = 8) -> np.ndarray:
    """Real posters from the datasets directory when present, else a fixed synthetic batch."""
    posters = sorted((config.datasets_dir() / "posters").glob("*.jpg"))[:limit]
    pixels = []
    for poster in posters:
        with contextlib.suppress(image_encoder.UnreadableImageError):
            pixels.append(image_encoder.load_pixels(poster))
    if pixels:
        return np.stack(pixels)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(limit, 3, 300, 200), dtype=np.uint8)
    return np.stack([image_encoder.preprocess(torch.from_numpy(img)) for img in raw])


def export_program(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_name: str,
    dynamic_shapes: dict[str, dict[int, torch.export.Dim]],
    target: Path,
) -> None:
    """``torch.onnx.export`` (dynamo) to ``target``, quietly, weights inside the file."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        quiet_exporter_loggers(),
    ):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            args,
            input_names=list(input_names),
            output_names=[output_name],
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
        program.save(str(target), external_data=False)


@contextlib.contextmanager
def quiet_exporter_loggers(names: Sequence[str] = ("onnx_ir", "onnxscript", "torch.onnx")):
    """Silence the exporter's INFO chatter (graph passes) for the duration of an export."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def write_metadata(target: Path, props: Mapping[str, object]) -> None:
    """Replace an ONNX file's metadata_props (values as strings), check and save it."""
    proto = onnx.load(str(target))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(target))


def _finish(tmp: Path, path: Path, props: dict[str, str], parity: Parity, what: str) -> Parity:
    if not parity.ok:
        raise RuntimeError(
            f"{what}: ONNX/torch parity failed (min cosine {parity.min_cosine:.6f} < {MIN_COSINE})"
        )
    props[model_cache.META_PARITY_MAX_ABS] = f"{parity.max_abs_diff:.3e}"
    props[model_cache.META_PARITY_MIN_COS] = f"{parity.min_cosine:.8f}"
    write_metadata(tmp, props)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, path)
    log.info(
        "exported %s to %s (max abs diff %.2e, min cosine %.7f)",
        what,
        path,
        parity.max_abs_diff,
        parity.min_cosine,
    )
    return parity


def _metadata(
    model_name: str,
    slug: str,
    source_hash: str,
    output_name: str,
    dim: int,
    preprocessing: str,
    sources: Sequence[Path],
) -> dict[str, str]:
    return {
        model_cache.META_MODEL_NAME: model_name,
        model_cache.META_ENCODER_ID: model_cache.encoder_id(slug, source_hash),
        model_cache.META_OUTPUT_NAME: output_name,
        model_cache.META_OUTPUT_DIM: str(dim),
        model_cache.META_PREPROCESSING: preprocessing,
        model_cache.META_SOURCE_HASH: source_hash,
        model_cache.META_SOURCE_FILES: ",".join(p.name for p in sources),
        model_cache.META_VERSION: ENCODER_VERSION,
    }


def export_text(path: Path | None = None) -> Parity:
    """Export all-MiniLM-L6-v2 (tokens in, normalised sentence embedding out) to ``path``."""
    source_hash = text_encoder.source_hash()
    path = path or model_cache.model_path(text_encoder.SLUG, source_hash)
    model = torch_text_model()
    feeds = text_encoder.tokenize(text_encoder.load_tokenizer(), SAMPLE_TEXTS[:2])
    args = tuple(torch.from_numpy(feeds[n]) for n in text_encoder.INPUT_NAMES)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {name: {0: batch, 1: seq} for name in text_encoder.INPUT_NAMES}
    props = _metadata(
        text_encoder.MODEL_NAME,
        text_encoder.SLUG,
        source_hash,
        text_encoder.OUTPUT_NAME,
        text_encoder.DIM,
        text_encoder.PREPROCESSING,
        text_encoder.source_files(),
    )
    with tempfile.TemporaryDirectory(dir=_tmp_parent(path)) as tmp_dir:
        tmp = Path(tmp_dir) / model_cache.MODEL_FILE
        export_program(
            model, args, text_encoder.INPUT_NAMES, text_encoder.OUTPUT_NAME, dynamic, tmp
        )
        parity = text_parity(tmp, model, SAMPLE_TEXTS)
        return _finish(tmp, path, props, parity, text_encoder.SLUG)


def export_image(path: Path | None = None) -> Parity:
    """Export EfficientNet-Lite0 (pixels in, pooled 1280-d features out) to ``path``."""
    source_hash = image_encoder.source_hash()
    path = path or model_cache.model_path(image_encoder.SLUG, source_hash)
    model = torch_image_model()
    pixels = sample_pixels()
    batch = torch.export.Dim("batch")
    props = _metadata(
        image_encoder.MODEL_NAME,
        image_encoder.SLUG,
        source_hash,
        image_encoder.OUTPUT_NAME,
        image_encoder.DIM,
        image_encoder.PREPROCESSING,
        [image_encoder.weights_path()],
    )
    with tempfile.TemporaryDirectory(dir=_tmp_parent(path)) as tmp_dir:
        tmp = Path(tmp_dir) / model_cache.MODEL_FILE
        args = (torch.from_numpy(pixels[:2]),)
        dynamic = {image_encoder.INPUT_NAME: {0: batch}}
        export_program(
            model, args, [image_encoder.INPUT_NAME], image_encoder.OUTPUT_NAME, dynamic, tmp
        )
        parity = image_parity(tmp, model, pixels)
        return _finish(tmp, path, props, parity, image_encoder.SLUG)


def _tmp_parent(path: Path) -> Path:
    """A scratch directory on the same filesystem as ``path`` (so the final move is atomic)."""
    parent = path.parent.parent
    parent.mkdir(parents=True, exist_ok=True)
    return parent


def export_all(cache_dir: Path | None = None, force: bool = False) -> dict[str, Path]:
    """Make sure both ONNX encoders are in the cache; ``force`` re-exports them."""
    paths = {}
    for module, exporter in ((text_encoder, export_text), (image_encoder, export_image)):
        path = model_cache.model_path(module.SLUG, module.source_hash(), cache_dir)
        if force and path.exists():
            shutil.rmtree(path.parent)
        if not path.is_file():
            exporter(path)
        paths[module.SLUG] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    """Export both encoders into the model cache (a no-op when they are already there)."""
    parser = argparse.ArgumentParser(
        prog="python -m avrec.encoders.onnx_export", description=main.__doc__
    )
    parser.add_argument("--cache-dir", type=Path, help="model cache (default: data dir)")
    parser.add_argument("--force", action="store_true", help="re-export even when cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for slug, path in export_all(args.cache_dir, args.force).items():
        meta = OnnxModel(path, providers=[CPU_EP]).metadata
        parity = meta[model_cache.META_PARITY_MAX_ABS], meta[model_cache.META_PARITY_MIN_COS]
        print(
            f"{slug}: {path}\n  {meta[model_cache.META_ENCODER_ID]}, "
            f"{meta[model_cache.META_OUTPUT_DIM]}-d, parity max abs diff {parity[0]}, "
            f"min cosine {parity[1]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
