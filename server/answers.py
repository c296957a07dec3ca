"""A ranking answer and how it is assembled: the chosen snapshot rows in order, with their
scores, titles and (when asked) the history item each one is most like; MMR re-ordering."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import numpy as np

from avrec.server.answer_records import AnswerRecords
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
    """A ranking answer: snapshot rows best first with their scores, and what was served.

    ``items`` (:class:`Scored` tuples) are made when first asked; the gRPC service encodes
    the rows straight from ``records`` (:mod:`avrec.server.answer_records`) instead."""

    rows: np.ndarray  # snapshot rows, best first
    scores: np.ndarray  # float64, aligned with rows
    records: AnswerRecords  # the snapshot's item ids, titles and missing flags, encoded
    cold_start_user: bool
    user_row: OnlineRow
    served_at: datetime
    embedding_version: str | None
    item_freshness: dict[str, datetime | None] = field(default_factory=dict)
    model_version: str = ""  # of the models that answered (a hot swap may follow)
    # per row: (history item id, cosine, its title), when an explanation was asked for
    explanations: list[tuple[int, float, str] | None] | None = None

    @functools.cached_property
    def items(self) -> list[Scored]:
        records = self.records
        why = self.explanations or [None] * len(self.rows)
        return [Scored(item_id, r, score, records.titles[r], missing, explanation)
                for item_id, r, score, missing, explanation in zip(
                    records.item_ids[self.rows].tolist(), self.rows.tolist(),
                    self.scores.tolist(), records.missing[self.rows].tolist(), why,
                    strict=True)]

    @property
    def items_missing_features(self) -> int:
        return int(np.count_nonzero(self.records.missing[self.rows]))


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
    records: AnswerRecords, unit: np.ndarray, explain: bool, now: datetime, model_version: str,
) -> Ranked:
    """The chosen snapshot rows with their scores and, when ``explain``, the history item each
    is most like (``unit``: the snapshot's unit vectors; ``records``: its answer records)."""
    explanations: list[tuple[int, float, str] | None] | None = None
    history = history_rows(row, snapshot) if explain else np.empty(0, np.int64)
    if history.size:
        sims = unit[chosen] @ unit[history].T  # [k, len(history)]
        best = sims.argmax(1)
        explanations = [
            (int(snapshot.item_ids[history[b]]), float(sims[i, b]), snapshot.titles[history[b]])
            for i, b in enumerate(best)
        ]
    return Ranked(np.asarray(chosen, dtype=np.int64), np.asarray(scores, dtype=np.float64),
                  records, not row.fresh, row, now, snapshot.embedding_version,
                  dict(snapshot.freshest), model_version, explanations)
