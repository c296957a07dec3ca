"""The sequential model's network: item vectors (an ID embedding plus projected content), and a
causal self-attention encoder of left-padded item sequences whose newest position is the user
vector."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from avrec.ranker.sequence_data import PAD, RATING_BUCKETS

if TYPE_CHECKING:
    from avrec.ranker.sequential import SequentialConfig


class ItemEmbedding(nn.Module):
    """``vector(j) = id_j * keep_j + W content_j + b_has_content``.

    ``content`` is a fixed ``[n_items + 1, c]`` table (row 0: padding; rows without content
    are zeros, told apart by ``has_content``); ``id_allowed`` marks items whose ID may be used
    (those with fit interactions). Without content (``c = 0``) only IDs are used.

    >>> emb = ItemEmbedding(torch.zeros(4, 3), torch.tensor([0, 1, 1, 0.]),
    ...                     torch.tensor([0, 1, 1, 0.]), dim=8)
    >>> emb(torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 8])
    """

    def __init__(
        self,
        content: torch.Tensor,
        has_content: torch.Tensor,
        id_allowed: torch.Tensor,
        dim: int,
        use_ids: bool = True,
    ) -> None:
        super().__init__()
        n = content.shape[0]
        self.register_buffer("content", content.float())
        self.register_buffer("has_content", has_content.float())
        self.register_buffer("id_allowed", id_allowed.float() if use_ids else torch.zeros(n))
        self.ids = nn.Embedding(n, dim, padding_idx=PAD)
        nn.init.normal_(self.ids.weight, std=0.02)
        with torch.no_grad():
            self.ids.weight[PAD].zero_()
        self.project = nn.Linear(content.shape[1], dim) if content.shape[1] else None
        self.content_flag = nn.Parameter(torch.zeros(2, dim))

    def forward(self, index: torch.Tensor, id_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of item indices (any shape); ``id_keep`` optionally masks IDs per item."""
        keep = self.id_allowed[index]
        if id_keep is not None:
            keep = keep * id_keep[index]
        out = self.ids(index) * keep.unsqueeze(-1)
        flag = self.has_content[index].long()
        out = out + self.content_flag[flag]
        if self.project is not None:
            out = out + self.project(self.content[index]) * self.has_content[index].unsqueeze(-1)
        return out

    def table(self) -> torch.Tensor:
        """``[n_items + 1, dim]`` vectors of every index (row 0 is padding)."""
        return self.forward(torch.arange(self.content.shape[0]))


class CausalBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention then a feed-forward layer."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, L, d]``; ``mask`` ``[B, 1, L, L]`` True where attention is allowed."""
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, d // self.heads).unbind(2)
        attended = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            dropout_p=self.dropout.p if self.training else 0.0,
        )
        x = x + self.dropout(self.out(attended.transpose(1, 2).reshape(b, length, d)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SequenceEncoder(nn.Module):
    """Left-padded item sequences (+ rating buckets) -> one hidden vector per position.

    Positions are counted from the most recent item (0 = newest), so a short history and the
    tail of a long one share their embeddings.
    """

    def __init__(self, items: ItemEmbedding, config: SequentialConfig) -> None:
        super().__init__()
        d = config.dim
        self.items = items
        self.ratings = nn.Embedding(RATING_BUCKETS, d)
        self.positions = nn.Embedding(config.max_length, d)
        self.blocks = nn.ModuleList(
            CausalBlock(d, config.heads, config.dropout) for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, index: torch.Tensor, ratings: torch.Tensor, id_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, L]`` item indices and rating buckets -> ``[B, L, d]``."""
        length = index.shape[1]
        recency = torch.arange(length - 1, -1, -1, device=index.device)
        x = self.items(index, id_keep) + self.ratings(ratings) + self.positions(recency)
        x = self.dropout(x)
        valid = index != PAD
        causal = torch.ones(length, length, dtype=torch.bool, device=index.device).tril()
        eye = torch.eye(length, dtype=torch.bool, device=index.device)
        mask = (causal & valid[:, None, :]) | eye  # a pad attends to itself only: no NaN rows
        for block in self.blocks:
            x = block(x, mask[:, None])
        return self.norm(x)

    def user_vectors(self, index: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
        """``[B, d]``: the newest position of each (left-padded) sequence."""
        return self.forward(index, ratings)[:, -1]
