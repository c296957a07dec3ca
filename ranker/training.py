"""Train the deep ranker on point-in-time rows: seeded, early-stopped, with curves.

``fit_ranker`` takes encoded arrays (see :mod:`avrec.ranker.features`) and trains
:class:`avrec.ranker.model.Ranker` with one of two losses (``TrainConfig.loss``):

* ``bce``: pointwise binary cross-entropy over positives, explicit and sampled negatives;
* ``softmax`` (the default): sampled softmax. Each positive is scored against the negatives
  drawn for it (the rows of its ``group``: same user, same label time); a sampled negative's
  logit is corrected by ``-log(K q)`` (``q``: its probability under the sampling
  distribution, ``K``: the negatives per positive), which makes the loss an estimate of the
  softmax over the whole catalogue, the quantity full ranking is judged on.

``item_dropout`` replaces a share of training rows' item behaviour features by those of an
item without history, so items without interactions (cold items) are scored from their
vectors rather than pushed to the bottom. The weights of the epoch with the best validation
loss are kept; training stops after ``patience`` epochs without improvement. ``save_curves``
draws loss curves as a PNG.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from avrec.ranker.model import Ranker
from avrec.training_set import Sampling

Loss = Literal["bce", "softmax"]


@dataclass
class TrainConfig:
    """The deep ranker's training: ``TrainConfig()`` is the shipped training, what ``avrec
    train`` runs by default (its options take their defaults from these fields) and what the
    evaluation harness trains (with fewer epochs).

    The loss, the negatives and their sampling and the item dropout were chosen on the
    per-user split's validation NDCG@10 (README, "Negative sampling and class weighting");
    the rest suits ml-latest-small on 2 CPU cores.

    >>> TrainConfig().loss, TrainConfig().negatives, TrainConfig().item_dropout
    ('softmax', 4, 0.3)
    """

    epochs: int = 8
    batch_size: int = 1024
    lr: float = 2e-3
    weight_decay: float = 1e-5
    patience: int = 2
    dim: int = 32
    seed: int = 0
    positive_weight: float = 1.0  # bce only
    loss: Loss = "softmax"
    negatives: int = 4  # sampled negatives per positive
    sampling: Sampling = "uniform"  # how the negatives are drawn
    item_dropout: float = 0.3  # share of training rows whose item behaviour is blanked
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


class BestWeights:
    """Early stopping: keeps a copy of the best epoch's weights and says when to stop.

    >>> layer = torch.nn.Linear(1, 1)
    >>> keeper = BestWeights(layer, patience=1, higher_is_better=True)
    >>> keeper.update(0.5), keeper.update(0.4), keeper.best_epoch
    (False, True, 0)
    """

    def __init__(self, model: torch.nn.Module, patience: int, higher_is_better: bool) -> None:
        self.model, self.patience, self.sign = model, patience, 1.0 if higher_is_better else -1.0
        self.best, self.best_epoch, self.epochs, self.waited = -math.inf, -1, 0, 0
        self.state = copy.deepcopy(model.state_dict())

    def update(self, value: float) -> bool:
        """Record an epoch's validation value; True when training should stop."""
        if self.sign * value > self.best:
            self.best, self.best_epoch, self.waited = self.sign * value, self.epochs, 0
            self.state = copy.deepcopy(self.model.state_dict())
        else:
            self.waited += 1
        self.epochs += 1
        return self.waited >= self.patience

    def restore(self) -> None:
        """Load the best epoch's weights back and put the model in eval mode."""
        self.model.load_state_dict(self.state)
        self.model.eval()


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


def candidate_lists(labels: np.ndarray, groups: np.ndarray, width: int) -> np.ndarray:
    """``[positives, 1 + width]`` row indices: each positive, then up to ``width`` negatives
    of its group (-1 pads); positives whose group has no negative are left out.

    >>> candidate_lists(np.array([1, 0, 0, 1, 0]), np.array([0, 0, 0, 1, 2]), 2).tolist()
    [[0, 1, 2]]
    """
    negatives = np.flatnonzero(labels == 0)
    negatives = negatives[np.argsort(groups[negatives], kind="stable")]
    negative_groups = groups[negatives]
    positives = np.flatnonzero(labels == 1)
    start = np.searchsorted(negative_groups, groups[positives], "left")
    end = np.searchsorted(negative_groups, groups[positives], "right")
    offsets = start[:, None] + np.arange(width)[None, :]
    picked = np.where(
        offsets < end[:, None], negatives[np.minimum(offsets, max(len(negatives) - 1, 0))], -1
    )
    keep = end > start
    return np.concatenate([positives[keep, None], picked[keep]], axis=1)


