"""The retrieval pair: a user tower and an item tower trained with in-batch sampled softmax.

Training rows are the positive (user, item) labels of the fit interactions (rating >= 4),
each with the user's and the item's behaviour features as of the label time, read through
the ``behaviour_features`` service (:mod:`avrec.pit_join`). A batch's other positives are
its negatives; their logits are corrected by ``log q`` (each item's share of the training
positives, the chance it appears as an in-batch negative) and a batch's duplicates of the
positive item are masked out. The latest 10% of labels early-stop training; everything is
seeded.

:class:`TwoTowerRecommender` scores the whole catalogue by the dot product of the two unit
vectors. Both sides are read as of each user's cut: the user vector from the
``user_features`` service, the item vectors from the item tower over the ``item_features``
service, computed once per distinct cut time. Without a cut, the time just after the last
fit interaction is used. The towers run on one torch thread (``TwoTowerConfig.threads``):
faster for models this small, and robust on a shared 2-core box. On ml-latest-small (text
vectors, 2 busy cores) fitting takes ~17 s and scoring ~600 users at their own cuts ~13 s.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from avrec import training_set
from avrec.pit_join import join_features_duckdb
from ranker.contract import (
    ITEM_SERVICE,
    TRAINING_SERVICE,
    USER_SERVICE,
    ModelContract,
    item_tower_contract,
    user_tower_contract,
)
from ranker.features import FeatureEncoder, ItemVectors
from ranker.model import ItemTower, UserTower
from ranker.recommender import Recommender
from ranker.training import model_inputs, torch_threads

if TYPE_CHECKING:
    from feast import FeatureStore

TIME = "label_timestamp"


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


def _utc(times: np.ndarray) -> pl.Series:
    return pl.Series(TIME, np.asarray(times, dtype="datetime64[us]")).dt.replace_time_zone("UTC")


class TwoTowerRecommender(Recommender):
    """Two-tower retrieval over point-in-time behaviour features and a table of item vectors."""

    def __init__(
        self,
        vectors: ItemVectors,
        store: FeatureStore,
        genres: int,
        config: TwoTowerConfig | None = None,
        seed: int = 0,
        name: str | None = None,
        embedding_version: str = "unversioned",
    ) -> None:
        super().__init__(seed)
        self.vectors, self.store = vectors, store
        self.config = config or TwoTowerConfig(seed=seed)
        self.encoder = FeatureEncoder(genres=genres)
        self.name = name or f"two-tower[{vectors.name}]"
        self.embedding_version = embedding_version
        self.user_tower: UserTower | None = None
        self.item_tower: ItemTower | None = None
        self.history = TwoTowerHistory()
        self.fit_end = np.datetime64("NaT", "us")
        self.items_per_join = 200_000

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        rows = positive_rows(interactions, items, self.store, self.config.positive_threshold)
        cut = rows[TIME].quantile(0.9, interpolation="lower")
        train, valid = rows.filter(pl.col(TIME) < cut), rows.filter(pl.col(TIME) >= cut)
        self.encoder.fit(train)
        self.user_tower, self.item_tower, self.history = fit_two_tower(
            encode_rows(self.encoder, self.vectors, train),
            encode_rows(self.encoder, self.vectors, valid),
            self.vectors.vectors,
            self.config,
        )
        last = interactions["event_timestamp"].max()
        self.fit_end = np.datetime64(last.replace(tzinfo=None), "us") + np.timedelta64(1, "us")

    def encode_users(self, user_ids: np.ndarray, as_of: np.ndarray) -> dict[str, np.ndarray]:
        """Encoded user features (``user_dense``, ``history_idx``) read strictly before each
        ``as_of`` through the ``user_features`` service."""
        labels = pl.DataFrame({"user_id": np.asarray(user_ids, np.int64)}).with_columns(_utc(as_of))
        rows = join_features_duckdb(labels, self.store, USER_SERVICE)
        return {
            "user_dense": self.encoder.user_dense(rows),
            "history_idx": self.encoder.history_rows(rows, self.vectors),
        }

    def user_vectors(self, user_ids: np.ndarray, as_of: np.ndarray) -> np.ndarray:
        """``[n, dim]`` user vectors as of each ``as_of``.

        Users go through the tower one at a time, so a user's vector does not depend on who
        else is in the request.
        """
        assert self.user_tower is not None
        data = self.encode_users(user_ids, as_of)
        out = np.empty((len(user_ids), self.config.dim), dtype=np.float32)
        with torch.no_grad():
            for i in range(len(user_ids)):
                user_in = self.user_inputs(data, np.array([i]))
                out[i] = self.user_tower(*map(torch.from_numpy, user_in)).numpy()[0]
        return out

    def user_inputs(self, data: dict[str, np.ndarray], idx: np.ndarray) -> list[np.ndarray]:
        """The user tower's three float32 inputs for rows ``idx`` of encoded user features."""
        history_idx = data["history_idx"][idx]
        mask = (history_idx >= 0).astype(np.float32)
        history = self.vectors.vectors[np.maximum(history_idx, 0)] * mask[..., None]
        return [
            np.ascontiguousarray(a, dtype=np.float32)
            for a in (data["user_dense"][idx], history, mask)
        ]

    def iter_item_vectors(self, times: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(i, [n_items, dim])``: the catalogue's vectors as of ``times[i]``, in order.

        Item features are joined for several times at once; the tower runs once per time
        over the whole catalogue, so a time's vectors do not depend on the other times.
        """
        assert self.item_tower is not None
        n_items = self.item_ids.size
        item_idx = self.vectors.rows(self.item_ids)
        present = (item_idx >= 0)[:, None]
        item_vec = torch.from_numpy(self.vectors.vectors[np.maximum(item_idx, 0)] * present)
        per_join = max(1, self.items_per_join // max(n_items, 1))
        for start in range(0, len(times), per_join):
            chunk = times[start : start + per_join]
            labels = pl.DataFrame({"item_id": np.tile(self.item_ids, len(chunk))}).with_columns(
                _utc(np.repeat(chunk, n_items))
            )
            rows = join_features_duckdb(labels, self.store, ITEM_SERVICE)
            dense = item_dense(self.encoder, rows, np.tile(item_idx, len(chunk)))
            with torch.no_grad():
                for j in range(len(chunk)):
                    part = torch.from_numpy(dense[j * n_items : (j + 1) * n_items])
                    yield start + j, self.item_tower(item_vec, part).numpy()

    def item_vectors(self, time: np.datetime64) -> np.ndarray:
        """``[n_items, dim]``: the catalogue's vectors as of ``time`` (e.g. to build an index)."""
        return next(self.iter_item_vectors(np.array([time], dtype="datetime64[us]")))[1]

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        with torch_threads(self.config.threads):
            return self._score_catalogue(user_ids, as_of)

    def _score_catalogue(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        times = (
            np.full(len(user_ids), self.fit_end)
            if as_of is None
            else np.asarray(as_of, dtype="datetime64[us]")
        )
        times = np.where(np.isnat(times), self.fit_end, times)
        users = torch.from_numpy(self.user_vectors(user_ids, times)).double()
        distinct, which = np.unique(times, return_inverse=True)
        out = np.empty((len(user_ids), self.item_ids.size), dtype=np.float64)
        # The products run in torch: numpy's BLAS threads would spin against torch's.
        for t, items in self.iter_item_vectors(distinct):
            rows = np.flatnonzero(which == t)
            out[rows] = (users[rows] @ torch.from_numpy(items).double().T).numpy()
        return out

    def contract(self) -> ModelContract:
        """The contract under which :attr:`user_tower` is exported (:mod:`ranker.export`)."""
        return user_tower_contract(
            self.encoder,
            self.vectors.dim,
            self.config.dim,
            self.vectors.name,
            self.embedding_version,
        )

    def item_contract(self) -> ModelContract:
        """The contract under which :attr:`item_tower` is exported."""
        return item_tower_contract(
            self.encoder,
            self.vectors.dim,
            self.config.dim,
            self.vectors.name,
            self.embedding_version,
        )
