"""Fit one fusion contrastively on co-consumed items, and embed the catalogue with it.

**Objective.** Symmetric InfoNCE with in-batch negatives and a fixed temperature: the mixed
embedding of one item of a pair (:mod:`avrec.encoders.co_consumption`) must pick its partner out of
the batch. Rows whose item equals the positive (popular items recur within a batch) are masked
out as negatives. Both fusions are trained the same way, seeded: the weighted sum (projections
learned, ``a`` fixed) and the gated fusion.

**Why contrastive on co-consumption, not joint training with the ranker.** The mixed embedding
is a content representation shared by retrieval (nearest neighbours), the ranker and cold-start
items; trained once per cutoff against a cheap, label-free signal it is decoupled from any one
model, reusable, and the same vector is served everywhere. Joint training would tie it to one
ranker and its label split. Because the embedding only sees interactions before its cutoff
(stamped as its ``event_timestamp``), a ranker that evaluates on later data does not leak; a
ranker whose training split ends earlier can retrain this fusion with that cutoff.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch.nn import functional as F

from avrec.encoders.co_consumption import NotEnoughDataError
from avrec.encoders.fusion import IMAGE_DIM, D, GatedFusion, ItemFusionModel, WeightedSumFusion


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by both fusions."""

    d: int = D
    epochs: int = 3
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 0.07
    seed: int = 0


@dataclass
class ItemFeatures:
    """Precomputed encodings of a catalogue, row-aligned (image rows are zeros where absent)."""

    item_ids: np.ndarray
    text: np.ndarray
    image: np.ndarray
    has_image: np.ndarray
    text_encoders: tuple[str, ...]
    image_encoders: tuple[str, ...]

    @classmethod
    def from_encodings(cls, encodings: pl.DataFrame) -> ItemFeatures:
        """From an ``item_encodings`` frame (sorted by ``item_id``)."""
        frame = encodings.sort("item_id")
        text_dim = int(frame["text_embedding"].list.len().max())
        text = frame["text_embedding"].list.to_array(text_dim).to_numpy().astype(np.float32)
        has_image = (
            frame["has_image"].fill_null(False) & frame["image_embedding"].is_not_null()
        ).to_numpy()
        image_dim = int(frame["image_embedding"].list.len().max() or IMAGE_DIM)
        image = np.zeros((frame.height, image_dim), dtype=np.float32)
        if has_image.any():
            present = frame.filter(pl.Series(has_image))["image_embedding"]
            image[has_image] = present.list.to_array(image_dim).to_numpy()
        return cls(
            item_ids=frame["item_id"].to_numpy().astype(np.int64),
            text=text,
            image=image,
            has_image=has_image.astype(bool),
            text_encoders=_distinct(frame["text_encoder"]),
            image_encoders=_distinct(frame["image_encoder"]),
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: np.ndarray) -> np.ndarray:
        """Row of each id (``-1`` where the id has no encodings)."""
        pos = np.searchsorted(self.item_ids, item_ids)
        pos = np.clip(pos, 0, max(len(self.item_ids) - 1, 0))
        found = len(self.item_ids) > 0
        return np.where(found & (self.item_ids[pos] == item_ids), pos, -1)

    def tensors(self, rows: np.ndarray | slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Model inputs of ``rows``."""
        return (
            torch.from_numpy(self.text[rows]),
            torch.from_numpy(self.image[rows]),
            torch.from_numpy(self.has_image[rows]),
        )


def _distinct(column: pl.Series) -> tuple[str, ...]:
    return tuple(sorted(v for v in column.unique().to_list() if v))


def info_nce(
    za: torch.Tensor, zb: torch.Tensor, a: torch.Tensor, b: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Symmetric InfoNCE of unit vectors ``za[i] <-> zb[i]``; same-item negatives masked."""
    logits = za @ zb.T / temperature
    eye = torch.eye(len(a), dtype=torch.bool)
    clash_ab = (b.unsqueeze(0) == b.unsqueeze(1)) | (b.unsqueeze(0) == a.unsqueeze(1))
    clash_ba = (a.unsqueeze(0) == a.unsqueeze(1)) | (a.unsqueeze(0) == b.unsqueeze(1))
    target = torch.arange(len(a))
    loss_ab = F.cross_entropy(logits.masked_fill(clash_ab & ~eye, float("-inf")), target)
    loss_ba = F.cross_entropy(logits.T.masked_fill(clash_ba & ~eye, float("-inf")), target)
    return (loss_ab + loss_ba) / 2


def fit(
    kind: str,
    features: ItemFeatures,
    pairs: np.ndarray,
    config: TrainConfig = TrainConfig(),
    a: float = 0.5,
) -> tuple[ItemFusionModel, list[float]]:
    """Train a fresh ``kind`` (``"asum"`` with ``a``, or ``"gated"``) on feature-row ``pairs``.

    Seeded by ``config.seed``: the same inputs give bit-identical weights. Returns the model
    (eval mode) and the mean loss of each epoch.
    """
    if len(pairs) < 2:
        raise NotEnoughDataError(f"need at least 2 training pairs, got {len(pairs)}")
    torch.manual_seed(config.seed)
    if kind == "asum":
        fusion: WeightedSumFusion | GatedFusion = WeightedSumFusion(a)
    elif kind == "gated":
        fusion = GatedFusion(config.d)
    else:
        raise ValueError(f"unknown fusion kind {kind!r}")
    dims = features.text.shape[1], features.image.shape[1]
    model = ItemFusionModel(fusion, config.d, *dims)
    generator = torch.Generator().manual_seed(config.seed)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    pair_tensor = torch.from_numpy(pairs)
    steps_per_epoch = max(1, len(pairs) // config.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1
    )
    losses: list[float] = []
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(pairs), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            batch = pair_tensor[order[step * config.batch_size : (step + 1) * config.batch_size]]
            a_rows, b_rows = batch[:, 0], batch[:, 1]
            za = model(*features.tensors(a_rows.numpy()))
            zb = model(*features.tensors(b_rows.numpy()))
            loss = info_nce(za, zb, a_rows, b_rows, config.temperature)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        losses.append(total / steps_per_epoch)
    return model.eval(), losses


def embed(model: ItemFusionModel, features: ItemFeatures, batch_size: int = 4096) -> np.ndarray:
    """Mixed embeddings of every catalogue row (torch eager)."""
    model.eval()
    parts = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            rows = slice(start, start + batch_size)
            parts.append(model(*features.tensors(rows)).numpy())
    return np.concatenate(parts) if parts else np.zeros((0, model.d), np.float32)
