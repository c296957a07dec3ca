"""A ranking answer and how it is assembled: the chosen snapshot rows in order, with their
scores, titles and (when asked) the history item each one is most like; MMR re-ordering."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import numpy as np

from avrec.server.feature_reader import OnlineRow
from avrec.server.item_snapshot import ItemSnapshot


class Scored(NamedTuple):
    """One ranked item (``row`` is its snapshot row)."""

    item_id: int
    row: int
    score: float
    title: str
    missing_features: bool
    explanation: tuple[int, float, str] | None = None


@dataclass(frozen=True)
class Ranked:
    """A ranking answer."""

    items: list[Scored]
    cold_start_user: bool
    user_row: OnlineRow
    served_at: datetime
    embedding_version: str | None
    item_freshness: dict[str, datetime | None] = field(default_factory=dict)
    model_version: str = ""  # of the models that answered (a hot swap may follow)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def mmr(relevance: np.ndarray, unit: np.ndarray, k: int, lam: float) -> np.ndarray:
    """Maximal marginal relevance: greedily pick ``argmax lam*rel - (1-lam)*max sim(chosen)``.

    >>> mmr(np.array([1.0, 0.9, 0.1]), np.array([[1.0, 0], [1.0, 0], [0, 1.0]]), 2, 0.5)
    array([0, 2])
    """
    chosen: list[int] = []
    most_similar = np.full(len(relevance), -np.inf)
    for _ in range(min(k, len(relevance))):
        penalty = np.where(np.isfinite(most_similar), most_similar, 0.0)
        gain = lam * relevance - (1.0 - lam) * penalty
        gain[chosen] = -np.inf
        best = int(np.argmax(gain))
        chosen.append(best)
        most_similar = np.maximum(most_similar, unit @ unit[best])
    return np.asarray(chosen, dtype=np.int64)


def history_rows(row: OnlineRow, snapshot: ItemSnapshot) -> np.ndarray:
    """Snapshot rows of the user's recent items that have a vector."""
    recent = row.values.get("recent_items") or []
    rows = snapshot.rows(np.asarray(recent, dtype=np.int64)) if recent else []
    return np.asarray([r for r in rows if r >= 0 and snapshot.has_vector[r]], np.int64)


def assemble(
    chosen: np.ndarray, scores: np.ndarray, row: OnlineRow, snapshot: ItemSnapshot,
    unit: np.ndarray, explain: bool, now: datetime, model_version: str,
) -> Ranked:
    """The chosen snapshot rows with their scores, titles and explanations (``unit``: the
    snapshot's unit vectors, by row)."""
    snap = snapshot
    explanations: list[tuple[int, float, str] | None] = [None] * len(chosen)
    history = history_rows(row, snap) if explain else np.empty(0, np.int64)
    if history.size:
        sims = unit[chosen] @ unit[history].T  # [k, len(history)]
        best = sims.argmax(1)
        explanations = [
            (int(snap.item_ids[history[b]]), float(sims[i, b]), snap.titles[history[b]])
            for i, b in enumerate(best)
        ]
    items = [
        Scored(item_id, r, score, snap.titles[r], missing, why)
        for item_id, r, score, missing, why in zip(
            snap.item_ids[chosen].tolist(), chosen.tolist(), scores.tolist(),
            snap.missing[chosen].tolist(), explanations, strict=True,
        )
    ]
    return Ranked(items, not row.fresh, row, now, snap.embedding_version,
                  dict(snap.freshest), model_version)
