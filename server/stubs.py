"""Python stubs of ``proto/avrec/v1/*.proto``, generated at build time, never committed.

``make setup`` runs ``python -m server.stubs``; :func:`ensure_stubs` regenerates them on import
when they are missing or older than the ``.proto`` files (a stamp holds the protos' hash), so
a fresh clone works without a build step. The stubs land in ``avrec/v1/`` so their module
names (``avrec.v1.ranking_pb2``) match the protobuf package ``avrec.v1``.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from avrec import config

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


def ensure_stubs() -> None:
    """Generate the stubs when missing or stale."""
    if not STAMP.is_file() or STAMP.read_text() != _protos_hash():
        generate()


if __name__ == "__main__":
    for written in generate():
        print(written.relative_to(config.REPO_ROOT))
    sys.exit(0)
