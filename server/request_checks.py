"""Validation of a Rank or Recommend request: what the caller must fix raises :class:`RequestError`
(gRPC INVALID_ARGUMENT) before anything is scored."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from avrec.errors import InputError
from avrec.server.item_snapshot import ItemSnapshot


class RequestError(InputError):
    """A request the caller must fix (gRPC INVALID_ARGUMENT)."""


def check_request(user_id: int, top_k: int, diversity_lambda: float, max_top_k: int) -> None:
    """RequestError unless the user id is positive, ``0 <= top_k <= max_top_k`` and the MMR
    weight is in [0, 1]."""
    if user_id <= 0:
        raise RequestError(f"user_id must be positive, got {user_id}")
    if top_k < 0 or top_k > max_top_k:
        raise RequestError(f"top_k must be in [0, {max_top_k}], got {top_k}")
    if not np.isfinite(diversity_lambda) or not 0.0 <= diversity_lambda <= 1.0:
        raise RequestError(f"diversity_lambda must be in [0, 1], got {diversity_lambda}")


def candidate_rows(item_ids: Sequence[int], snapshot: ItemSnapshot,
                   max_candidates: int) -> np.ndarray:
    """Snapshot rows of the candidates; RequestError for empty, huge, duplicate, unknown."""
    n = len(item_ids)
    if n == 0:
        raise RequestError("candidate_item_ids is empty")
    if n > max_candidates:
        raise RequestError(f"{n} candidates; at most {max_candidates} per request")
    ids = np.asarray(item_ids, dtype=np.int64)
    if (ids <= 0).any():
        raise RequestError(f"item ids must be positive: {ids[ids <= 0][:5].tolist()}")
    ordered = np.sort(ids)
    repeated = ordered[1:] == ordered[:-1]
    if repeated.any():
        duplicates = np.unique(ordered[1:][repeated])
        raise RequestError(f"duplicate candidates: {duplicates[:5].tolist()}")
    rows = snapshot.rows(ids)
    if (rows < 0).any():
        unknown = ids[rows < 0]
        raise RequestError(f"{unknown.size} unknown item id(s), e.g. {unknown[:5].tolist()}")
    return rows
