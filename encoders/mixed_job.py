"""Fuse the catalogue (``avrec fuse``): train, export, embed, write ``offline/item_embeddings``.

1. Train the weighted-sum and the gated fusion on co-consumption pairs strictly before the
   cutoff (:mod:`avrec.encoders.fusion_training`), ``a`` chosen on validation.
2. Export both to ONNX under ``<data_dir>/models/fusion/<version>/`` (``fusion.onnx``: gated,
   what serving uses; ``fusion_asum.onnx``: the weighted sum), each checked against torch,
   with ``metrics.json`` beside them.
3. Run both ONNX models through :mod:`avrec.onnx_runtime` over every item of
   ``item_encodings`` and write the table atomically.

Every row's ``event_timestamp`` is the cutoff: the vectors were shaped by interactions up to
then, so a point-in-time join must not hand them to anything earlier. ``embedding_version``
hashes both fusions' weights, the encoder versions and the cutoff.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import torch

from avrec import commands, config, tables
from avrec.commands import Subparsers, parse_time
from avrec.encoders import co_consumption, fusion, fusion_evaluation, fusion_fit, fusion_training
from avrec.encoders.fusion_training import DEFAULT_PAIRS, DEFAULT_TRAIN
from avrec.encoders.onnx_export import Parity, compare
from avrec.names import ITEM_EMBEDDINGS_TABLE
from avrec.onnx_runtime import OnnxModel

log = logging.getLogger(__name__)

TABLE = ITEM_EMBEDDINGS_TABLE
ENCODINGS_TABLE = "item_encodings"
GATED_FILE = "fusion.onnx"
ASUM_FILE = "fusion_asum.onnx"
METRICS_FILE = "metrics.json"
ITEM_EMBEDDINGS_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.Int64(),
    "embedding": pl.List(pl.Float32()),  # gated (learned) fusion, d-dim, L2-normalised
    "embedding_asum": pl.List(pl.Float32()),  # weighted-sum fusion, d-dim, L2-normalised
    "has_image": pl.Boolean(),
    "embedding_version": pl.Utf8(),
    "event_timestamp": tables.TS,  # the training cutoff
    "created_timestamp": tables.TS,  # when this table was written
}


def models_root() -> Path:
    """``<data_dir>/models/fusion``: one subdirectory per embedding version."""
    return config.data_dir() / "models" / "fusion"


def end_of_data(events: pl.DataFrame) -> datetime:
    """The default cutoff: just after the last event, so training sees every event."""
    last = events["event_timestamp"].max()
    if last is None:
        raise co_consumption.NotEnoughDataError("the events table is empty")
    return last + timedelta(microseconds=1)


def embedding_version(
    run: fusion_training.FusionRun, features: fusion_fit.ItemFeatures
) -> str:
    """12 hex chars of SHA-256 over both fusions' weights, encoder versions and cutoff."""
    digest = hashlib.sha256()
    for model in (run.gated, run.asum):
        digest.update(f"{model.kind}:{model.a}".encode())
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
    digest.update("|".join(features.text_encoders + features.image_encoders).encode())
    digest.update(run.cutoff.isoformat().encode())
    return digest.hexdigest()[:12]


def parity_sample(features: fusion_fit.ItemFeatures, per_kind: int = 32) -> dict:
    """Real items for the export check: up to ``per_kind`` with and without image."""
    with_image = np.flatnonzero(features.has_image)[:per_kind]
    without = np.flatnonzero(~features.has_image)[:per_kind]
    rows = np.sort(np.concatenate([with_image, without]))
    if len(rows) < 2:
        rows = np.arange(min(2, len(features)))
    return fusion.feeds(features.text[rows], features.image[rows], features.has_image[rows])


def _metadata(
    model: fusion.ItemFusionModel,
    run: fusion_training.FusionRun,
    features: fusion_fit.ItemFeatures,
    version: str,
) -> dict[str, str]:
    return {
        "fusion_kind": model.kind,
        "fusion_a": "" if model.a is None else f"{model.a:g}",
        "output_name": fusion.OUTPUT_NAME,
        "output_dim": str(model.d),
        "input_names": ",".join(fusion.INPUT_NAMES),
        "text_encoder": ",".join(features.text_encoders),
        "image_encoder": ",".join(features.image_encoders),
        "training_window_start": run.train_start.isoformat() if run.train_start else "",
        "training_cutoff": run.cutoff.isoformat(),
        "embedding_version": version,
        "pairs": (
            f"consecutive ratings >= {run.pair_config.min_rating:g} within "
            f"{run.pair_config.max_gap.total_seconds():g} s"
        ),
        "seed": str(run.config.seed),
    }


