"""The wheel installs one top-level package, ``avrec``: the layers kept in the top-level folders
``encoders/ ranker/ server/ web/`` ship as ``avrec.encoders`` ... (pyproject's ``package-dir``),
every module of theirs included, with the web page's templates and the gRPC stubs. Offline: the
wheel is built from a copy of the sources with this environment's setuptools."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from avrec.server.stubs import ensure_stubs

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("encoders", "ranker", "server", "web")
SOURCES = ("avrec", *LAYERS, "proto", "pyproject.toml", "setup.py", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ensure_stubs()  # what `make setup` does before anything is built
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp / "out"), str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = (tmp / "out").glob("avrec-*.whl")
    return built


@pytest.fixture(scope="module")
def names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_one_top_level_package(names: set[str]) -> None:
    tops = {name.split("/")[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"avrec"}, sorted(tops)
    top_level = [n for n in names if n.endswith(".dist-info/top_level.txt")]
    assert not top_level or all(n.startswith("avrec") for n in top_level)


def test_every_module_of_every_layer_ships_under_avrec(names: set[str]) -> None:
    expected = {f"avrec/{path.relative_to(ROOT / 'avrec').as_posix()}"
                for path in (ROOT / "avrec").rglob("*.py") if "__pycache__" not in path.parts}
    for layer in LAYERS:
        expected |= {f"avrec/{layer}/{path.relative_to(ROOT / layer).as_posix()}"
                     for path in (ROOT / layer).rglob("*.py") if "__pycache__" not in path.parts}
    assert not expected - names, sorted(expected - names)
    assert not [n for n in names if n.split("/")[0] in LAYERS]


def test_templates_static_and_stubs_ship(names: set[str]) -> None:
    for folder in ("templates", "static"):
        for path in (ROOT / "web" / folder).iterdir():
            assert f"avrec/web/{folder}/{path.name}" in names
    for stub in ("ranking_pb2.py", "ranking_pb2_grpc.py", "ranking_pb2.pyi"):
        assert f"avrec/v1/{stub}" in names


def test_installed_wheel_imports_only_the_namespaced_names(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    # -I -S: neither this checkout, its editable install nor site-packages is on sys.path
    code = ("import sys; sys.path.insert(0, sys.argv[1])\n"
            "import avrec.encoders, avrec.ranker, avrec.server, avrec.web\n"
            "assert avrec.server.__file__.startswith(sys.argv[1]), avrec.server.__file__\n"
            "for old in ('encoders', 'ranker', 'server', 'web'):\n"
            "    try:\n        __import__(old)\n"
            "    except ModuleNotFoundError:\n        continue\n"
            "    raise SystemExit(f'import {old} works')\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
