"""The gRPC stubs are built by the setup step only: importing :mod:`avrec.server.protocol` with
missing or stale stubs raises :class:`avrec.errors.SetupError` naming ``make setup``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from avrec.errors import SetupError
from avrec.server import stubs


def _stubs_in(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    monkeypatch.setattr(stubs, "OUT_ROOT", root)
    monkeypatch.setattr(stubs, "STUB_DIR", root / "avrec" / "v1")
    monkeypatch.setattr(stubs, "STAMP", root / "avrec" / "v1" / ".proto-hash")


def test_missing_then_stale_stubs_raise_until_the_setup_step_builds_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _stubs_in(monkeypatch, tmp_path)
    with pytest.raises(SetupError, match="make setup"):
        stubs.require_stubs()
    stubs.ensure_stubs()  # what `make setup` runs
    assert (tmp_path / "avrec" / "v1" / "ranking_pb2_grpc.py").is_file()
    stubs.require_stubs()
    stubs.STAMP.write_text("an older proto")
    with pytest.raises(SetupError, match="older than"):
        stubs.require_stubs()


def test_importing_the_protocol_never_generates(tmp_path: Path) -> None:
    code = ("from pathlib import Path\nimport avrec.server.stubs as s\n"
            f"s.STAMP = Path({str(tmp_path / '.proto-hash')!r})\n"
            "s.generate = None  # importing must not call it\n"
            "import avrec.server.protocol\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "SetupError" in done.stderr and "make setup" in done.stderr
    assert not (tmp_path / ".proto-hash").exists()
