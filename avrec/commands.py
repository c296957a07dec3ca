"""What every ``avrec`` subcommand shares: the register pattern, the global options and the
one error path.

A job module defines ``register(subparsers)``, which adds its subparser (its options and
``set_defaults(func=run)``) and returns it; :mod:`avrec.cli` registers it under the one
``avrec`` parser, and the module's own ``main(argv)`` is :func:`main` over the same register.
Errors a user can fix (:class:`~avrec.errors.AvrecError`, ``FileNotFoundError``,
``ValueError``) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from avrec.errors import AvrecError

Subparsers = Any  # argparse's _SubParsersAction (private)
Register = Callable[[Subparsers], argparse.ArgumentParser]
USER_ERRORS = (AvrecError, FileNotFoundError, ValueError)


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or datetime; naive values are UTC.

    >>> parse_time("2018-01-01T02:00:00+02:00").isoformat()
    '2018-01-01T00:00:00+00:00'
    """
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date/time: {text!r}") from exc
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def top_parser(**kwargs: Any) -> argparse.ArgumentParser:
    """The ``avrec`` parser with the global options (given before the subcommand, they hold
    for every subcommand)."""
    parser = argparse.ArgumentParser(prog="avrec", **kwargs)
    parser.add_argument("--redis-url", default=None, help="default: $REDIS_URL or local 6379")
    return parser


def subparsers(parser: argparse.ArgumentParser, **kwargs: Any) -> Subparsers:
    """The subcommands of ``parser``: the chosen one's name lands in ``args.command``."""
    return parser.add_subparsers(dest="command", required=True, metavar="COMMAND", **kwargs)


def run(args: argparse.Namespace) -> int:
    """Run the chosen subcommand: global options first (``--redis-url`` becomes
    ``$REDIS_URL``, which every job and its child processes read), then ``args.func``; an
    error a user can fix is one line on stderr and exit status 2."""
    if getattr(args, "redis_url", None):
        os.environ["REDIS_URL"] = args.redis_url
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as exc:
        print(f"avrec {args.command}: error: {exc}", file=sys.stderr)
        return 2


def parse_args(register: Register, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``argv`` (default: the command line) parsed by the subparser ``register`` adds."""
    sub = subparsers(top_parser())
    register(sub)
    (name,) = sub.choices
    argv = sys.argv[1:] if argv is None else list(argv)
    return sub.choices[name].parse_args(argv, argparse.Namespace(command=name))


def main(register: Register, argv: Sequence[str] | None = None) -> int:
    """A job module's ``main(argv)``: :func:`parse_args`, then :func:`run` (for tests and
    ``python -m``)."""
    return run(parse_args(register, argv))