@dataclass(frozen=True)
class FuseReport:
    """What one ``avrec fuse`` run produced."""

    out_path: Path
    model_dir: Path
    version: str
    items: int
    with_image: int
    cutoff: datetime
    export_parity: dict[str, Parity]
    catalogue_parity: dict[str, Parity]
    run: fusion_training.FusionRun
    seconds: float

    def summary(self) -> str:
        """Human-readable lines: outputs, parity, the metrics table."""
        which = "held-out pairs after the cutoff" if self.run.test else "validation pairs"
        grid = ", ".join(f"a={a:g}: {r[50]:.4f}" for a, r in self.run.a_grid_validation.items())
        lines = [
            f"item embeddings: {self.items} items ({self.with_image} with image) -> "
            f"{self.out_path} ({self.seconds:.1f} s)",
            f"  version {self.version}, cutoff {self.cutoff.isoformat()}, models {self.model_dir}",
            f"  pairs: {self.run.pair_counts}",
            f"  a chosen on validation Recall@50: {grid} -> a={self.run.a:g}",
        ]
        for name, p in self.export_parity.items():
            c = self.catalogue_parity[name]
            lines.append(
                f"  parity {name}: sample min cos {p.min_cosine:.7f} "
                f"(max abs {p.max_abs_diff:.1e}); catalogue min cos {c.min_cosine:.7f} "
                f"(max abs {c.max_abs_diff:.1e})"
            )
        lines += [f"  note: {n}" for n in self.run.notes]
        lines += ["", fusion_evaluation.metrics_table(self.run.report_rows, f"metrics on {which}")]
        return "\n".join(lines)


def _write(frame: pl.DataFrame, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, out_path)


