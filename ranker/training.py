"""Train the deep ranker on point-in-time rows: seeded, early-stopped, with curves.

``fit_ranker`` takes encoded arrays (see :mod:`ranker.features`), trains
:class:`ranker.model.Ranker` with binary cross-entropy, keeps the weights of the epoch with
the best validation loss and stops after ``patience`` epochs without improvement.
``save_curves`` draws loss curves as a PNG.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ranker.model import Ranker


@dataclass
class TrainConfig:
    """Optimisation settings; the defaults suit ml-latest-small on 2 CPU cores."""

    epochs: int = 8
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-5
    patience: int = 2
    dim: int = 32
    seed: int = 0
    positive_weight: float = 1.0
    progress: bool = True


@dataclass
class TrainHistory:
    """Per-epoch losses and the epoch whose weights were kept."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch intra-op threads, restoring the previous count after.

    The models are small: per-op threading costs more than it gains, and on a shared 2-core
    box two OpenMP threads made training 3-25x slower than one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _batches(n: int, size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, size):
        yield order[start : start + size]


def model_inputs(
    data: dict[str, np.ndarray], idx: np.ndarray, vectors: np.ndarray
) -> list[torch.Tensor]:
    """The model's five inputs for rows ``idx``; item vectors are gathered per batch.

    ``data`` holds ``history_idx`` / ``item_idx`` (rows of ``vectors``, -1 for none) rather
    than vectors, so a training set of any size never copies vectors into every row.
    """
    history_idx, item_idx = data["history_idx"][idx], data["item_idx"][idx]
    mask = (history_idx >= 0).astype(np.float32)
    history = vectors[np.maximum(history_idx, 0)] * mask[..., None]
    item = vectors[np.maximum(item_idx, 0)] * (item_idx >= 0)[:, None]
    arrays = [data["user_dense"][idx], history, mask, item, data["item_dense"][idx]]
    return [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays]


def _loss(
    model: Ranker, data: dict[str, np.ndarray], idx: np.ndarray, weight: float, vectors: np.ndarray
):
    feeds = model_inputs(data, idx, vectors)
    labels = torch.from_numpy(data["label"][idx].astype(np.float32))
    logits = model(*feeds)
    pos_weight = torch.tensor(weight)
    return torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels, pos_weight=pos_weight
    )


def evaluate_loss(
    model: Ranker, data: dict[str, np.ndarray], vectors: np.ndarray, batch: int = 8192
) -> float:
    """Mean binary cross-entropy over ``data`` (no gradient)."""
    model.eval()
    total, n = 0.0, len(data["label"])
    with torch.no_grad():
        for idx in _batches(n, batch, None):
            total += float(_loss(model, data, idx, 1.0, vectors)) * len(idx)
    return total / max(n, 1)


def fit_ranker(
    train: dict[str, np.ndarray],
    valid: dict[str, np.ndarray],
    vectors: np.ndarray,
    config: TrainConfig,
) -> tuple[Ranker, TrainHistory]:
    """Train a Ranker on encoded ``train`` rows, early-stopped on ``valid``."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = Ranker(
        user_dense=train["user_dense"].shape[1],
        item_dense=train["item_dense"].shape[1],
        item_dim=vectors.shape[1],
        dim=config.dim,
    )
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    history, best, best_loss, waited = TrainHistory(), None, math.inf, 0
    n = len(train["label"])
    for epoch in range(config.epochs):
        model.train()
        running, steps = 0.0, 0
        batches = _batches(n, config.batch_size, rng)
        bar = tqdm(
            batches,
            total=math.ceil(n / config.batch_size),
            disable=not config.progress,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
        )
        for idx in bar:
            optimiser.zero_grad()
            loss = _loss(model, train, idx, config.positive_weight, vectors)
            loss.backward()
            optimiser.step()
            running, steps = running + loss.item(), steps + 1
        history.train_loss.append(running / max(steps, 1))
        history.val_loss.append(evaluate_loss(model, valid, vectors))
        if history.val_loss[-1] < best_loss - 1e-4:
            best, best_loss, waited = copy.deepcopy(model.state_dict()), history.val_loss[-1], 0
            history.best_epoch = epoch
        else:
            waited += 1
            if waited >= config.patience:
                break
    if best is not None:
        model.load_state_dict(best)
    model.eval()
    return model, history


def save_curves(history: TrainHistory, path: Path, title: str = "ranker") -> Path:
    """Train and validation loss per epoch, best epoch marked, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = range(1, len(history.train_loss) + 1)
    ax.plot(epochs, history.train_loss, marker="o", label="train")
    ax.plot(epochs, history.val_loss, marker="o", label="validation")
    if history.best_epoch >= 0:
        ax.axvline(history.best_epoch + 1, color="grey", linestyle="--", label="kept")
    ax.set(xlabel="epoch", ylabel="binary cross-entropy", title=title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
