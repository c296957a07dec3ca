"""The hybrid's pool scorer: an MLP per candidate, trained listwise over each user's pool.

:class:`ListwiseScorer` scores standardised candidate features; :func:`fit_scorer` trains it
with a softmax over the user's pool against their positives (ListNet-style,
:func:`listwise_loss`), early-stopped on held-out users; :class:`ScorerBag` averages several
seeds; :func:`export_scorer` writes the bag as ONNX for the server
(:mod:`avrec.ranker.hybrid_pipeline` runs it on onnxruntime).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from avrec.ranker.hybrid_pipeline import SCORER_KIND
from avrec.ranker.training import BestWeights

if TYPE_CHECKING:
    from avrec.ranker.hybrid import HybridConfig

MIN_STD = 1e-6  # a feature spread below this is taken as none (see ListwiseScorer)


class ListwiseScorer(nn.Module):
    """Standardised features -> MLP -> one score per candidate.

    >>> scorer = ListwiseScorer(np.zeros(3), np.ones(3), hidden=8)
    >>> scorer(torch.zeros(2, 5, 3)).shape
    torch.Size([2, 5])
    >>> ListwiseScorer(np.zeros(2), np.array([3e-7, 0.5]), hidden=8).std.tolist()
    [1.0, 0.5]
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        # a feature (nearly) constant in training is centred, not scaled: divided by a
        # float-rounding spread (3e-7 was seen), its noise would reach the output x 1e6
        self.register_buffer("std", torch.as_tensor(np.where(std > MIN_STD, std, 1.0),
                                                    dtype=torch.float32))
        width = len(mean)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp((features - self.mean) / self.std).squeeze(-1)


class ScorerBag(nn.Module):
    """The mean of several scorers' outputs (a bag of seeds: less variance, same interface)."""

    def __init__(self, scorers: Sequence[ListwiseScorer]) -> None:
        super().__init__()
        self.scorers = nn.ModuleList(scorers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([s(features) for s in self.scorers]).mean(0)


def listwise_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the softmax over a pool and its positives (uniform over them)."""
    target = labels / labels.sum(1, keepdim=True)
    return -(target * torch.log_softmax(scores, dim=1)).sum(1).mean()


@dataclass
class HybridHistory:
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1


def fit_scorer(features: np.ndarray, labels: np.ndarray, cfg: HybridConfig
               ) -> tuple[ListwiseScorer, HybridHistory]:
    """Train the listwise scorer; 20% of the users early-stop it (seeded)."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    users = rng.permutation(features.shape[0])
    n_val = max(1, users.size // 5)
    val, train = users[:n_val], users[n_val:]
    flat = features[train].reshape(-1, features.shape[-1])
    model = ListwiseScorer(flat.mean(0), flat.std(0), cfg.hidden)
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y = torch.from_numpy(features), torch.from_numpy(labels.astype(np.float32))
    history, keeper = HybridHistory(), BestWeights(model, cfg.patience, higher_is_better=False)
    for _ in range(cfg.epochs):
        model.train()
        losses = []
        for start in range(0, train.size, cfg.batch_users):
            batch = torch.from_numpy(train[start : start + cfg.batch_users])
            loss = listwise_loss(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        rng.shuffle(train)
        model.eval()
        with torch.no_grad():
            held = torch.from_numpy(val)
            val_loss = float(listwise_loss(model(x[held]), y[held]))
        history.train_loss.append(float(np.mean(losses)))
        history.val_loss.append(val_loss)
        if keeper.update(val_loss):
            break
    keeper.restore()
    history.best_epoch = keeper.best_epoch
    return model, history


def export_scorer(scorer: nn.Module, n_features: int, signature: str, path: Path) -> None:
    """``scorer`` as ONNX: input ``features [users, pool, n_features]``, output ``scores``;
    stamped with the pipeline's feature signature."""
    import onnx

    from avrec.encoders.onnx_export import quiet_exporter_loggers
    from avrec.names import OPSET

    users, pool = torch.export.Dim("users"), torch.export.Dim("pool")
    example = (torch.zeros(2, 3, n_features),)
    with warnings.catch_warnings(), quiet_exporter_loggers():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        program = torch.onnx.export(
            scorer.eval(), example, input_names=["features"], output_names=["scores"],
            dynamic_shapes={"features": {0: users, 1: pool}}, opset_version=OPSET,
            dynamo=True, verbose=False,
        )
    proto = program.model_proto
    for key, value in {"kind": SCORER_KIND, "features": signature}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
