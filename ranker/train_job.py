"""``avrec train``: train the deep ranker on point-in-time rows, one versioned directory per run.

The run reads the offline events and items, the item vectors (default: the learned mixed
embedding of ``offline/item_embeddings.parquet``), builds point-in-time training rows through
the feature store (:mod:`avrec.pit_join`, the ``behaviour_features`` service), early-stops on
the latest 10% of labels and writes ``DATA/models/ranker/<version>/``:

* ``model.pt`` (torch state dict), ``curves.png`` (loss per epoch),
* ``manifest.json``: data window, seed, training config, item-vector source and its
  embedding / encoder versions, the feature service, losses,
* ``ranker.onnx`` + ``contract.json`` when the ONNX export is available (:mod:`ranker.export`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import torch

from avrec import behaviour_features, config, tables
from avrec.cli import parse_time
from ranker.deep_ranker import DeepRanker
from ranker.features import ItemVectors
from ranker.training import TrainConfig, save_curves

VECTOR_SOURCES = {
    "mixed": ("item_embeddings", "embedding"),
    "asum": ("item_embeddings", "embedding_asum"),
    "text": ("item_encodings", "text_embedding"),
    "image": ("item_encodings", "image_embedding"),
}


def load_vectors(kind: str, offline: Path | None = None) -> tuple[ItemVectors, dict[str, Any]]:
    """Item vectors of one kind, with the versions of what produced them."""
    table, column = VECTOR_SOURCES[kind]
    frame = tables.read_table(table, offline)
    versions = {
        c: sorted(frame[c].drop_nulls().unique().to_list())
        for c in ("embedding_version", "text_encoder", "image_encoder")
        if c in frame.columns
    }
    return ItemVectors.from_frame(frame, column, kind), {
        "table": table,
        "column": column,
        **versions,
    }


def run_version(payload: dict[str, Any]) -> str:
    """A short, content-derived run id: time plus a hash of the settings."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{digest.hexdigest()[:8]}"


def train(
    vectors: str = "mixed",
    start: datetime | None = None,
    end: datetime | None = None,
    negatives: int = 4,
    train_config: TrainConfig | None = None,
    out_root: Path | None = None,
) -> Path:
    """Train one ranker and write its directory; returns the directory."""
    from avrec.feature_store import get_store

    started = time.perf_counter()
    train_config = train_config or TrainConfig()
    events, items = tables.read_table("events"), tables.read_table("items")
    ts = pl.col("event_timestamp")
    window = events.filter(
        (ts >= start if start else pl.lit(True)) & (ts < end if end else pl.lit(True))
    )
    if window.filter(pl.col("event_type") == "rating").is_empty():
        raise ValueError(f"no rating events in the window [{start}, {end})")
    item_vectors, vector_info = load_vectors(vectors)
    genres = len(behaviour_features.genre_vocabulary(items))
    model = DeepRanker(
        item_vectors, get_store(), genres, negatives, train_config, seed=train_config.seed
    )
    model.fit(window, items)
    manifest = {
        "kind": "ranker",
        "data_window": {
            "start": str(window["event_timestamp"].min()),
            "end": str(window["event_timestamp"].max()),
        },
        "feature_service": "behaviour_features",
        "item_vectors": vector_info,
        "negatives_per_positive": negatives,
        "train_config": asdict(train_config),
        "dense_features": {
            "user": model.encoder.user_dense_names,
            "item": [*model.encoder.item_dense_names, "item_has_no_vector"],
        },
        "rating_mean": model.encoder.rating_mean,
        "losses": asdict(model.history),
    }
    root = out_root or config.data_dir() / "models" / "ranker"
    out = root / run_version(manifest)
    out.mkdir(parents=True, exist_ok=True)
    assert model.model is not None
    torch.save(model.model.state_dict(), out / "model.pt")
    save_curves(model.history, out / "curves.png", f"ranker ({vectors} vectors)")
    manifest["seconds"] = round(time.perf_counter() - started, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return out


def main(argv: list[str] | None = None) -> int:
    """``avrec train`` options."""
    parser = argparse.ArgumentParser(
        prog="avrec train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vectors", choices=sorted(VECTOR_SOURCES), default="mixed")
    parser.add_argument("--start", type=parse_time, help="first label time (default: all)")
    parser.add_argument("--end", type=parse_time, help="label times before this (default: all)")
    parser.add_argument("--negatives", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="models root (default: DATA/models/ranker)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    out = train(args.vectors, args.start, args.end, args.negatives, cfg, args.out)
    manifest = json.loads((out / "manifest.json").read_text())
    losses = manifest["losses"]
    print(f"ranker written to {out}")
    print(
        f"  epochs run: {len(losses['train_loss'])}, kept epoch {losses['best_epoch'] + 1}, "
        f"validation BCE {min(losses['val_loss']):.4f}, {manifest['seconds']} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