def run_fuse(
    events: pl.DataFrame,
    items: pl.DataFrame,
    encodings: pl.DataFrame,
    cutoff: datetime | None = None,
    out_path: Path | None = None,
    models_dir: Path | None = None,
    *,
    train_config: fusion_fit.TrainConfig = DEFAULT_TRAIN,
    pair_config: co_consumption.PairConfig = DEFAULT_PAIRS,
    a_grid: tuple[float, ...] = fusion_training.A_GRID,
    ablations: bool = False,
    threads: int | None = None,
) -> FuseReport:
    """Train, export, embed the whole catalogue through ONNX and write the offline table."""
    started = time.perf_counter()
    cutoff = cutoff or end_of_data(events)
    out_path = Path(out_path) if out_path is not None else tables.table_path(TABLE)
    features = fusion_fit.ItemFeatures.from_encodings(encodings)
    run = fusion_training.train_fusion(
        events,
        features,
        items,
        cutoff,
        a_grid=a_grid,
        config=train_config,
        pair_config=pair_config,
        ablations=ablations,
    )
    version = embedding_version(run, features)
    model_dir = Path(models_dir or models_root()) / version
    sample = parity_sample(features)
    all_feeds = fusion.feeds(features.text, features.image, features.has_image)
    export_parity: dict[str, Parity] = {}
    catalogue_parity: dict[str, Parity] = {}
    vectors: dict[str, np.ndarray] = {}
    for name, model, file in (("gated", run.gated, GATED_FILE), ("asum", run.asum, ASUM_FILE)):
        path = model_dir / file
        meta = _metadata(model, run, features, version)
        export_parity[name] = fusion.export_onnx(model, path, sample, meta)
        onnx_model = OnnxModel(path, threads=threads or os.cpu_count() or 1)
        vectors[name] = onnx_model.run_batched(all_feeds, 4096)[fusion.OUTPUT_NAME]
        catalogue_parity[name] = compare(vectors[name], fusion_fit.embed(model, features))
        if not catalogue_parity[name].ok:
            raise RuntimeError(f"{name}: ONNX and torch disagree on the catalogue")
    now = datetime.now(UTC)
    frame = pl.DataFrame(
        {
            "item_id": features.item_ids,
            "embedding": pl.Series(vectors["gated"]).cast(pl.List(pl.Float32)),
            "embedding_asum": pl.Series(vectors["asum"]).cast(pl.List(pl.Float32)),
            "has_image": features.has_image,
            "embedding_version": [version] * len(features),
            "event_timestamp": [cutoff] * len(features),
            "created_timestamp": [now] * len(features),
        },
        schema=ITEM_EMBEDDINGS_SCHEMA,
    )
    _write(frame, out_path)
    report = FuseReport(
        out_path=out_path,
        model_dir=model_dir,
        version=version,
        items=len(features),
        with_image=int(features.has_image.sum()),
        cutoff=cutoff,
        export_parity=export_parity,
        catalogue_parity=catalogue_parity,
        run=run,
        seconds=time.perf_counter() - started,
    )
    metrics = {
        **run.to_json(),
        "embedding_version": version,
        "parity": {
            name: {
                "sample_min_cosine": export_parity[name].min_cosine,
                "sample_max_abs_diff": export_parity[name].max_abs_diff,
                "catalogue_min_cosine": catalogue_parity[name].min_cosine,
                "catalogue_max_abs_diff": catalogue_parity[name].max_abs_diff,
            }
            for name in export_parity
        },
        "table": str(out_path),
        "items": len(features),
        "seconds": report.seconds,
    }
    tmp = model_dir / f".{METRICS_FILE}.tmp"
    tmp.write_text(json.dumps(metrics, indent=2, default=str))
    os.replace(tmp, model_dir / METRICS_FILE)
    return report


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """``avrec fuse``: learn mixed item embeddings and write ``offline/item_embeddings``."""
    parser = subparsers.add_parser("fuse", description=register.__doc__)
    parser.add_argument(
        "--cutoff", type=parse_time, help="train on events strictly before (default: end of data)"
    )
    parser.add_argument("--events", type=Path, help="events parquet (default: offline events)")
    parser.add_argument("--items", type=Path, help="items parquet (default: offline items)")
    parser.add_argument("--encodings", type=Path, help="item_encodings parquet (default: offline)")
    parser.add_argument("--out", type=Path, help="output parquet (default: offline table)")
    parser.add_argument("--models-dir", type=Path, help="default: <data_dir>/models/fusion")
    parser.add_argument("--a-grid", type=_floats, default=fusion_training.A_GRID, metavar="A,A")
    parser.add_argument("--epochs", type=int, default=DEFAULT_TRAIN.epochs)
    parser.add_argument("--seed", type=int, default=DEFAULT_TRAIN.seed)
    parser.add_argument("--min-rating", type=float, default=DEFAULT_PAIRS.min_rating)
    parser.add_argument(
        "--max-gap-hours",
        type=float,
        default=DEFAULT_PAIRS.max_gap.total_seconds() / 3600,
        help="largest gap between the two ratings of a pair",
    )
    parser.add_argument(
        "--ablations", action="store_true", help="also score learned single-modality projections"
    )
    parser.add_argument("--threads", type=int, help="torch/onnxruntime threads (default: all)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``avrec fuse`` with its parsed options."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    events = pl.read_parquet(args.events) if args.events else tables.read_table("events")
    items = pl.read_parquet(args.items) if args.items else tables.read_table("items")
    encodings_path = args.encodings or tables.table_path(ENCODINGS_TABLE)
    if not Path(encodings_path).exists():
        raise FileNotFoundError(f"{encodings_path} not found; run `avrec embed` first")
    report = run_fuse(
        events,
        items,
        pl.read_parquet(encodings_path),
        args.cutoff,
        args.out,
        args.models_dir,
        train_config=fusion_fit.TrainConfig(epochs=args.epochs, seed=args.seed),
        pair_config=co_consumption.PairConfig(args.min_rating, timedelta(hours=args.max_gap_hours)),
        a_grid=args.a_grid,
        ablations=args.ablations,
        threads=args.threads,
    )
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """``avrec fuse`` from ``argv`` (tests, ``python -m avrec.encoders.mixed_job``)."""
    return commands.main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
