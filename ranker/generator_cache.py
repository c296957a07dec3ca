"""Fitted candidate generators, reused when the same generator is fitted on the same data.

The hybrid fits its generators (EASE, ALS, ItemKNN) once per inner fold and once on all of
its fit interactions. Tuning the hybrid's grid, its ablations (``hybrid-mixed``, ``-text``,
``-id``, ...) and ``served`` repeat exactly those fits: same generator settings, same seed,
same interactions. :class:`GeneratorCache` keeps what the hybrid needs of a fitted generator
(its :class:`~avrec.ranker.history_scorers.HistoryScorer` and whether it answers "recent" queries),
keyed by the generator's settings and a fingerprint of the fit data, so each distinct fit
runs once. A cache is owned by whoever runs the fits (one ``avrec evaluate`` or ``avrec
train`` run) and handed to the hybrids it builds; there is no process-wide cache. A history
scorer is small next to its model (EASE keeps its top-256 weights per item, not the dense
matrix), and the cache holds at most ``size`` of them.

The same holds one level up: ``served`` wraps exactly the ``hybrid-mixed`` fits of its run
(same settings, seed and data), so :meth:`GeneratorCache.remember` keeps a few whole-model fit
states (the hybrid's scorer bag and pipeline) under a key the model builds.

Only factories whose settings are plain values are cached (``functools.partial`` of a class
with int/float/str/bool/None arguments): a factory holding an object (a vector source) is
always fitted afresh.

>>> import functools
>>> from avrec.ranker.baselines import Popularity
>>> GeneratorCache.key_of(functools.partial(Popularity, seed=0))[0]
'avrec.ranker.baselines.Popularity'
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import polars as pl

from avrec.ranker.history_scorers import HistoryScorer

PLAIN = (int, float, str, bool, type(None))
T = TypeVar("T")


@dataclass(frozen=True)
class FittedGenerator:
    """What the hybrid keeps of a fitted generator."""

    scorer: HistoryScorer
    answers_queries: bool  # it has ``query`` (scores the user's newest positives too)


def fingerprint(frame: pl.DataFrame) -> tuple[int, int]:
    """(rows, order-independent hash of the rows) of ``frame``."""
    if frame.height == 0:
        return (0, 0)
    return (frame.height, int(frame.hash_rows(seed=11).cast(pl.UInt64).sum()))


class GeneratorCache:
    """Least-recently-used cache of fitted generators (see the module docstring)."""

    def __init__(self, size: int = 24, models: int = 8) -> None:  # 3 generators x 4 fits x
        self.size = size  # 2 stages; a hybrid grid of 3 on 2 stages, and spares
        self.entries: OrderedDict[tuple[Any, ...], FittedGenerator] = OrderedDict()
        self.models = models
        self.model_fits: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self.hits = self.misses = 0

    def remember(self, key: tuple[Any, ...] | None, compute: Callable[[], T]) -> T:
        """A whole model's fit state under ``key``: ``compute()`` runs once per key (always,
        when ``key`` is None). The state is shared: callers must not mutate it.

        >>> cache = GeneratorCache()
        >>> cache.remember(("a",), lambda: [1]) is cache.remember(("a",), lambda: [2])
        True
        """
        if key is None or self.models <= 0:
            return compute()
        if key in self.model_fits:
            self.hits += 1
            self.model_fits.move_to_end(key)
            return self.model_fits[key]
        self.misses += 1
        state = self.model_fits[key] = compute()
        while len(self.model_fits) > self.models:
            self.model_fits.popitem(last=False)
        return state

    def fits_only(self) -> GeneratorCache:
        """A cache holding this one's generator fits (the same objects) and no model states:
        what a second process needs to continue the run (it pickles)."""
        copy = GeneratorCache(self.size, self.models)
        copy.entries = OrderedDict(self.entries)
        return copy

    @staticmethod
    def key_of(factory: Callable[[], Any]) -> tuple[Any, ...] | None:
        """The factory's identity and settings, or None when it cannot be keyed."""
        if not isinstance(factory, functools.partial) or not isinstance(factory.func, type):
            return None
        values = [*factory.args, *factory.keywords.values()]
        if not all(isinstance(v, PLAIN) for v in values):
            return None
        cls = factory.func
        return (f"{cls.__module__}.{cls.__qualname__}", factory.args,
                tuple(sorted(factory.keywords.items())))

    def fit_all(self, factories: Mapping[str, Callable[[], Any]], interactions: pl.DataFrame,
                items: pl.DataFrame) -> dict[str, FittedGenerator]:
        """Every generator fitted on the same data (fingerprinted once)."""
        data = (fingerprint(interactions), fingerprint(items.select("item_id")))
        return {name: self._fit(make, interactions, items, data)
                for name, make in factories.items()}

    def fit(self, factory: Callable[[], Any], interactions: pl.DataFrame, items: pl.DataFrame
            ) -> FittedGenerator:
        """The generator ``factory()`` fitted on ``interactions`` (from the cache when the
        same fit ran before)."""
        return self.fit_all({"": factory}, interactions, items)[""]

    def _fit(self, factory: Callable[[], Any], interactions: pl.DataFrame,
             items: pl.DataFrame, data: tuple[Any, ...]) -> FittedGenerator:
        settings = self.key_of(factory)
        key = None
        if settings is not None and self.size > 0:
            key = (settings, *data)
            if key in self.entries:
                self.hits += 1
                self.entries.move_to_end(key)
                return self.entries[key]
        self.misses += 1
        model = factory().fit(interactions, items)
        if not hasattr(model, "history_scorer"):
            raise TypeError(f"{type(model).__name__} cannot score a history "
                            "(no history_scorer())")
        fitted = FittedGenerator(model.history_scorer(), hasattr(model, "query"))
        if key is not None:
            self.entries[key] = fitted
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return fitted

