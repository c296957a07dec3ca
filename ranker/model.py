"""The deep ranker: small composable modules, in the spirit of TorchRec's ``dlrm.py``.

A (user, item) pair is scored from

* ``user_dense``: the user's behaviour features (counts, mean rating, ages, genre affinity),
* ``history`` / ``history_mask``: vectors of the user's last N items (the design's e_L(u)),
* ``item_vector``: the candidate's item vector (mixed embedding, or a single modality),
* ``item_dense``: the candidate's behaviour features (popularity, mean rating, age).

``DenseArch`` embeds dense features, ``TargetAttention`` pools the history with the candidate
as query (DIN-style), ``InteractionArch`` crosses the pieces, ``OverArch`` turns them into a
logit. ``Ranker`` composes them; every input is a float32 tensor, so the model exports to
ONNX with a fixed contract (:mod:`avrec.ranker.contract`).

The retrieval pair (``UserTower``, ``ItemTower``) maps users and items into one space whose
dot product pulls candidates from the whole catalogue before ranking.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def mlp(sizes: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear + ReLU (+ dropout) stack; the last layer has no activation.

    >>> mlp([8, 16, 1])(torch.zeros(2, 8)).shape
    torch.Size([2, 1])
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class DenseArch(nn.Module):
    """Dense (numeric) features to a ``dim``-vector.

    >>> DenseArch(5, 32)(torch.zeros(3, 5)).shape
    torch.Size([3, 32])
    """

    def __init__(self, n_features: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(n_features), mlp([n_features, dim, dim]), nn.ReLU())

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        return self.net(dense)


class TargetAttention(nn.Module):
    """Pools a history of item vectors with the candidate item as the query (DIN-style).

    Attention weights come from an MLP over ``[h, q, h*q, h-q]``; padded positions
    (``mask == 0``) get no weight; an empty history pools to zeros.

    >>> att = TargetAttention(16)
    >>> att(torch.zeros(2, 5, 16), torch.ones(2, 5), torch.zeros(2, 16)).shape
    torch.Size([2, 16])
    """

    def __init__(self, dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.score = mlp([4 * dim, hidden, 1])

    def forward(
        self, history: torch.Tensor, mask: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(history)
        logits = self.score(torch.cat([history, q, history * q, history - q], dim=-1)).squeeze(-1)
        logits = logits.masked_fill(mask <= 0, -1e4)
        weights = torch.softmax(logits, dim=1) * (mask > 0).to(history.dtype)
        return torch.bmm(weights.unsqueeze(1), history).squeeze(1)

    def one_history(
        self, history: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor
    ) -> torch.Tensor:
        """``forward`` for one history ``[L, dim]`` (mask ``[L]``) and many queries ``[N, dim]``.

        Same result as ``forward`` with the history repeated per query, without building
        ``[N, L, 4 * dim]``: the first layer is linear in ``[h, q, h*q, h-q]``, so its four
        weight blocks apply to ``h`` once, to ``q`` once and to ``h*q`` as one matrix product.

        >>> att = TargetAttention(4).eval()
        >>> h, q, m = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1.0, 1.0, 0.0])
        >>> full = att(h.expand(5, 3, 4), m.expand(5, 3), q)
        >>> torch.allclose(att.one_history(h, m, q), full, atol=1e-5)
        True
        """
        first, rest = self.score[0], self.score[1:]
        w_h, w_q, w_hq, w_d = first.weight.split(history.shape[-1], dim=1)
        per_history = history @ (w_h + w_d).T + first.bias  # [L, hidden]
        per_query = queries @ (w_q - w_d).T  # [N, hidden]
        crossing = (history[:, None, :] * w_hq[None]).flatten(0, 1)  # [L * hidden, dim]
        crossed = (queries @ crossing.T).view(len(queries), len(history), -1)  # [N, L, hidden]
        logits = rest(crossed + per_history[None] + per_query[:, None]).squeeze(-1)
        logits = logits.masked_fill(mask[None] <= 0, -1e4)
        weights = torch.softmax(logits, dim=1) * (mask[None] > 0).to(history.dtype)
        return weights @ history


class InteractionArch(nn.Module):
    """Crosses the pieces: concatenation plus pairwise dot products (DLRM-style).

    >>> InteractionArch(3, 8)([torch.zeros(2, 8)] * 3).shape
    torch.Size([2, 27])
    """

    def __init__(self, n_pieces: int, dim: int) -> None:
        super().__init__()
        self.n_pieces, self.dim = n_pieces, dim
        pairs = torch.triu_indices(n_pieces, n_pieces, offset=1)
        self.register_buffer("left", pairs[0], persistent=False)
        self.register_buffer("right", pairs[1], persistent=False)

    @property
    def out_dim(self) -> int:
        return self.n_pieces * self.dim + self.n_pieces * (self.n_pieces - 1) // 2

    def forward(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(pieces, dim=1)
        dots = torch.bmm(stacked, stacked.transpose(1, 2))[:, self.left, self.right]
        return torch.cat([stacked.flatten(1), dots], dim=1)


class OverArch(nn.Module):
    """The top MLP: interaction features to one logit.

    >>> OverArch(27)(torch.zeros(2, 27)).shape
    torch.Size([2])
    """

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = mlp([in_dim, hidden, hidden // 2, 1], dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class Ranker(nn.Module):
    """Scores (user, item) pairs; returns logits (apply a sigmoid for probabilities).

    >>> r = Ranker(user_dense=6, item_dense=4, item_dim=16)
    >>> r(torch.zeros(2, 6), torch.zeros(2, 5, 16), torch.ones(2, 5),
    ...   torch.zeros(2, 16), torch.zeros(2, 4)).shape
    torch.Size([2])
    """

    def __init__(self, user_dense: int, item_dense: int, item_dim: int, dim: int = 32) -> None:
        super().__init__()
        self.user_arch = DenseArch(user_dense, dim)
        self.item_arch = DenseArch(item_dense, dim)
        self.item_proj = nn.Sequential(nn.Linear(item_dim, dim), nn.LayerNorm(dim))
        self.attention = TargetAttention(dim)
        self.interaction = InteractionArch(4, dim)
        self.over = OverArch(self.interaction.out_dim)

    def forward(
        self,
        user_dense: torch.Tensor,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        item_vector: torch.Tensor,
        item_dense: torch.Tensor,
    ) -> torch.Tensor:
        item = self.item_proj(item_vector)
        pooled = self.attention(self.item_proj(history), history_mask, item)
        pieces = [self.user_arch(user_dense), pooled, item, self.item_arch(item_dense)]
        return self.over(self.interaction(pieces))

    def project_items(self, item_vector: torch.Tensor) -> torch.Tensor:
        """The candidate-side projection of item vectors (reusable across users)."""
        return self.item_proj(item_vector)

    def score_items(
        self,
        user_dense: torch.Tensor,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        items: torch.Tensor,
        item_dense: torch.Tensor,
        block: int = 256,
    ) -> torch.Tensor:
        """``forward`` for ONE user (``[1, ...]`` user inputs) against many candidates.

        ``items`` are :meth:`project_items` of the candidates' vectors, so a catalogue is
        projected once for all users; the user side is computed once per call. Equal to
        ``forward`` with the user's inputs repeated per candidate. Candidates go through in
        blocks of ``block`` so the ``[block, L, hidden]`` attention activations stay in cache
        (about 4x faster on one CPU thread than the whole catalogue at once).
        """
        history_proj = self.item_proj(history[0])
        user = self.user_arch(user_dense)
        out = []
        for start in range(0, len(items), block):
            part = items[start : start + block]
            pooled = self.attention.one_history(history_proj, history_mask[0], part)
            dense = self.item_arch(item_dense[start : start + block])
            pieces = [user.expand(len(part), -1), pooled, part, dense]
            out.append(self.over(self.interaction(pieces)))
        return torch.cat(out) if out else torch.empty(0)


class UserTower(nn.Module):
    """Retrieval user tower: behaviour and mean-pooled history to an L2-normalised vector.

    >>> UserTower(6, 16, 32)(torch.zeros(2, 6), torch.zeros(2, 5, 16), torch.ones(2, 5)).shape
    torch.Size([2, 32])
    """

    def __init__(self, user_dense: int, item_dim: int, dim: int = 64) -> None:
        super().__init__()
        self.dense = DenseArch(user_dense, dim)
        self.history = mlp([item_dim, dim])
        self.out = mlp([2 * dim, dim, dim])

    def forward(
        self, user_dense: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor
    ) -> torch.Tensor:
        weights = history_mask / history_mask.sum(1, keepdim=True).clamp_min(1.0)
        pooled = torch.bmm(weights.unsqueeze(1), self.history(history)).squeeze(1)
        return nn.functional.normalize(
            self.out(torch.cat([self.dense(user_dense), pooled], 1)), dim=-1
        )


class ItemTower(nn.Module):
    """Retrieval item tower: item vector and behaviour to an L2-normalised vector.

    >>> ItemTower(16, 4, 32)(torch.zeros(2, 16), torch.zeros(2, 4)).shape
    torch.Size([2, 32])
    """

    def __init__(self, item_dim: int, item_dense: int, dim: int = 64) -> None:
        super().__init__()
        self.vector = mlp([item_dim, dim])
        self.dense = DenseArch(item_dense, dim)
        self.out = mlp([2 * dim, dim, dim])

    def forward(self, item_vector: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([self.vector(item_vector), self.dense(item_dense)], 1)
        return nn.functional.normalize(self.out(joined), dim=-1)
