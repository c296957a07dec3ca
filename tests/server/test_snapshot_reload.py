"""Item snapshot reloads run beside requests, never in front of them.

The engine is built as ``avrec serve`` builds it (real Redis, Feast registry, ONNX models);
a reload is made stale by bumping the materialization counter, as ``avrec materialize`` does.
The real ``_load`` runs behind a gate the test opens, so "the request did not wait" is
proved by the request finishing while the reload is still held, not by a timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import redis

from tests.server.conftest import serve_config, stack_env

USER = 414
CANDIDATES = [1, 2, 3, 50, 260]


@pytest.fixture()
def engine(stack) -> Iterator[object]:
    from avrec.server.app import build_engine

    with stack_env(stack):
        built, _ = build_engine(serve_config(stack, hybrid=False))
    yield built
    built.wait_for_reload(60)
    built.client.close()


class Gate:
    """Wraps ``engine._load``: each call records itself and waits until the gate opens."""

    def __init__(self, load: Callable[..., object], fail: bool = False) -> None:
        self.load, self.fail = load, fail
        self.open, self.entered = threading.Event(), threading.Event()
        self.calls = 0

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls += 1
        self.entered.set()
        assert self.open.wait(60), "the test never opened the gate"
        if self.fail:
            raise redis.ConnectionError("Redis went away during the reload")
        return self.load(*args, **kwargs)


def in_thread(call: Callable[[], object]) -> object:
    """``call()`` in another thread; fails if it does not return (it would be waiting)."""
    out: list[object] = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the request waited for the snapshot reload"
    return out[0]


def test_a_stale_snapshot_serves_while_one_reload_runs_in_the_background(
    engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = engine.ensure_snapshot(engine.materialization(), engine.clock.now())
    reloads = engine.reloads
    gate = Gate(engine._load)
    monkeypatch.setattr(engine, "_load", gate)
    counter = engine.client.incr(engine.version_key)  # a materialization happened
    first = in_thread(lambda: engine.rank(USER, CANDIDATES))
    assert gate.entered.wait(30)  # the reload started ...
    second = in_thread(lambda: engine.rank(USER, CANDIDATES))  # ... and requests go on
    assert engine._loaded is old and engine.reloads == reloads
    assert [i.item_id for i in first.items] == [i.item_id for i in second.items]
    assert gate.calls == 1  # one reload at a time
    gate.open.set()
    assert engine.wait_for_reload(60)
    assert engine.reloads == reloads + 1 and engine._loaded is not old
    assert engine._loaded.snapshot.materialization == str(counter).encode()
    assert engine.rank(USER, CANDIDATES).items


def test_a_failed_background_reload_keeps_the_old_snapshot_and_is_retried(
    engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = engine.ensure_snapshot(engine.materialization(), engine.clock.now())
    real_load, errors = engine._load, engine.snapshot_errors
    gate = Gate(real_load, fail=True)
    gate.open.set()
    monkeypatch.setattr(engine, "_load", gate)
    engine.client.incr(engine.version_key)
    assert engine.rank(USER, CANDIDATES).items
    assert engine.wait_for_reload(60)
    assert engine._loaded is old and engine.snapshot_errors == errors + 1
    monkeypatch.setattr(engine, "_load", real_load)  # Redis is back
    assert engine.rank(USER, CANDIDATES).items  # still the old one, a new reload starts
    assert engine.wait_for_reload(60) and engine._loaded is not old


def test_a_snapshot_past_an_item_ttl_is_reloaded_before_answering(engine) -> None:
    loaded = engine.ensure_snapshot(engine.materialization(), engine.clock.now())
    now = engine.clock.now()
    loaded.snapshot.valid_until = loaded.snapshot.expires_at = now - timedelta(seconds=1)
    reloads = engine.reloads
    answered = engine.ensure_snapshot(engine.materialization(), now)
    assert answered is not loaded and engine.reloads == reloads + 1
