"""Training the retrieval towers: positive rows with behaviour features as of each label, their
encoding, the in-batch sampled softmax (``log q``-corrected, duplicates masked) and the fit,
early-stopped on the latest labels' loss. The recommender over the trained pair is
:class:`avrec.ranker.two_tower.TwoTowerRecommender`."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from avrec import training_set
from avrec.pit_join import join_features_duckdb
from avrec.ranker.contract import TRAINING_SERVICE
from avrec.ranker.features import FeatureEncoder, ItemVectors
from avrec.ranker.model import ItemTower, UserTower
from avrec.ranker.training import model_inputs, torch_threads

if TYPE_CHECKING:
    from feast import FeatureStore


@dataclass
class TwoTowerConfig:
    """Optimisation settings; the defaults suit ml-latest-small on 2 CPU cores."""

    epochs: int = 12
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-5
    dim: int = 64
    temperature: float = 0.1
    logq: bool = True
    patience: int = 3
    seed: int = 0
    positive_threshold: float = 4.0
    progress: bool = False
    threads: int = 1  # torch intra-op threads while fitting and scoring (see torch_threads)


@dataclass
class TwoTowerHistory:
    """Per-epoch in-batch softmax losses and the epoch whose weights were kept."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1


def positive_rows(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    store: FeatureStore,
    positive_threshold: float = 4.0,
) -> pl.DataFrame:
    """Positive labels of the rating interactions, with behaviour features as of each label."""
    if "event_type" not in interactions.columns:  # the harness passes rating events only
        interactions = interactions.with_columns(pl.lit("rating").alias("event_type"))
    ratings = interactions.filter(pl.col("event_type") == "rating")
    spec = training_set.TrainingSetSpec(
        start=ratings["event_timestamp"].min(),
        end=ratings["event_timestamp"].max() + timedelta(microseconds=1),
        negatives=0,
        positive_threshold=positive_threshold,
        explicit_negatives=False,
        feature_service=TRAINING_SERVICE,
    )
    labels = training_set.build_labels(interactions, items, spec)
    return join_features_duckdb(labels, store, spec.feature_service)


def item_dense(encoder: FeatureEncoder, rows: pl.DataFrame, item_idx: np.ndarray) -> np.ndarray:
    """Item behaviour features plus the ``item_has_no_vector`` flag (as DeepRanker)."""
    flag = (item_idx < 0).astype(np.float32)[:, None]
    return np.concatenate([encoder.item_dense(rows), flag], 1)


def encode_rows(
    encoder: FeatureEncoder, vectors: ItemVectors, rows: pl.DataFrame
) -> dict[str, np.ndarray]:
    """User and item inputs of positive rows (``item_idx``: rows of ``vectors``, -1 for none)."""
    item_idx = vectors.rows(rows["item_id"].to_numpy())
    return {
        "user_dense": encoder.user_dense(rows),
        "history_idx": encoder.history_rows(rows, vectors),
        "item_idx": item_idx,
        "item_dense": item_dense(encoder, rows, item_idx),
        "item_id": rows["item_id"].to_numpy(),
    }


def _tower_inputs(
    data: dict[str, np.ndarray], idx: np.ndarray, vectors: np.ndarray
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    user_dense, history, mask, item, dense = model_inputs(data, idx, vectors)
    return [user_dense, history, mask], [item, dense]


def in_batch_loss(
    users: torch.Tensor,
    items: torch.Tensor,
    item_ids: np.ndarray,
    log_q: np.ndarray | None,
    temperature: float,
) -> torch.Tensor:
    """Sampled softmax over the batch: row ``i``'s positive is column ``i``; the other rows'
    items are negatives (``log q``-corrected), copies of row ``i``'s item are masked."""
    logits = users @ items.T / temperature
    if log_q is not None:
        logits = logits - torch.from_numpy(log_q.astype(np.float32))[None, :]
    same = torch.from_numpy(item_ids[:, None] == item_ids[None, :])
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, -1e9)
    return torch.nn.functional.cross_entropy(logits, torch.arange(len(item_ids)))


