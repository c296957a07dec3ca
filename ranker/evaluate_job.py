"""``avrec evaluate``: the offline evaluation job (options, preconditions, reports).

Builds the splits, runs the harness (:mod:`avrec.ranker.evaluation`) over the models asked for
(:mod:`avrec.ranker.model_registry`) and writes report.json as each model finishes, then
report.md and the charts (:mod:`avrec.ranker.report`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from avrec import config, tables
from avrec.names import ITEM_BEHAVIOUR
from avrec.ranker.cpu_share import usable_cpus
from avrec.ranker.evaluation import SHORT_HISTORY, evaluate
from avrec.ranker.exploration import EXPLORE_TOLERANCE
from avrec.ranker.model_registry import (
    ALL_MODELS,
    DEEP_MODELS,
    HYBRID_MODELS,
    SECOND_PROCESS_MODELS,
    SEQUENTIAL_MODELS,
    SERVED,
    RunState,
    model_specs,
    shareable,
    with_generators,
)
from avrec.ranker.second_process import SecondProcess, SpecArgs
from avrec.ranker.splits import Split, global_split, per_user_split


def register(subparsers: Any) -> argparse.ArgumentParser:
    """``avrec evaluate`` and its options (``subparsers``: :mod:`avrec.commands`)."""
    parser = subparsers.add_parser(
        "evaluate", description="Offline evaluation of recommenders on temporal splits."
    )
    parser.add_argument("--out", type=Path, help="report directory (default: DATA/evaluation)")
    parser.add_argument("--split", choices=["per-user", "global", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20], help="cut-offs")
    parser.add_argument("--positive-threshold", type=float, default=4.0)
    parser.add_argument(
        "--models", default=None,
        help="comma-separated subset of "
        f"{','.join(ALL_MODELS + HYBRID_MODELS + SEQUENTIAL_MODELS + DEEP_MODELS)},{SERVED} "
        "(default: all; the content models only when the encodings exist)",
    )
    parser.add_argument("--offline", type=Path, help="offline tables directory")
    parser.add_argument("--encodings", type=Path, help="item encodings parquet")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--validation-fraction", type=float, default=0.1)
    parser.add_argument("--quantiles", type=float, nargs=2, default=[0.8, 0.9],
                        metavar=("T1", "T2"), help="global split cut quantiles")
    parser.add_argument("--short-history", type=int, default=SHORT_HISTORY,
                        help="slice: users with fewer fit ratings than this")
    parser.add_argument("--quick", action="store_true", help="tiny hyperparameter grids")
    parser.add_argument("--explore-tolerance", type=float, default=EXPLORE_TOLERANCE,
                        help="share of validation NDCG@max(k) the hybrid may spend on "
                        "exploration slots for new items (the operating point)")
    parser.add_argument("--processes", type=int, choices=[1, 2],
                        default=min(2, usable_cpus()),
                        help="2: the sequential and deep models run in a second process beside "
                        "the others, which then takes a share of the hybrid ablations "
                        "(default: 2 where this process may use two CPUs or more)")
    parser.set_defaults(func=run)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The ``avrec evaluate`` options from ``argv``."""
    from avrec import commands

    return commands.parse_args(register, argv)


def build_splits(events: pl.DataFrame, args: argparse.Namespace) -> list[Split]:
    """The splits asked for on the command line."""
    out = []
    if args.split in ("per-user", "both"):
        out.append(per_user_split(events, args.test_fraction, args.validation_fraction,
                                  args.positive_threshold))
    if args.split in ("global", "both"):
        out.append(global_split(events, *args.quantiles, args.positive_threshold))
    return out


def check_preconditions(names: Sequence[str], offline: Path) -> None:
    """Fail before any work when a requested model cannot run (FileNotFoundError: the CLI
    prints its one-line message and exits with 2)."""
    missing = [t for t in ("events", "items") if not tables.table_path(t, offline).exists()]
    if missing:
        raise FileNotFoundError(f"no {', '.join(missing)} table in {offline}; "
                                "run `avrec ingest` first")
    if SERVED in names and not tables.table_path(ITEM_BEHAVIOUR, offline).exists():
        raise FileNotFoundError(f"{SERVED} reads the item_behaviour feature table, "
                                f"which is not in {offline}; run `avrec features` first")
    if any(n in DEEP_MODELS for n in names):
        registry = config.registry_path()
        if not registry.exists():
            raise FileNotFoundError(f"{', '.join(n for n in names if n in DEEP_MODELS)}"
                                    f" read features through Feast, but there is no registry "
                                    f"at {registry}; run `avrec features && avrec apply` first")


def split_processes(
    names: Sequence[str], processes: int, spec_args: SpecArgs, state: RunState | None = None
) -> tuple[list[str], SecondProcess | None]:
    """The models this process evaluates, and a :class:`SecondProcess` for the others and
    for a share of the hybrid ablations (None with one process, or when there is nothing to
    give it). ``state``: this process's run state, which the second process continues."""
    aside = [n for n in names if n in SECOND_PROCESS_MODELS]
    here = [n for n in names if n not in SECOND_PROCESS_MODELS]
    shared = shareable(here)
    if processes < 2 or not (aside or shared) or not here:
        return list(names), None
    return here, SecondProcess(aside, spec_args, shared, state)


def run(args: argparse.Namespace) -> int:
    """``avrec evaluate``: evaluate the baselines, write report.json / report.md / report.png."""
    from avrec.ranker import report as report_io

    offline = args.offline or config.offline_dir()
    encodings = args.encodings or tables.table_path("item_encodings", offline)
    if args.models:
        names = [n.strip() for n in args.models.split(",") if n.strip()]
        skipped = []
    else:
        has_encodings = encodings.exists()
        wanted = (*ALL_MODELS, "hybrid-mixed", SERVED)
        needs_encodings = [n for n in wanted if n.endswith(("-knn", "-mixed")) or n == SERVED]
        names = [n for n in wanted if has_encodings or n not in needs_encodings]
        skipped = [n for n in wanted if n not in names]
    names = with_generators(names)
    check_preconditions(names, offline)
    events = tables.read_table("events", offline)
    items = tables.read_table("items", offline)
    spec_args = SpecArgs(args.quick, args.positive_threshold, encodings, offline)
    state = RunState()
    main_names, second = split_processes(names, args.processes, spec_args, state)
    specs = model_specs(main_names, spec_args.quick, spec_args.positive_threshold,
                        spec_args.encodings, spec_args.offline, state)
    out = args.out or config.data_dir() / "evaluation"
    report: dict[str, Any] = {
        "seed": args.seed,
        "k": sorted(set(args.k)),
        "positive_threshold": args.positive_threshold,
        "models": names,
        "skipped_models": {n: f"no item encodings at {encodings}" for n in skipped},
        "splits": {},
    }

    def partial(kind: str, models: dict[str, Any]) -> None:
        report["splits"][kind] = {"partial": True, "models": models}
        report_io.write_json(report, out)

    for split in build_splits(events, args):
        beside = f" ({', '.join(second.names)} in a second process)" if second else ""
        print(f"==> evaluating {len(specs)} models on the {split.kind} split{beside}",
              flush=True)
        report["splits"][split.kind] = evaluate(specs, split, items, args.k, args.seed,
                                                args.short_history, partial,
                                                args.explore_tolerance, second)
    for path in report_io.write_report(report, out):
        print(f"wrote {path}")
    print(report_io.markdown(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``avrec evaluate`` from ``argv`` (tests, ``python -m avrec.ranker.evaluate_job``)."""
    from avrec import commands

    return commands.main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
