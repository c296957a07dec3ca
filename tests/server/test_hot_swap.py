"""Model hot swap: a server following the models root's ``LATEST`` takes up a new
run while Rank and Recommend calls run (every answer the old model's or the new one's, none
failed), and refuses a corrupt run and one trained on other embeddings than the online store
serves (a log line, a metric, the old model kept)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from avrec import tables
from tests.server.conftest import serve_config, stack_env
from tests.server.test_faults import Load
from tests.server.test_robustness import USER


class Calls(Load):  # its threads started and joined as Rank's in test_faults
    """Threads alternating Rank and Recommend until stopped: ``(t, method, code, version)``."""

    def __init__(self, target: str, items: list[int], threads: int = 4) -> None:
        self.target, self.items, self.calls = target, items, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]

    def run(self) -> None:
        from avrec.server.client import RankingClient

        with RankingClient(self.target, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                method = "Rank" if n % 2 else "Recommend"
                try:
                    answer = (client.rank(USER, self.items) if method == "Rank"
                              else client.recommend(USER, top_k=10))
                    code = "OK" if answer.items else "EMPTY"
                    version = answer.model_version
                except grpc.RpcError as error:
                    code, version = error.code().name, ""
                self.calls.append((time.monotonic(), method, code, version))
                n += 1


def point(root: Path, run: str) -> None:
    """What ``avrec train`` does at its end: name the run in ``LATEST``."""
    (root / "LATEST").write_text(run + "\n")


def retrained_on(run: Path, embedding_version: str) -> None:
    """Make ``run`` a consistent run trained on other item vectors: contracts re-versioned
    and the graphs re-stamped, as an export would have written them."""
    import onnx

    from avrec.ranker.contract import ModelContract
    from avrec.ranker.export import HASH_KEY

    for kind in ("ranker", "user_tower", "item_tower"):
        file = run / kind / "contract.json"
        data = json.loads(file.read_text())
        old = data["version"]
        data["embedding_version"] = embedding_version
        data["version"] = ModelContract.from_dict(data).version
        file.write_text(json.dumps(data, indent=2))
        for graph in (run / kind).glob("*.onnx"):
            proto = onnx.load(str(graph))
            for prop in proto.metadata_props:
                if prop.key == HASH_KEY and prop.value == old:
                    prop.value = data["version"]
            onnx.save(proto, str(graph))


def wait_for(condition, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def swaps(result: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("avrec_model_swaps_total", {"result": result}) or 0.0


def test_a_new_run_goes_live_under_load_and_bad_runs_are_refused(stack, tmp_path, caplog):
    from avrec.server.app import start
    from avrec.server.client import RankingClient

    root = tmp_path / "models"
    root.mkdir()
    (root / "run-a").symlink_to(stack.model_dir)
    shutil.copytree(stack.model_dir, root / "run-b")  # a new run (here: the same weights)
    point(root, "run-a")
    with stack_env(stack):
        service = start(serve_config(stack, model_dir=None, model_root=str(root),
                                     model_watch_seconds=0.2))
    target = f"127.0.0.1:{service.port}"
    watcher = service.watcher
    assert watcher is not None
    items = tables.read_table("items", stack.data_dir / "offline")["item_id"][:100].to_list()
    try:
        with RankingClient(target, timeout=120) as client:
            old = client.rank(USER, items).model_version  # warm
        assert old.startswith("run-a/")
        refused_before = swaps("refused")
        with caplog.at_level(logging.INFO, logger="avrec.server.hot_swap"), \
                Calls(target, items) as load:
            time.sleep(1.0)
            pointed = time.monotonic()
            point(root, "run-b")
            wait_for(lambda: watcher.swaps == 1)
            swapped = time.monotonic()
            time.sleep(1.5)
            new = service.engine.models.version
            assert new.startswith("run-b/")

            corrupt = root / "run-c"
            shutil.copytree(stack.model_dir, corrupt)
            graph = corrupt / "ranker" / "ranker.onnx"
            graph.write_bytes(graph.read_bytes()[:1000])  # a torn copy
            point(root, "run-c")
            wait_for(lambda: watcher.refusals == 1)

            other = root / "run-d"
            shutil.copytree(stack.model_dir, other)
            retrained_on(other, "other-vectors-v9")
            point(root, "run-d")
            wait_for(lambda: watcher.refusals == 2)
            time.sleep(1.0)
        calls = list(load.calls)
        codes = Counter(code for _, _, code, _ in calls)
        versions = Counter(version for _, _, _, version in calls)
        assert set(codes) == {"OK"}, codes  # no failed or empty answer
        assert set(versions) == {old, new}, versions  # never a third, never broken
        assert all(v == new for t, _, _, v in calls if t > swapped + 0.5)  # settled
        assert all(v == old for t, _, _, v in calls if t < pointed)
        with RankingClient(target) as client:
            assert client.rank(USER, items).model_version == new  # the refused ones: not live
        assert swaps("refused") == refused_before + 2
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2
        assert "run-c" in errors[0] and "refused" in errors[0] and new in errors[0]
        assert "run-d" in errors[1] and "other-vectors-v9" in errors[1]
        assert any("hot swap" in r.getMessage() and new in r.getMessage()
                   for r in caplog.records)
        before = len(calls)
        print(f"\nhot swap under load (4 threads, Rank 1x100 / Recommend top 10): {before} "
              f"calls {dict(codes)}; versions {dict(versions)}; LATEST -> run-b to swapped "
              f"{swapped - pointed:.2f} s; run-c (torn ranker.onnx) and run-d (other "
              f"embeddings) refused, run-b kept serving")
    finally:
        service.stop(0)


def test_a_fixed_model_dir_is_not_followed(stack) -> None:
    from avrec.server.app import start

    with stack_env(stack):
        service = start(serve_config(stack))
    try:
        assert service.watcher is None
    finally:
        service.stop(0)


@pytest.mark.parametrize("content", ["", "run-missing"])
def test_a_pointer_being_written_or_to_nothing_keeps_the_model(stack, tmp_path, content):
    from avrec.server.hot_swap import ModelWatcher

    root = tmp_path / "models"
    root.mkdir()
    (root / "LATEST").write_text(content)

    class Engine:
        models = type("M", (), {"directory": Path(stack.model_dir), "version": "x/1"})()

    watcher = ModelWatcher(Engine(), root, serve_config(stack))  # type: ignore[arg-type]
    assert watcher.check() == ("same" if not content else "refused")
    assert watcher.check() in ("same", "refused")  # not retried while named


def signal_a_worker_thread(pid: int, signum: int) -> None:
    """Send ``signum`` to a thread of process ``pid`` other than its main one (``tgkill``):
    a process-directed signal may land there too."""
    import ctypes
    import platform

    def accepts(tid: int) -> bool:
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        blocked = int(status.split("SigBlk:")[1].split()[0], 16)
        return not blocked >> (signum - 1) & 1

    tids = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    tid = next(t for t in sorted(tids) if accepts(t))
    tgkill = {"x86_64": 234, "aarch64": 131}[platform.machine()]  # syscall numbers
    assert ctypes.CDLL(None, use_errno=True).syscall(tgkill, pid, tid, signum) == 0


def test_sighup_swaps_at_once_in_avrec_serve(stack, tmp_path) -> None:
    """``avrec serve`` with ``--model-watch-seconds 0`` reads ``LATEST`` only on SIGHUP."""
    import signal
    import subprocess
    import sys

    from avrec.server.client import RankingClient
    from tests.conftest import free_port
    from tests.server.conftest import CLOCK, env_of

    root = tmp_path / "models"
    root.mkdir()
    (root / "run-a").symlink_to(stack.model_dir)
    shutil.copytree(stack.model_dir, root / "run-b")
    point(root, "run-a")
    port = free_port()
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "avrec.server.app", "--port", str(port), "--clock",
               CLOCK.isoformat(), "--model-root", str(root), "--model-watch-seconds", "0",
               "--redis-url", stack.redis_url]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env_of(stack), stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        with RankingClient(f"127.0.0.1:{port}", timeout=60) as client:
            client.wait_until_serving(600, process)
            process.send_signal(signal.SIGHUP)  # as soon as it serves: handled, not fatal
            assert client.rank(USER, [1, 2, 3]).model_version.startswith("run-a/")
            point(root, "run-b")
            time.sleep(1.0)
            assert client.rank(USER, [1, 2, 3]).model_version.startswith("run-a/")  # no poll
            signal_a_worker_thread(process.pid, signal.SIGHUP)  # the kernel may do so
            wait_for(lambda: client.rank(USER, [1, 2, 3]).model_version.startswith("run-b/"),
                     120)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "model hot swap: run-a/" in log.read_text()
