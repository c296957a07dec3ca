"""A small ``avrec evaluate`` report (the real layout of ``report.json``) for the web tests."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def tiny_png() -> bytes:
    """A valid 2x2 grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    raw = b"".join(b"\x00" + b"\x80\x80" for _ in range(2))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _model(ndcg: float, cold: float) -> dict:
    stat = lambda mean: {"mean": mean, "se": mean / 10}  # noqa: E731
    return {
        "test": {"ndcg@10": stat(ndcg), "ndcg@20": stat(ndcg * 1.1), "recall@10": stat(ndcg),
                 "recall@20": stat(ndcg * 1.2), "mrr": stat(ndcg * 2)},
        "coverage": {"coverage@10": 0.1, "coverage@20": 0.2},
        "slices": {"cold_items": {"recall@20": stat(cold)}, "short_history": {}},
        "seconds": {"total": 12.5}, "params": {}, "fallback_users": 0,
    }


MODELS = {"popularity": _model(0.0779, 0.0), "ease": _model(0.1277, 0.0),
          "hybrid-mixed": _model(0.1488, 0.0083), "hybrid-text": _model(0.1431, 0.0194)}


def write_report(directory: Path, figures: bool = True) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    report = {
        "seed": 0, "k": [10, 20], "positive_threshold": 4.0, "models": list(MODELS),
        "skipped_models": {},
        "splits": {"per-user": {
            "counts": {"users": 610, "items": 9742, "test_users": 592, "test_positives": 9355},
            "selection_metric": "ndcg@10", "best_baseline": "ease",
            "paired_tests": {"hybrid-mixed": {"ndcg@10": {"t_p": 0.0006, "wilcoxon_p": 0.001}},
                             "popularity": {"ndcg@10": {"t_p": 1e-6, "wilcoxon_p": 1e-6}}},
            "models": MODELS,
        }},
    }
    (directory / "report.json").write_text(json.dumps(report))
    if figures:
        (directory / "training.png").write_bytes(tiny_png())
    return directory
