"""The hybrid's pool scorer exported at ONNX opset 18 and at avrec's opset, timed alike.

    python bench/onnx_opset.py [--bags 2 5] [--pool 200] [--features 26] [--runs 3000]

At opset 18 torch's exporter writes each GELU as five operators (Div, Erf, Add, Mul, Mul),
which onnxruntime does not fuse back; from opset 20 ``Gelu`` is one operator. This builds a
:class:`~avrec.ranker.listwise_scorer.ScorerBag` of ``--bags`` seeded scorers (random weights,
the served shapes: hidden 64), exports it at both opsets with
:func:`~avrec.ranker.listwise_scorer.export_scorer`'s settings, and times one user's pool
(``[1, pool, features]``) through :class:`~avrec.onnx_runtime.OnnxModel`, alternately, after a
warm-up. The table gives the graph's node count, the p50 of a run in microseconds, the ratio
to opset 18 and the largest difference from torch's output.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from avrec.onnx_runtime import OnnxModel
from avrec.ranker.listwise_scorer import ListwiseScorer, ScorerBag, export_scorer

BASELINE_OPSET = 18


def bag_of(scorers: int, features: int, seed: int) -> ScorerBag:
    """``scorers`` scorers with random standardisation and weights (seeded)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    bag = ScorerBag([ListwiseScorer(rng.normal(size=features), rng.uniform(0.5, 2.0, features))
                     for _ in range(scorers)])
    with torch.no_grad():
        for parameter in bag.parameters():
            parameter.normal_(0.0, 0.3)
    return bag.eval()


def export_at(bag: ScorerBag, features: int, opset: int, path: Path) -> OnnxModel:
    with mock.patch("avrec.names.OPSET", opset):
        export_scorer(bag, features, "bench", path)
    return OnnxModel(path)


def p50_us(model: OnnxModel, batch: np.ndarray, runs: int) -> float:
    feeds = {"features": batch}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.session.run(["scores"], feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--pool", type=int, default=200)
    parser.add_argument("--features", type=int, default=26)
    parser.add_argument("--runs", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two")
    args = parser.parse_args()
    import onnx
    import onnxruntime

    from avrec.names import OPSET

    batch = np.random.default_rng(0).random((1, args.pool, args.features), dtype=np.float32)
    print(f"pool scorer, one user x {args.pool} candidates x {args.features} features; "
          f"onnxruntime {onnxruntime.__version__}")
    print(f"| scorers | opset | nodes | p50 us | x opset {BASELINE_OPSET} | max diff to torch |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for scorers in args.bags:
            bag = bag_of(scorers, args.features, seed=scorers)
            with torch.no_grad():
                reference = bag(torch.from_numpy(batch)).numpy()
            models = {}
            for opset in (BASELINE_OPSET, OPSET):
                path = Path(tmp) / f"bag{scorers}-opset{opset}.onnx"
                models[opset] = (export_at(bag, args.features, opset, path),
                                 len(onnx.load(str(path)).graph.node))
            times: dict[int, list[float]] = {opset: [] for opset in models}
            for _ in range(args.rounds):
                for opset, (model, _) in models.items():
                    p50_us(model, batch, args.runs // 10)  # warm-up
                    times[opset].append(p50_us(model, batch, args.runs))
            base = float(np.median(times[BASELINE_OPSET]))
            for opset, (model, nodes) in models.items():
                p50 = float(np.median(times[opset]))
                out = model.session.run(["scores"], {"features": batch})[0]
                print(f"| {scorers} | {opset} | {nodes} | {p50:.1f} | {p50 / base:.2f} | "
                      f"{np.abs(out - reference).max():.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
