"""Background snapshot reloads in a child process: the same snapshot as a load in process,
Redis errors raised as they are there, and a reload in process when the child fails.

Real Redis, Feast registry and ONNX models (the ``stack``); the child is a real spawned process.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.server.conftest import serve_config, stack_env

REFRESH = timedelta(seconds=60)


@pytest.fixture(scope="module")
def engine(stack) -> Iterator[object]:
    from avrec.server.app import build_engine
    from avrec.server.snapshot_process import SnapshotProcess

    with stack_env(stack):
        built, _ = build_engine(serve_config(stack, hybrid=False))
    built.snapshot_process = SnapshotProcess(
        stack.redis_url, 1.0, built.behaviour_reader, built.embedding_reader, built.catalogue)
    yield built
    built.wait_for_reload(60)
    built.snapshot_process.close()
    built.client.close()


def test_the_child_loads_the_snapshot_the_server_would_load_itself(engine) -> None:
    from avrec.server.item_snapshot import load_snapshot

    now, counter = engine.clock.now(), engine.materialization()
    models = engine.models
    got = engine.snapshot_process.load(models.encoder, now, REFRESH, models.vector_field,
                                       counter)
    want = load_snapshot(engine.client, engine.behaviour_reader, engine.embedding_reader,
                         engine.catalogue, models.encoder, now, REFRESH, models.vector_field,
                         counter)
    for name in ("item_ids", "vectors", "has_vector", "dense", "missing", "popularity"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert got.frame.equals(want.frame) and got.titles == want.titles
    for name in ("embedding_version", "materialization", "loaded_at", "valid_until",
                 "expires_at", "freshest"):
        assert getattr(got, name) == getattr(want, name), name
    np.testing.assert_array_equal(got.rows(np.array([1, 50, -3])), want.rows(np.array([1, 50, -3])))
    assert engine.snapshot_process.loads >= 1
    # server code needs no torch; Feast would import it (~550 MB): the child keeps it out
    maps = Path(f"/proc/{engine.snapshot_process.pid}/maps").read_text()
    assert "libtorch" not in maps


def test_the_child_runs_at_a_lower_cpu_priority(engine) -> None:
    from avrec.server.snapshot_child import NICENESS

    process = engine.snapshot_process
    models = engine.models
    process.load(models.encoder, engine.clock.now(), REFRESH, models.vector_field,
                 engine.materialization())  # the child is past its start
    wanted = min(os.getpriority(os.PRIO_PROCESS, 0) + NICENESS, 19)
    assert os.getpriority(os.PRIO_PROCESS, process.pid) == wanted


def test_a_background_reload_goes_through_the_child(engine) -> None:
    loads = engine.snapshot_process.loads
    engine.client.incr(engine.version_key)  # a materialization happened
    engine.ensure_snapshot(engine.materialization(), engine.clock.now())
    assert engine.wait_for_reload(120)
    assert engine.snapshot_process.loads == loads + 1
    assert engine._loaded.snapshot.materialization == engine.materialization()


def test_a_killed_child_is_replaced_at_the_next_reload(engine) -> None:
    process = engine.snapshot_process
    process.start()
    started, loads, reloads = process.started, process.loads, engine.reloads
    os.kill(process.pid, signal.SIGKILL)
    process._process.join(10)
    engine.client.incr(engine.version_key)
    engine.ensure_snapshot(engine.materialization(), engine.clock.now())
    assert engine.wait_for_reload(120)
    assert engine.reloads == reloads + 1
    assert engine._loaded.snapshot.materialization == engine.materialization()
    assert process.loads == loads + 1 and process.started == started + 1


def test_a_child_that_does_not_answer_leaves_the_reload_to_the_server(
    engine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No snapshot within the timeout (10 ms here: a load takes the child ~1 s): the child
    is stopped, the reload runs in the server, and the next one starts a new child."""
    process = engine.snapshot_process
    process.start()
    loads, reloads = process.loads, engine.reloads
    monkeypatch.setattr(process, "timeout", 0.01)
    engine.client.incr(engine.version_key)
    with caplog.at_level(logging.WARNING, logger="avrec.server.engine"):
        engine.ensure_snapshot(engine.materialization(), engine.clock.now())
        assert engine.wait_for_reload(120)
    assert "no snapshot within 0.01 s" in caplog.text and "reloading in process" in caplog.text
    assert engine.reloads == reloads + 1 and process.loads == loads
    assert engine._loaded.snapshot.materialization == engine.materialization()
    assert process.pid is None  # stopped


@contextmanager
def nobody_listening() -> Iterator[str]:
    """A Redis URL on a free local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield f"redis://127.0.0.1:{port}/0"


def test_redis_errors_in_the_child_are_raised_as_in_process(engine) -> None:
    from avrec.server.snapshot_process import SnapshotProcess

    with nobody_listening() as url:
        process = SnapshotProcess(url, 0.5, engine.behaviour_reader, engine.embedding_reader,
                                  engine.catalogue)
        try:
            with pytest.raises(redis.ConnectionError):
                process.load(engine.models.encoder, engine.clock.now(), REFRESH,
                             engine.models.vector_field, None)
            assert process.pid is not None and process._process.is_alive()  # lives on
        finally:
            process.close()


def test_closing_during_a_load_cuts_it_short(engine) -> None:
    """A stop that cannot wait for a load in flight kills the child; the load raises (the
    engine would then reload in process) instead of holding the stop."""
    import threading

    from avrec.server.snapshot_process import SnapshotProcess, SnapshotProcessError

    process = SnapshotProcess(engine.snapshot_process._connection[0], 1.0, engine.behaviour_reader,
                              engine.embedding_reader, engine.catalogue)
    failures: list[BaseException] = []

    def load() -> None:
        try:
            process.load(engine.models.encoder, engine.clock.now(), REFRESH,
                         engine.models.vector_field, None)
        except SnapshotProcessError as exc:
            failures.append(exc)

    loader = threading.Thread(target=load)
    loader.start()  # the first load spawns the child: seconds
    for _ in range(3000):
        if process.pid is not None:
            break
        threading.Event().wait(0.01)
    assert process.pid is not None, "the child never started"
    process.close(wait=0.0)
    loader.join(60)
    assert not loader.is_alive() and failures
    process.close()


MAIN_MODULE = '''
import os
import sys

with open(os.environ["IMPORTED_BY"], "a") as out:  # every process that imports this module
    out.write(f"{os.getpid()}\\n")

if __name__ == "__main__":
    import polars as pl

    from avrec.server.snapshot_process import SnapshotProcess

    process = SnapshotProcess(sys.argv[1], 1.0, None, None, pl.DataFrame())
    process.start()
    print(process.pid, flush=True)
    process.close(wait=60)  # the child sees the pipe close and returns
'''


def test_the_child_does_not_import_the_servers_main_module(stack, tmp_path: Path) -> None:
    """``spawn`` imports the parent's ``__main__`` in the child before its target runs: a
    server run as ``python -m avrec.server.app`` (each ``--replicas`` replica) gave every
    child the whole server, Feast and torch (822 MB). The child now starts without it."""
    (tmp_path / "server_main.py").write_text(MAIN_MODULE)
    imported_by = tmp_path / "imported_by"
    env = {**os.environ, "IMPORTED_BY": str(imported_by),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "server_main", stack.redis_url], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    child = int(run.stdout.split()[0])
    importers = [int(line) for line in imported_by.read_text().split()]
    assert child not in importers and len(importers) == 1  # the server process alone
