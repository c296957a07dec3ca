"""Dependencies flow one way: data (``avrec``) -> ``avrec.encoders`` -> ``avrec.ranker`` ->
``avrec.server`` -> ``avrec.web`` (the last four read from their top-level folders). A static
scan of every import statement (module level or inside functions) keeps it so; the CLI,
which starts every job, is the one module allowed to reach up."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# each may import those before it
LAYERS = ("avrec", "avrec.encoders", "avrec.ranker", "avrec.server", "avrec.web")
# where each layer's code lives: the folders stay at the top level (pyproject's package-dir)
FOLDERS = {"avrec": "avrec", "avrec.encoders": "encoders", "avrec.ranker": "ranker",
           "avrec.server": "server", "avrec.web": "web"}
# the old top-level names: no longer installed, they import only from the checkout's root
OLD_NAMES = ("encoders", "ranker", "server", "web")
TOP = {"avrec/cli.py", "avrec/demo.py"}  # the command line (and its demo) starts every layer's jobs
# the serving code runs on onnxruntime; Spark (avrec.spark) is the offline side's alone
SERVER_NEVER = ("torch", "transformers", "duckdb", "pyspark", "avrec.spark")


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def layer_of(module: str) -> str | None:
    """The layer ``module`` belongs to (the longest layer name it is in), or None."""
    return max((layer for layer in LAYERS
                if module == layer or module.startswith(layer + ".")), key=len, default=None)


def sources(package: str) -> list[Path]:
    generated = ROOT / "avrec" / "v1"  # protobuf stubs
    return [p for p in sorted((ROOT / FOLDERS[package]).rglob("*.py"))
            if generated not in p.parents]


def test_the_scan_sees_every_kind_of_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import a.b\nfrom c import d\nfrom . import e\n"
                      "def f():\n    import avrec.server.engine\n")
    assert imported(module) == [(1, "a.b"), (2, "c"), (5, "avrec.server.engine")]


@pytest.mark.parametrize("package", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(package: str) -> None:
    above = LAYERS[LAYERS.index(package) + 1:]
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in sources(package) if str(path.relative_to(ROOT)) not in TOP
             for line, name in imported(path) if layer_of(name) in above]
    assert not wrong, "\n".join(wrong)


def test_the_server_code_imports_no_training_stack() -> None:
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for path in sources("avrec.server")
             for line, name in imported(path)
             if any(name == never or name.startswith(never + ".") for never in SERVER_NEVER)]
    assert not wrong, "\n".join(wrong)


def test_layer_of_knows_the_namespaced_layers() -> None:
    assert layer_of("avrec.config") == "avrec"
    assert layer_of("avrec.server.engine") == "avrec.server"
    assert layer_of("avrec.webhooks") == "avrec"
    assert layer_of("numpy") is None


def test_nothing_imports_the_old_top_level_names() -> None:
    """``encoders``, ``ranker``, ``server``, ``web`` install only as ``avrec.*``: an import of
    the old name would work from the checkout's root alone (and load a second copy)."""
    folders = [*FOLDERS.values(), "tests", "bench", "feature_repo"]
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {name}"
             for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))
             if ROOT / "avrec" / "v1" not in path.parents
             for line, name in imported(path) if name.split(".")[0] in OLD_NAMES]
    assert not wrong, "\n".join(wrong)