def _inputs(
    data: dict[str, np.ndarray],
    rows: np.ndarray,
    vectors: np.ndarray,
    dropout: float = 0.0,
    rng: np.random.Generator | None = None,
) -> list[torch.Tensor]:
    """Model inputs of ``rows``; with ``rng``, a ``dropout`` share of them get the item
    behaviour features of an item without history (``data["item_blank"]``: the value per
    column, NaN for a column kept as is)."""
    feeds = model_inputs(data, rows, vectors)
    if rng is None or dropout <= 0 or "item_blank" not in data:
        return feeds
    blank = torch.from_numpy(data["item_blank"].astype(np.float32))
    blanked = torch.where(torch.isnan(blank), feeds[4], torch.nan_to_num(blank))
    drop = torch.from_numpy(rng.random(len(rows)) < dropout)[:, None]
    feeds[4] = torch.where(drop, blanked, feeds[4])
    return feeds


def _bce(model: Ranker, feeds: list[torch.Tensor], labels: np.ndarray, weight: float):
    return torch.nn.functional.binary_cross_entropy_with_logits(
        model(*feeds), torch.from_numpy(labels.astype(np.float32)), pos_weight=torch.tensor(weight)
    )


def _softmax(
    model: Ranker, feeds: list[torch.Tensor], lists: np.ndarray, log_kq: np.ndarray
) -> torch.Tensor:
    """Cross-entropy of each list's first row (the positive) against its negatives."""
    logits = model(*feeds).view(lists.shape) - torch.from_numpy(log_kq.astype(np.float32))
    logits = logits.masked_fill(torch.from_numpy(lists < 0), -1e9)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


class _Objective:
    """The configured loss over batches of training units (rows for bce, lists for softmax)."""

    def __init__(self, data: dict[str, np.ndarray], config: TrainConfig, width: int) -> None:
        self.data, self.config = data, config
        if config.loss == "softmax":
            self.units = candidate_lists(data["label"], data["group"], width)
        elif config.loss == "bce":
            self.units = np.arange(len(data["label"]))[:, None]
        else:
            raise ValueError(f"loss must be bce or softmax, not {config.loss!r}")

    def __len__(self) -> int:
        return len(self.units)

    def __call__(
        self,
        model: Ranker,
        batch: np.ndarray,
        vectors: np.ndarray,
        rng: np.random.Generator | None = None,
    ) -> torch.Tensor:
        units = self.units[batch]
        rows = np.maximum(units.ravel(), 0)
        feeds = _inputs(self.data, rows, vectors, self.config.item_dropout, rng)
        if self.config.loss == "softmax":
            log_kq = np.where(units >= 0, self.data["log_kq"][rows].reshape(units.shape), 0.0)
            return _softmax(model, feeds, units, log_kq)
        weight = self.config.positive_weight if rng is not None else 1.0
        return _bce(model, feeds, self.data["label"][rows], weight)


def evaluate_loss(
    model: Ranker,
    data: dict[str, np.ndarray],
    vectors: np.ndarray,
    config: TrainConfig | None = None,
    width: int | None = None,
    batch: int = 8192,
) -> float:
    """Mean loss of ``config`` (default: the shipped training's) over ``data``, no gradient;
    ``width`` as in :func:`fit_ranker`."""
    config = config or TrainConfig()
    objective = _Objective(data, config, config.negatives if width is None else width)
    model.eval()
    total, n = 0.0, len(objective)
    with torch.no_grad():
        for idx in _batches(n, max(1, batch // objective.units.shape[1]), None):
            total += float(objective(model, idx, vectors)) * len(idx)
    return total / max(n, 1)


def fit_ranker(
    train: dict[str, np.ndarray],
    valid: dict[str, np.ndarray],
    vectors: np.ndarray,
    config: TrainConfig,
    width: int | None = None,
) -> tuple[Ranker, TrainHistory]:
    """Train a Ranker on encoded ``train`` rows, early-stopped on ``valid``.

    ``width``: negatives per positive in the softmax lists (default: ``config.negatives``, the
    sampled negatives per positive). ``batch_size`` counts scored rows, so both losses see
    similar batches.
    """
    width = config.negatives if width is None else width
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
    objective = _Objective(train, config, width)
    per_batch = max(1, config.batch_size // objective.units.shape[1])
    history, best, best_loss, waited = TrainHistory(), None, math.inf, 0
    for epoch in range(config.epochs):
        model.train()
        running, steps = 0.0, 0
        bar = tqdm(
            _batches(len(objective), per_batch, rng),
            total=math.ceil(len(objective) / per_batch),
            disable=not config.progress,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            leave=False,
        )
        for idx in bar:
            optimiser.zero_grad()
            loss = objective(model, idx, vectors, rng)
            loss.backward()
            optimiser.step()
            running, steps = running + loss.item(), steps + 1
        history.train_loss.append(running / max(steps, 1))
        history.val_loss.append(evaluate_loss(model, valid, vectors, config, width))
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
