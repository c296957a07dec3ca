"""The hybrid ranker's candidate pool: generator ranks, reciprocal-rank fusion and the slots
reserved for new items.

* :func:`ranks`: each generator's ranks of a user's best unseen items;
* :func:`candidate_pool`: each user's best items by reciprocal-rank fusion of the generators,
  seen items excluded, with slots reserved for new items;
* :func:`new_item_ranks` and :func:`new_item_neighbour_ranks`: how the new items compete for
  those slots (content ranks fused with recent popularity, or with
  :func:`neighbour_similarity` to the nearest history items).

Numpy only: training (:mod:`avrec.ranker.hybrid`) and serving
(:mod:`avrec.ranker.hybrid_pipeline`) build pools with the same code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from avrec.ranker.history_scorers import History

RRF_K = 60.0  # reciprocal-rank fusion constant (Cormack et al. 2009)
ItemStats = Mapping[str, np.ndarray]  # item_behaviour field -> one value per catalogue column

RANK_DEPTH = 1000  # each generator ranks its best 1,000 unseen items; the rest tie below them
NEIGHBOUR_HISTORY = 200  # newest history items the neighbour similarity compares with (cost)


def ranks(scores: np.ndarray, exclude: np.ndarray, depth: int = RANK_DEPTH) -> np.ndarray:
    """0-based rank of each row's best ``depth`` items (best first); every other item, and
    every excluded one, gets rank ``depth``.

    A generator's rank matters at its top (reciprocal ranks, fusion); ranking only the top
    costs a selection plus a sort of ``depth`` items instead of a sort of the catalogue
    (``bench/hybrid_latency.py``: 1.66 -> 0.5-1.0 ms for four generators over 9,742 items). Ties are
    broken by numpy's deterministic selection and introsort, the same in training and serving.

    >>> ranks(np.array([[0.1, 0.9, 0.5, 0.7]]), np.array([[False, True, False, False]]), 2)
    array([[2, 2, 1, 0]])
    """
    negated = np.where(exclude, np.inf, -scores)  # ascending order = best first
    depth = min(depth, scores.shape[1])
    out = np.full(scores.shape, depth, dtype=np.int64)
    if depth == 0:
        return out
    rows = np.arange(scores.shape[0])[:, None]  # plain indexing: take_along_axis's cost, less
    top = (np.argpartition(negated, depth - 1, axis=1)[:, :depth] if depth < scores.shape[1]
           else np.broadcast_to(np.arange(depth), scores.shape))
    best = top[rows, np.argsort(negated[rows, top], axis=1)]
    ranked = np.isfinite(negated[rows, best])  # excluded: not ranked
    out[rows, best] = np.where(ranked, np.arange(depth)[None, :], depth)
    return out


def _best(scores: np.ndarray, size: int) -> np.ndarray:
    top = np.argpartition(-scores, size - 1, axis=1)[:, :size]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def candidate_pool(
    generator_ranks: Sequence[np.ndarray], exclude: np.ndarray, size: int,
    cold: np.ndarray | None = None, cold_ranks: np.ndarray | None = None, cold_slots: int = 0,
) -> np.ndarray:
    """``[users, size]`` catalogue columns: best reciprocal-rank-fusion items, seen excluded.

    With ``cold_slots``, that many of the slots go to the user's best ``cold`` items (items
    without interactions before the cut) by ``cold_ranks`` (a content generator's ranks).

    >>> r1, r2 = np.array([[0, 1, 2]]), np.array([[2, 0, 1]])
    >>> candidate_pool([r1, r2], np.array([[False, False, True]]), 2).tolist()
    [[1, 0]]
    """
    fused = sum(1.0 / (RRF_K + r) for r in generator_ranks)
    fused = np.where(exclude, -np.inf, fused)
    size = min(size, exclude.shape[1])
    if not cold_slots or cold is None or cold_ranks is None:
        return _best(fused, size)
    cold_score = np.where(cold & ~exclude, -cold_ranks.astype(np.float64), -np.inf)
    reserved = _best(cold_score, min(cold_slots, size))
    reserved_ok = np.take_along_axis(cold_score, reserved, 1) > -np.inf
    rest = fused.copy()
    np.put_along_axis(rest, reserved, np.where(reserved_ok, -np.inf, np.take_along_axis(
        rest, reserved, 1)), axis=1)
    warm = _best(rest, size - reserved.shape[1])
    # a user with fewer cold items than slots gets the RRF items ranked next instead
    filler = _best(rest, size)[:, size - reserved.shape[1]:]
    return np.concatenate([warm, np.where(reserved_ok, reserved, filler)], axis=1)


TRENDING = "popularity_30d"  # the item_behaviour field that says an item is trending


def new_item_ranks(content_ranks: np.ndarray | None, item_stats: Sequence[ItemStats],
                   cold: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """Each user's ranks of the new (``cold``) items for the pool's reserved slots:
    reciprocal-rank fusion of the content generator's ranks (like what the user liked) and
    the items' recent popularity as of the user's cut (new and trending); popularity alone
    without a content generator.

    >>> stats = [{TRENDING: np.array([9.0, 0.0, 3.0, 1.0, 0.0])}]
    >>> cold = np.array([[False, True, True, True, True]])
    >>> content = np.array([[0, 1, 2, 3, 4]])
    >>> new_item_ranks(content, stats, cold, np.zeros((1, 5), bool)).tolist()
    [[1000, 2, 0, 1, 3]]
    """
    columns = np.flatnonzero(cold.any(axis=0))  # ranked among the new items only
    out = np.full(cold.shape, RANK_DEPTH, dtype=np.int64)
    if columns.size == 0:
        return out
    outside = (exclude | ~cold)[:, columns]
    trending = np.stack([np.nan_to_num(np.asarray(s[TRENDING], dtype=np.float64)[columns])
                         for s in item_stats])
    fused = 1.0 / (RRF_K + ranks(trending, outside | ~(trending > 0)))  # unseen lately: no rank
    if content_ranks is not None:
        fused = fused + 1.0 / (RRF_K + content_ranks[:, columns])
    out[:, columns] = ranks(fused, outside)
    return out


def neighbour_vectors(unit: np.ndarray, has_vector: np.ndarray, history: np.ndarray
                      ) -> np.ndarray:
    """The ``unit`` rows :func:`neighbour_similarity` compares candidates with: the newest
    :data:`NEIGHBOUR_HISTORY` items of ``history`` that have a vector (``[items, dim]``)."""
    return unit[history[has_vector[history]][-NEIGHBOUR_HISTORY:]]


def neighbour_similarity(unit: np.ndarray, has_vector: np.ndarray, history: np.ndarray,
                         columns: np.ndarray, k: int, rows: np.ndarray | None = None,
                         neighbours: np.ndarray | None = None) -> np.ndarray:
    """Mean of each ``columns`` item's ``k`` highest cosines with the items of ``history``
    (catalogue columns, oldest first; the newest :data:`NEIGHBOUR_HISTORY` with a vector
    count): item-kNN over content vectors, which a long, varied history does not blur into
    one mean profile. 0 without such history items; ``unit`` rows are unit vectors
    (``rows``: ``unit[columns]``, ``neighbours``: :func:`neighbour_vectors` of ``history``,
    when the caller has them already).

    >>> unit = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    >>> neighbour_similarity(unit, np.ones(3, bool), np.array([0, 1]), np.array([2]), 1)
    array([0.8])
    """
    if neighbours is None:
        neighbours = neighbour_vectors(unit, has_vector, history)
    if neighbours.shape[0] == 0 or k <= 0:
        return np.zeros(columns.size)
    cosines = (unit[columns] if rows is None else rows) @ neighbours.T
    top = min(k, neighbours.shape[0])
    best = np.partition(cosines, cosines.shape[1] - top, axis=1)[:, -top:]
    return best.mean(axis=1).astype(np.float64)


def new_item_neighbour_ranks(content_ranks: np.ndarray, unit: np.ndarray,
                             has_vector: np.ndarray, histories: Sequence[History],
                             cold: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """Ranks of the new (``cold``) items for the pool's reserved slots: reciprocal-rank fusion
    of ``content_ranks`` (similarity to the mean of the user's positives) and
    :func:`neighbour_similarity` ranks (similarity to their nearest history items).

    >>> unit = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    >>> cold = np.array([[False, False, True, True]])
    >>> content = np.array([[0, 1, 3, 2]])
    >>> new_item_neighbour_ranks(content, unit, np.ones(4, bool), [History(np.array([1]),
    ...     np.array([5.0]))], cold, np.array([[True, True, False, False]]), 1).tolist()
    [[1000, 1000, 0, 1]]
    """
    columns = np.flatnonzero(cold.any(axis=0))
    out = np.full(cold.shape, RANK_DEPTH, dtype=np.int64)
    if columns.size == 0:
        return out
    outside = (exclude | ~cold)[:, columns]
    similarity = np.stack([neighbour_similarity(unit, has_vector, h.columns, columns, k)
                           for h in histories])
    fused = (1.0 / (RRF_K + ranks(similarity, outside))
             + 1.0 / (RRF_K + content_ranks[:, columns]))
    out[:, columns] = ranks(fused, outside)
    return out


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