def sampling_log_q(train_item_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """``log`` of each item's share of the training positives (an unseen item counts once)."""
    ids, counts = np.unique(train_item_ids, return_counts=True)
    pos = np.minimum(np.searchsorted(ids, item_ids), len(ids) - 1)
    return np.log(np.where(ids[pos] == item_ids, counts[pos], 1) / counts.sum())


def _epoch_loss(
    towers: tuple[UserTower, ItemTower],
    data: dict[str, np.ndarray],
    vectors: np.ndarray,
    config: TwoTowerConfig,
    log_q: np.ndarray | None,
    order: np.ndarray,
    optimiser: torch.optim.Optimizer | None,
    desc: str,
) -> float:
    user_tower, item_tower = towers
    running, steps = 0.0, 0
    starts = range(0, len(order) - 1, config.batch_size)
    for start in tqdm(starts, disable=not config.progress, desc=desc, leave=False):
        idx = order[start : start + config.batch_size]
        if len(idx) < 2:
            continue
        user_in, item_in = _tower_inputs(data, idx, vectors)
        q = None if log_q is None else log_q[idx]
        with torch.set_grad_enabled(optimiser is not None):
            loss = in_batch_loss(
                user_tower(*user_in),
                item_tower(*item_in),
                data["item_id"][idx],
                q,
                config.temperature,
            )
        if optimiser is not None:
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        running, steps = running + loss.item(), steps + 1
    return running / max(steps, 1)


def fit_two_tower(
    train: dict[str, np.ndarray],
    valid: dict[str, np.ndarray],
    vectors: np.ndarray,
    config: TwoTowerConfig,
) -> tuple[UserTower, ItemTower, TwoTowerHistory]:
    """Train both towers on encoded positive rows, early-stopped on ``valid``'s loss."""
    with torch_threads(config.threads):
        return _fit(train, valid, vectors, config)


def _fit(
    train: dict[str, np.ndarray],
    valid: dict[str, np.ndarray],
    vectors: np.ndarray,
    config: TwoTowerConfig,
) -> tuple[UserTower, ItemTower, TwoTowerHistory]:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    user_tower = UserTower(train["user_dense"].shape[1], vectors.shape[1], config.dim)
    item_tower = ItemTower(vectors.shape[1], train["item_dense"].shape[1], config.dim)
    towers = (user_tower, item_tower)
    params = [*user_tower.parameters(), *item_tower.parameters()]
    optimiser = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    q_train, q_valid = (
        sampling_log_q(train["item_id"], d["item_id"]) if config.logq else None
        for d in (train, valid)
    )
    history, best, best_loss, waited = TwoTowerHistory(), None, math.inf, 0
    valid_order = np.arange(len(valid["item_id"]))
    for epoch in range(config.epochs):
        for tower in towers:
            tower.train()
        order = rng.permutation(len(train["item_id"]))
        history.train_loss.append(
            _epoch_loss(
                towers,
                train,
                vectors,
                config,
                q_train,
                order,
                optimiser,
                f"epoch {epoch + 1}/{config.epochs}",
            )
        )
        for tower in towers:
            tower.eval()
        history.val_loss.append(
            _epoch_loss(towers, valid, vectors, config, q_valid, valid_order, None, "validation")
        )
        if history.val_loss[-1] < best_loss - 1e-4:
            best = copy.deepcopy([t.state_dict() for t in towers])
            best_loss, waited, history.best_epoch = history.val_loss[-1], 0, epoch
        else:
            waited += 1
            if waited >= config.patience:
                break
    if best is not None:
        for tower, state in zip(towers, best, strict=True):
            tower.load_state_dict(state)
    for tower in towers:
        tower.eval()
    return user_tower, item_tower, history
