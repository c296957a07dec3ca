"""Mixed item embeddings: project text and image encodings to one space and fuse them.

Small composable torch modules:

- :class:`ModalityProjection`: one modality's encoding -> ``d``-dim unit vector.
- :class:`WeightedSumFusion`: the weighted sum ``a * e_text + (1 - a) * e_visual``, ``a`` fixed.
- :class:`GatedFusion`: a learned per-dimension gate between the two projections.
- :class:`ItemFusionModel`: ``(text_embedding, image_embedding, has_image) -> mixed``, the unit
  that is exported to ONNX and served.

A missing image is a mask, never a zero vector passed off as an image: the image input of an
item without image is replaced by zeros before its projection and the fusion returns that
item's text projection alone, so the output cannot depend on what its image input holds.

:func:`export_onnx` exports an :class:`ItemFusionModel` with a dynamic batch axis, checks
onnxruntime against torch eager (row cosine >= 0.9999, else it fails) and stores metadata.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from avrec.encoders.onnx_export import (
    MIN_COSINE,
    Parity,
    compare,
    export_program,
    write_metadata,
)
from avrec.onnx_runtime import CPU_EP, OnnxModel

log = logging.getLogger(__name__)

D = 128
TEXT_DIM = 384
IMAGE_DIM = 1280
KINDS = ("asum", "gated")
INPUT_NAMES = ("text_embedding", "image_embedding", "has_image")
OUTPUT_NAME = "mixed"
META_PARITY_MAX_ABS = "parity_max_abs_diff"
META_PARITY_MIN_COS = "parity_min_cosine"


class ModalityProjection(nn.Module):
    """One modality to the shared space: L2-normalise, Linear, LayerNorm, L2-normalise.

    Normalising the input first makes the projection blind to the encoder's scale (the image
    features are unnormalised pooled activations).

    >>> proj = ModalityProjection(384, 128)
    >>> proj(torch.randn(4, 384)).norm(dim=1).allclose(torch.ones(4))
    True
    """

    def __init__(self, in_dim: int, d: int = D) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.norm(self.linear(F.normalize(x, dim=1))), dim=1)


class WeightedSumFusion(nn.Module):
    """``normalize(a * p_text + (1 - a) * p_image)``; rows without image get ``p_text``.

    ``a`` is a fixed buffer, not a parameter: only the projections around it are learned.

    >>> fuse = WeightedSumFusion(a=0.7)
    >>> p_text, p_image = F.normalize(torch.randn(2, 8), dim=1), torch.zeros(2, 8)
    >>> fuse(p_text, p_image, torch.tensor([False, False])).allclose(p_text)
    True
    """

    def __init__(self, a: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"a must be in [0, 1], not {a}")
        self.register_buffer("a", torch.tensor(float(a)))

    def forward(
        self, p_text: torch.Tensor, p_image: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        mixed = self.a * p_text + (1.0 - self.a) * p_image
        return F.normalize(torch.where(mask.unsqueeze(1), mixed, p_text), dim=1)


class GatedFusion(nn.Module):
    """``normalize(g * p_text + (1 - g) * p_image)``, ``g = sigmoid(W [p_text; p_image] + b)``.

    A per-dimension gate (a gated multimodal unit) learned from both projections; the
    modality mask routes rows without image to ``p_text`` alone, bypassing the gate.

    >>> fuse = GatedFusion(d=8)
    >>> p = F.normalize(torch.randn(3, 8), dim=1)
    >>> fuse(p, p.flip(0), torch.tensor([True, False, True])).shape
    torch.Size([3, 8])
    """

    def __init__(self, d: int = D) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * d, d)

    def forward(
        self, p_text: torch.Tensor, p_image: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([p_text, p_image], dim=1)))
        mixed = g * p_text + (1.0 - g) * p_image
        return F.normalize(torch.where(mask.unsqueeze(1), mixed, p_text), dim=1)


class ItemFusionModel(nn.Module):
    """``(text [N,384], image [N,1280], has_image [N]) -> mixed [N,d]``, L2-normalised.

    ``has_image`` is bool, or float (``> 0.5`` means present); image rows of items without
    image are ignored (zeros are the conventional filler).

    >>> model = ItemFusionModel.gated()
    >>> model(torch.randn(2, 384), torch.zeros(2, 1280), torch.tensor([0.0, 0.0])).shape
    torch.Size([2, 128])
    """

    def __init__(
        self,
        fusion: WeightedSumFusion | GatedFusion,
        d: int = D,
        text_dim: int = TEXT_DIM,
        image_dim: int = IMAGE_DIM,
    ) -> None:
        super().__init__()
        self.d = d
        self.text = ModalityProjection(text_dim, d)
        self.image = ModalityProjection(image_dim, d)
        self.fusion = fusion

    @classmethod
    def asum(cls, a: float = 0.5, d: int = D) -> ItemFusionModel:
        """Weighted-sum fusion with fixed ``a`` and learned projections."""
        return cls(WeightedSumFusion(a), d)

    @classmethod
    def gated(cls, d: int = D) -> ItemFusionModel:
        """Learned gated fusion."""
        return cls(GatedFusion(d), d)

    @property
    def kind(self) -> str:
        """``"asum"`` or ``"gated"``."""
        return "asum" if isinstance(self.fusion, WeightedSumFusion) else "gated"

    @property
    def a(self) -> float | None:
        """The weighted sum's ``a``; None for the gated fusion."""
        return float(self.fusion.a) if isinstance(self.fusion, WeightedSumFusion) else None

    def forward(
        self, text_embedding: torch.Tensor, image_embedding: torch.Tensor, has_image: torch.Tensor
    ) -> torch.Tensor:
        mask = has_image if has_image.dtype == torch.bool else has_image > 0.5
        image = torch.where(mask.unsqueeze(1), image_embedding, torch.zeros_like(image_embedding))
        return self.fusion(self.text(text_embedding), self.image(image), mask)


