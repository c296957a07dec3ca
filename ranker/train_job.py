"""``avrec train``: train the deep ranker on point-in-time rows, one versioned directory per run.

The run reads the offline events and items, the item vectors (default: the learned mixed
embedding of ``offline/item_embeddings.parquet``), builds point-in-time training rows through
the feature store (:mod:`avrec.pit_join`, the ``behaviour_features`` service), early-stops on
the latest 10% of labels and writes ``DATA/models/ranker/<version>/``:

* ``model.pt`` (torch state dict), ``curves.png`` (loss per epoch),
* ``manifest.json``: data window, seed, training config, item-vector source and its
  embedding / encoder versions, the feature service, losses, ONNX parity,
* ``ranker/`` (``ranker.onnx`` + ``contract.json``) and the retrieval pair ``user_tower/`` and
  ``item_tower/`` (:mod:`avrec.ranker.export`), each checked against torch on real rows;
* ``hybrid/``: the hybrid ranker (:mod:`avrec.ranker.hybrid_job`: generators and exploration slots
  chosen on a validation split of the window), which the server prefers for ``Recommend`` and
  ``Rank``.

``DATA/models/ranker/LATEST`` names the newest run; ``avrec serve`` loads it by default.
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
from typing import Any, get_args

import numpy as np
import polars as pl
import torch

from avrec import behaviour_features, commands, config, tables
from avrec.commands import Subparsers, parse_time
from avrec.names import ITEM_EMBEDDINGS_TABLE
from avrec.ranker.contract import TRAINING_SERVICE, ranker_contract
from avrec.ranker.deep_ranker import DeepRanker
from avrec.ranker.export import (
    LATEST,
    Exported,
    export_item_tower,
    export_one_user_ranker,
    export_ranker,
    export_user_tower,
)
from avrec.ranker.features import ItemVectors
from avrec.ranker.report import describe_exploration
from avrec.ranker.training import (
    Loss,
    TrainConfig,
    model_inputs,
    save_curves,
    torch_threads,
)
from avrec.ranker.two_tower import TwoTowerRecommender
from avrec.ranker.two_tower_training import TwoTowerConfig, encode_rows, positive_rows
from avrec.training_set import Sampling

PARITY_ROWS = 4096
PARITY_BATCHES = (1, 7, 256, 1024, 2808)

VECTOR_SOURCES = {
    "mixed": (ITEM_EMBEDDINGS_TABLE, "embedding"),
    "asum": (ITEM_EMBEDDINGS_TABLE, "embedding_asum"),
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


def embedding_version(info: dict[str, Any]) -> str:
    """The one embedding (or encoder) version the vectors were read with."""
    versions = info.get("embedding_version") or [
        "+".join(str(v) for k in ("text_encoder", "image_encoder") for v in info.get(k, []))
    ]
    if len(versions) != 1 or not versions[0]:
        raise ValueError(f"item vectors of {info['table']} carry versions {versions}, need one")
    return str(versions[0])


def parity_batches(arrays_of, n: int, seed: int = 0) -> list[list[Any]]:
    """Batches of several sizes (the dynamic batch axis) over up to PARITY_ROWS real rows."""
    rows = np.random.default_rng(seed).permutation(n)[:PARITY_ROWS]
    out, start = [], 0
    for size in PARITY_BATCHES:
        idx = np.sort(rows[start : start + size])
        if idx.size:
            out.append(arrays_of(idx))
        start += size
    return out


def parity_info(exported: Exported) -> dict[str, Any]:
    """Where an export went and how close it is to torch."""
    parity = exported.parity
    return {
        "path": str(exported.path),
        "contract_version": exported.contract.version,
        "max_abs_diff": parity.max_abs_diff if parity else None,
        "rows": parity.rows if parity else 0,
    }


def export_ranker_dir(
    model: DeepRanker, window: pl.DataFrame, items: pl.DataFrame, version: str, out: Path
) -> dict[str, Any]:
    """Export the fitted ranker to ``out/ranker`` (the batch-aligned reference graph and the
    one-user serving graph) with parity on real training rows."""
    assert model.model is not None and model.vectors is not None
    data = model.encode(model.labelled_rows(window, items))
    contract = ranker_contract(model.encoder, model.vectors.dim, model.vectors.name, version)
    batches = parity_batches(
        lambda idx: [t.numpy() for t in model_inputs(data, idx, model.vectors.vectors)],
        len(data["item_idx"]),
    )
    info = parity_info(export_ranker(model.model, contract, out / "ranker", batches))
    one_user = export_one_user_ranker(model.model, contract, out / "ranker", batches)
    return info | {"one_user": parity_info(one_user)}


def train_retrieval(
    vectors: ItemVectors,
    window: pl.DataFrame,
    items: pl.DataFrame,
    genres: int,
    version: str,
    seed: int,
    out: Path,
) -> dict[str, Any]:
    """Fit the two-tower pair and export both towers (``out/user_tower``, ``out/item_tower``)."""
    from avrec.feature_store import get_store

    store = get_store()
    towers = TwoTowerRecommender(
        vectors, store, genres, TwoTowerConfig(seed=seed), embedding_version=version
    ).fit(window, items)
    assert towers.user_tower is not None and towers.item_tower is not None
    data = encode_rows(towers.encoder, vectors, positive_rows(window, items, store))
    n = len(data["item_idx"])

    def item_inputs(idx: np.ndarray) -> list[np.ndarray]:
        _, _, _, item, dense = model_inputs(data, idx, vectors.vectors)
        return [item.numpy(), dense.numpy()]

    user = export_user_tower(
        towers.user_tower, towers.contract(), out / "user_tower",
        parity_batches(lambda idx: towers.user_inputs(data, idx), n, seed),
    )
    item = export_item_tower(
        towers.item_tower, towers.item_contract(), out / "item_tower",
        parity_batches(item_inputs, n, seed),
    )
    return {
        "user_tower": parity_info(user),
        "item_tower": parity_info(item),
        "losses": asdict(towers.history),
    }


def run_version(payload: dict[str, Any]) -> str:
    """A short, content-derived run id: time plus a hash of the settings."""
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{digest.hexdigest()[:8]}"


def train(
    vectors: str = "mixed",
    start: datetime | None = None,
    end: datetime | None = None,
    train_config: TrainConfig | None = None,
    out_root: Path | None = None,
    retrieval: bool = True,
    hybrid: bool = True,
    hybrid_quick: bool = False,
) -> Path:
    """Train one ranker (and the retrieval towers, and the hybrid) and write its directory;
    returns it. ``train_config``: the deep ranker's training, negatives and their sampling
    included (default: the shipped training, :class:`avrec.ranker.training.TrainConfig`)."""
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
    version = embedding_version(vector_info)
    genres = len(behaviour_features.genre_vocabulary(items))
    model = DeepRanker(item_vectors, get_store(), genres, config=train_config,
                       seed=train_config.seed)
    model.fit(window, items)
    manifest = {
        "kind": "ranker",
        "data_window": {
            "start": str(window["event_timestamp"].min()),
            "end": str(window["event_timestamp"].max()),
        },
        "feature_service": TRAINING_SERVICE,
        "item_vectors": vector_info,
        "embedding_version": version,
        "negatives_per_positive": train_config.negatives,
        "negative_sampling": train_config.sampling,
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
    with torch_threads(1):
        manifest["onnx"] = {"ranker": export_ranker_dir(model, window, items, version, out)}
        if retrieval:
            towers = train_retrieval(
                item_vectors, window, items, genres, version, train_config.seed, out
            )
            manifest["retrieval_losses"] = towers.pop("losses")
            manifest["onnx"] |= towers
    if hybrid:
        from avrec.ranker.hybrid_job import train_hybrid

        manifest["hybrid"] = train_hybrid(window, items, item_vectors, out / "hybrid",
                                          hybrid_quick, train_config.seed)
    manifest["seconds"] = round(time.perf_counter() - started, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    # written beside and renamed: a server following LATEST never reads half a name
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(out.name + "\n")
    pointer.replace(root / LATEST)
    return out


def register(subparsers: Subparsers) -> argparse.ArgumentParser:
    """``avrec train`` and its options."""
    parser = subparsers.add_parser(
        "train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vectors", choices=sorted(VECTOR_SOURCES), default="mixed")
    parser.add_argument("--start", type=parse_time, help="first label time (default: all)")
    parser.add_argument("--end", type=parse_time, help="label times before this (default: all)")
    # the defaults are TrainConfig's: the shipped training
    parser.add_argument("--negatives", type=int, default=TrainConfig.negatives,
                        help="sampled negatives per positive (default: %(default)s)")
    parser.add_argument("--sampling", choices=get_args(Sampling), default=TrainConfig.sampling)
    parser.add_argument("--loss", choices=get_args(Loss), default=TrainConfig.loss)
    parser.add_argument("--item-dropout", type=float, default=TrainConfig.item_dropout)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--out", type=Path, help="models root (default: DATA/models/ranker)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--no-retrieval", action="store_true", help="skip the two-tower retrieval pair"
    )
    parser.add_argument("--no-hybrid", action="store_true", help="skip the hybrid ranker")
    parser.add_argument("--hybrid-grids", choices=["full", "quick"], default="full",
                        help="hyperparameter grids of the hybrid's generators")
    parser.set_defaults(func=run)
    return parser


def requested_training(args: argparse.Namespace) -> TrainConfig:
    """The training ``avrec train``'s parsed options ask for (none given: ``TrainConfig()``)."""
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        loss=args.loss,
        negatives=args.negatives,
        sampling=args.sampling,
        item_dropout=args.item_dropout,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``avrec train`` with its parsed options."""
    cfg = requested_training(args)
    out = train(
        args.vectors, args.start, args.end, cfg, args.out, retrieval=not args.no_retrieval,
        hybrid=not args.no_hybrid, hybrid_quick=args.hybrid_grids == "quick",
    )
    manifest = json.loads((out / "manifest.json").read_text())
    losses = manifest["losses"]
    print(f"ranker written to {out}")
    print(
        f"  epochs run: {len(losses['train_loss'])}, kept epoch {losses['best_epoch'] + 1}, "
        f"validation {cfg.loss} loss {min(losses['val_loss']):.4f}, {manifest['seconds']} s"
    )
    for kind, info in manifest["onnx"].items():
        parts = [(kind, info)]
        if "one_user" in info:
            parts.append((f"{kind} (one-user serving graph)", info["one_user"]))
        for name, part in parts:
            print(f"  {name}: {part['path']} (ONNX vs torch max abs diff "
                  f"{part['max_abs_diff']:.2e} over {part['rows']} rows)")
    if "hybrid" in manifest:
        info = manifest["hybrid"]
        chosen = ", ".join(f"{g} {v['params']}" for g, v in info["generators"].items())
        print(f"  hybrid: {info['path']} (validation NDCG@10 {info['validation_ndcg@10']:.4f}, "
              f"{describe_exploration(info['exploration'])}, {info['seconds']} s)")
        print(f"    generators chosen on validation: {chosen}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``avrec train`` from ``argv`` (tests, ``python -m avrec.ranker.train_job``)."""
    return commands.main(register, argv)


if __name__ == "__main__":
    sys.exit(main())
