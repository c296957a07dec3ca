"""Python stubs of ``proto/avrec/v1/*.proto``, generated at build time, never committed.

The setup step (``make setup``, or ``python -m avrec.server.stubs``) is the one place that writes
them: :func:`ensure_stubs` regenerates them when missing or older than the ``.proto`` files (a
stamp holds the protos' hash). Importing them never does; :func:`require_stubs` (called by
:mod:`avrec.server.protocol`) raises :class:`avrec.errors.SetupError` instead. The stubs land in
``avrec/v1/`` so their module names (``avrec.v1.ranking_pb2``) match the protobuf package
``avrec.v1``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from avrec import config
from avrec.errors import SetupError

PROTO_ROOT = config.REPO_ROOT / "proto"
OUT_ROOT = config.REPO_ROOT
STUB_DIR = OUT_ROOT / "avrec" / "v1"
STAMP = STUB_DIR / ".proto-hash"


def proto_files() -> list[Path]:
    """The service's ``.proto`` files, sorted."""
    return sorted((PROTO_ROOT / "avrec" / "v1").glob("*.proto"))


def _protos_hash() -> str:
    digest = hashlib.sha256()
    for path in proto_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def generate() -> list[Path]:
    """Run ``grpc_tools.protoc`` on the protos; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    STUB_DIR.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={OUT_ROOT}",
            f"--pyi_out={OUT_ROOT}", f"--grpc_python_out={OUT_ROOT}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {files}")
    STAMP.write_text(_protos_hash())
    return sorted(STUB_DIR.glob("*_pb2*.py"))


def stubs_problem() -> str | None:
    """Why the stubs cannot be used as they are (missing, stale), or None when current.

    Without the ``.proto`` files (an installed package, not a checkout) the stubs shipped with
    it are taken as current."""
    if not proto_files():
        return None if any(STUB_DIR.glob("*_pb2.py")) else f"no gRPC stubs in {STUB_DIR}"
    if not STAMP.is_file():
        return f"the gRPC stubs in {STUB_DIR} were never generated"
    if STAMP.read_text() != _protos_hash():
        return f"the gRPC stubs in {STUB_DIR} are older than {PROTO_ROOT / 'avrec' / 'v1'}"
    return None


def ensure_stubs() -> None:
    """Generate the stubs when missing or stale (the setup step)."""
    if stubs_problem() is not None:
        generate()


def require_stubs() -> None:
    """Raise :class:`SetupError` unless the stubs are present and current."""
    problem = stubs_problem()
    if problem is not None:
        raise SetupError(f"{problem}: run `make setup` (or `python -m avrec.server.stubs`)")


if __name__ == "__main__":
    for written in generate():
        print(written.relative_to(config.REPO_ROOT))
    sys.exit(0)