def run_torch(model: ItemFusionModel, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """Torch eager output for ONNX-style ``feeds`` (eval mode, no grad)."""
    model.eval()
    with torch.inference_mode():
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in INPUT_NAMES]
        return model(*args).numpy()


def feeds(text: np.ndarray, image: np.ndarray, has_image: np.ndarray) -> dict[str, np.ndarray]:
    """ONNX inputs: float32 ``text``, ``image`` (zeros where absent) and ``has_image`` 0/1."""
    has = np.asarray(has_image).astype(bool)
    image = np.where(has[:, None], np.asarray(image, dtype=np.float32), np.float32(0.0))
    return {
        "text_embedding": np.asarray(text, dtype=np.float32),
        "image_embedding": image.astype(np.float32, copy=False),
        "has_image": has.astype(np.float32),
    }


def parity(path: Path, model: ItemFusionModel, sample: Mapping[str, np.ndarray]) -> Parity:
    """onnxruntime (CPU) vs torch eager on ``sample``, row by row."""
    onnx_out = OnnxModel(path, providers=[CPU_EP]).run(sample)[OUTPUT_NAME]
    return compare(onnx_out, run_torch(model, sample))


def export_onnx(
    model: ItemFusionModel,
    path: Path,
    sample: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> Parity:
    """Export ``model`` to ``path`` (dynamic batch), check parity on ``sample``, add metadata.

    The file appears at ``path`` only when parity holds (min row cosine >= 0.9999).
    """
    model.eval()
    if len(sample[INPUT_NAMES[0]]) < 2:
        raise ValueError("sample needs at least 2 rows (a batch of 1 would fix the batch axis)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch")
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[n][:2])) for n in INPUT_NAMES)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        export_program(
            model,
            args,
            INPUT_NAMES,
            OUTPUT_NAME,
            {n: {0: batch} for n in INPUT_NAMES},
            tmp,
        )
        result = parity(tmp, model, sample)
        if not result.ok:
            raise RuntimeError(
                f"fusion ONNX/torch parity failed: min cosine {result.min_cosine:.6f} "
                f"< {MIN_COSINE}"
            )
        props = dict(metadata or {})
        props[META_PARITY_MAX_ABS] = f"{result.max_abs_diff:.3e}"
        props[META_PARITY_MIN_COS] = f"{result.min_cosine:.8f}"
        write_metadata(tmp, props)
        os.replace(tmp, path)
    return result
