"""``avrec serve`` settings: file < environment < flags, and refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from avrec.server.config import ServeConfig, load_config


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("port: 6000\nmax_candidates: 500\nclock: '2018-09-25T00:00:00Z'\n")
    env = {"AVREC_SERVE_PORT": "7000", "AVREC_SERVE_SNAPSHOT_REFRESH_SECONDS": "2.5"}
    config = load_config(path, {"max_candidates": 300, "host": None}, environ=env)
    assert config.port == 7000  # env over file
    assert config.max_candidates == 300  # flag over file
    assert config.snapshot_refresh_seconds == 2.5
    assert config.host == ServeConfig.host  # a None flag does not override
    assert config.clock_start() == datetime(2018, 9, 25, tzinfo=UTC)
    assert load_config(None, environ={}).clock_start() is None


def test_token_from_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("abc\n")
    assert load_config(None, {"auth_token_file": str(tmp_path / "token")}, {}).token() == "abc"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("prot: 1\n", "unknown settings ['prot']"),
        ("tls_cert: a.pem\n", "tls_cert and tls_key go together"),
        ("max_candidates: 0\n", "max_candidates must be positive"),
        ("compute_slots: -1\n", "compute_slots must be >= 0"),
        ("clock: yesterday\n", "clock"),
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, environ={})
