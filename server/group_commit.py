"""Group commit: concurrent callers share one durable write (leader/follower, no thread of
its own).

A caller queues its item. When no flush is running it becomes the leader: it takes every
item queued so far (its own and those that arrived while the previous flush ran) and calls
``flush`` once for the whole group, outside the lock; the others wait. Each caller returns
only after a flush that covered its item finished, with that item's result, or raises the
flush's exception (every caller of a failed group gets it). Flushes never overlap, so
``flush`` sees the groups one after the other, in queue order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Slot(Generic[T, R]):
    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """Run ``flush`` over the items queued by concurrent :meth:`submit` calls, one group at
    a time; ``flush`` returns one result per item, in order, or raises."""

    def __init__(self, flush: Callable[[list[T]], Sequence[R]]) -> None:
        self._flush = flush
        self._cond = threading.Condition()
        self._queue: list[_Slot[T, R]] = []
        self._leading = False
        self.groups = 0  # flushes so far
        self.items = 0  # items flushed so far

    def submit(self, item: T) -> R:
        """``item``'s result once a flush covering it finished (or that flush's exception)."""
        slot: _Slot[T, R] = _Slot(item)
        group: list[_Slot[T, R]] = []
        with self._cond:
            self._queue.append(slot)
            while self._leading and not slot.done:
                self._cond.wait()
            if not slot.done:  # lead: flush everything queued so far, this item included
                self._leading = True
                group, self._queue = self._queue, []
        if group:
            self._lead(group)
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _lead(self, group: list[_Slot[T, R]]) -> None:
        results: Sequence[R] = ()
        error: BaseException | None = None
        try:
            results = self._flush([slot.item for slot in group])
            if len(results) != len(group):
                raise RuntimeError(f"flush gave {len(results)} results for {len(group)} items")
        except BaseException as exc:  # handed to every caller of the group
            error = exc
        with self._cond:
            for i, slot in enumerate(group):
                slot.error = error
                slot.result = None if error is not None else results[i]
                slot.done = True
            self.groups += 1
            self.items += len(group)
            self._leading = False
            self._cond.notify_all()
