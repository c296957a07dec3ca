"""Where avrec finds the raw datasets."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from avrec import config


def git(*args: str) -> None:
    subprocess.run(["git", *args], check=True, capture_output=True)


def test_datasets_beside_the_checkout_or_beside_the_checkout_it_was_cloned_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    origin, shared = tmp_path / "work" / "main", tmp_path / "work" / "shared" / "datasets"
    shared.mkdir(parents=True)
    origin.mkdir()
    git("-C", str(origin), "init", "-q")
    git("-C", str(origin), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
        "--allow-empty", "-m", "init")
    clone = tmp_path / "scratch" / "clone"
    git("clone", "-q", str(origin), str(clone))
    monkeypatch.delenv("AVREC_DATASETS", raising=False)
    monkeypatch.setattr(config, "REPO_ROOT", origin)
    assert config.datasets_dir() == shared.resolve()
    monkeypatch.setattr(config, "REPO_ROOT", clone)
    assert config.datasets_dir() == shared.resolve()
    monkeypatch.setenv("AVREC_DATASETS", str(tmp_path / "elsewhere"))
    assert config.datasets_dir() == (tmp_path / "elsewhere").resolve()
    monkeypatch.delenv("AVREC_DATASETS")
    lone = tmp_path / "lone"
    lone.mkdir()
    monkeypatch.setattr(config, "REPO_ROOT", lone)
    assert config.datasets_dir() == (tmp_path / "shared" / "datasets").resolve()
