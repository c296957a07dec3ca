"""The ``avrec`` command line: one subcommand per step of the pipeline.

    avrec redis                       make sure Redis answers (start the embedded one if not)
    avrec redis --cluster 3           start a local Redis Cluster (3 masters + 3 replicas)
    avrec ingest                      raw catalogue + events -> offline Parquet tables
    avrec features                    behaviour features (user, item) -> offline tables
    avrec apply                       feast apply on feature_repo/, from any directory
    avrec materialize                 offline -> Redis (incremental, or --start/--end)
    avrec training-set                point-in-time training set -> Parquet
    avrec online                      read a user's online features (TTL enforced)
    avrec embed / neighbours / fuse   item encoders and the mixed embedding (encoders/)
    avrec train / evaluate            the ranker and its offline evaluation (ranker/)
    avrec serve / recommend           the gRPC ranking service and a client of it (server/)
    avrec web                         the web page, a client of the service (web/)
    avrec demo                        all of the above on the embedded default dataset

Heavy imports (feast, torch) happen inside the subcommands, so ``avrec --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from avrec import commands
from avrec.commands import subparsers, top_parser
from avrec.data_commands import REGISTERS
from avrec.demo import register_demo

# The jobs of the other packages: subcommand -> (module with ``register(subparsers)``, its
# line in ``avrec --help``). A module is imported only when its subcommand is run.
JOBS: dict[str, tuple[str, str]] = {
    "embed": ("avrec.encoders.embed_job", "item text and poster encodings -> offline table"),
    "neighbours": ("avrec.encoders.neighbours",
                   "nearest neighbours of a few items, genre agreement"),
    "fuse": ("avrec.encoders.mixed_job",
             "the mixed item embedding (gated fusion) -> offline table"),
    "train": ("avrec.ranker.train_job", "train the rankers, export to ONNX -> data/models"),
    "evaluate": ("avrec.ranker.evaluate_job", "offline evaluation on temporal splits -> a report"),
    "serve": ("avrec.server.app", "the gRPC ranking service"),
    "recommend": ("avrec.server.client", "ask the ranking service (Recommend, or Rank)"),
    "web": ("avrec.web.serve", "the web page, a client of the ranking service"),
}


def job_module(name: str) -> ModuleType:
    """The module of job ``name``, with the extras to install when its imports fail."""
    try:
        return importlib.import_module(JOBS[name][0])
    except ModuleNotFoundError as exc:
        extra = "web" if name == "web" else "train"
        raise SystemExit(f"avrec {name}: {exc} (install the extras: .[{extra}])") from exc


def run_job(name: str, argv: list[str]) -> None:
    """``avrec NAME ARGV...`` from another job (the demo); stops it when the job fails."""
    code = job_module(name).main(argv)
    if code:
        raise SystemExit(code)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of ``avrec``: every subcommand is listed, but a job's own subparser (its
    module's ``register``) is built only when it is ``command``: the others are placeholders
    that accept any arguments, so listing them imports nothing heavy."""
    parser = top_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = subparsers(parser)
    for register in REGISTERS:
        register(sub)
    for name, (_, text) in JOBS.items():
        if name == command:
            job_module(name).register(sub)
        else:
            sub.add_parser(name, help=text, add_help=False)
    register_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``avrec`` console script.

    Parsed in two steps: the first finds the subcommand, the second parses the whole line
    with that subcommand's own subparser, so global options (before the subcommand) hold for
    every subcommand. Errors a user can fix print one line and exit with 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen, _ = build_parser().parse_known_args(argv)
    return commands.run(build_parser(chosen.command).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
