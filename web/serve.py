"""``avrec web``: the web page on uvicorn (default http://127.0.0.1:8080), a client of the
ranking service at ``--target``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from avrec import commands
from avrec.commands import Subparsers


def _top_k(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 50:
        raise argparse.ArgumentTypeError("--top-k must be between 1 and 50")
    return value


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """``avrec web`` and its options."""
    parser = subparsers.add_parser("web", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--target", default=os.environ.get("AVREC_WEB_TARGET", "127.0.0.1:50051"),
                        help="the gRPC ranking service (default 127.0.0.1:50051)")
    parser.add_argument("--top-k", type=_top_k, default=10, help="cards per list (1-50)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per service call")
    parser.add_argument("--items", type=Path, help="items table (default: the offline one)")
    parser.add_argument("--report", type=Path, action="append", default=[],
                        help="directory of evaluation runs, or of one run's report.json "
                             "(default: data/reports and data/evaluation)")
    parser.add_argument("--token-file", type=Path, help="the service's bearer token")
    parser.add_argument("--root-cert", type=Path, help="CA certificate of a TLS service")
    parser.set_defaults(func=run)
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """``avrec web``'s options from ``argv``."""
    return commands.parse_args(register, argv)


def run(args: argparse.Namespace) -> int:
    """Run ``avrec web`` with its parsed options."""
    import uvicorn

    from avrec.web.app import WebSettings, create_app

    settings = WebSettings(
        target=args.target, top_k=args.top_k, timeout=args.timeout, items=args.items,
        reports=args.report,
        token=args.token_file.read_text().strip() if args.token_file else None,
        root_cert=args.root_cert.read_bytes() if args.root_cert else None)
    print(f"avrec web: http://{args.host}:{args.port}/ (ranking service {args.target})",
          flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``avrec web`` from ``argv`` (``python -m avrec.web.serve``)."""
    return commands.main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
