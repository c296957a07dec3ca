"""CUDA execution provider against the CPU one, for every ONNX model avrec serves or encodes with.

    python bench/gpu_check.py [--models data/models] [--repeats 20]

For each model (the text and image encoders under ``models/encoders/``, and the newest
``avrec train`` run's ranker, one-user ranker, towers and hybrid scorer) it builds one seeded
input batch from the model's own input signature, runs it on the CPU provider and, when
onnxruntime-gpu sees a CUDA device, on the CUDA provider, and prints a table: max abs
difference and min cosine between the two outputs (parity), and p50 latency / throughput on
each provider. Without a CUDA device it is a dry run: the CPU column is measured, the CUDA
column says why it is empty, and the exit status is 0. With one, the exit status is 1 when any
model's outputs differ beyond ``--min-cosine``.

Batches: encoders 64 texts x 64 tokens and 32 images; the ranker scores one user x 1,000
candidates (``Rank 1x1000``); the hybrid scorer one pool of 1,000 candidates. Imports neither
torch nor transformers (this checkout's ``avrec.onnx_runtime`` and ``avrec.ranker.export``, which
need onnxruntime, numpy, polars and duckdb), so a bare GPU machine needs only those.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere
from avrec.onnx_runtime import cuda_device_count, cuda_usable
from avrec.ranker.export import latest_model_dir

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
DIMS = {"batch": 1000, "users": 1, "pool": 1000, "sequence": 64}  # symbolic dims
ENCODER_BATCH = {"sentence_embedding": 64, "image_embedding": 32}


def models_under(root: Path) -> list[Path]:
    """The encoders' ONNX files and those of the newest training run (``LATEST``)."""
    found = sorted((root / "encoders").glob("*/model.onnx"))
    with contextlib.suppress(FileNotFoundError):
        found += sorted(latest_model_dir(root / "ranker").glob("*/*.onnx"))
    return found


def feeds_for(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """One seeded batch that fits the model's inputs (token ids for int64 inputs, ones for
    masks, normal values otherwise)."""
    rng = np.random.default_rng(seed)
    outputs = [o.name for o in session.get_outputs()]
    batch = next((ENCODER_BATCH[o] for o in outputs if o in ENCODER_BATCH), DIMS["batch"])
    feeds = {}
    for spec in session.get_inputs():
        shape = [d if isinstance(d, int) else (batch if d == "batch" else DIMS.get(d, 1))
                 for d in spec.shape]
        if spec.type == "tensor(int64)":
            if "mask" in spec.name:
                value = np.ones(shape, np.int64)
            elif "type" in spec.name:
                value = np.zeros(shape, np.int64)
            else:
                value = rng.integers(1000, 20000, size=shape, dtype=np.int64)
        elif "mask" in spec.name:
            value = np.ones(shape, np.float32)
        else:
            value = rng.normal(size=shape).astype(np.float32)
        feeds[spec.name] = value
    return feeds


def timed(session: ort.InferenceSession, feeds: dict[str, np.ndarray], repeats: int
          ) -> tuple[np.ndarray, float]:
    """(first output, p50 seconds of a run) after two warm-up runs."""
    out = session.run(None, feeds)[0]
    session.run(None, feeds)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        seconds.append(time.perf_counter() - start)
    return np.asarray(out, np.float64), float(np.median(seconds))


def parity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs difference, min row cosine) of two outputs."""
    rows_a, rows_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if rows_a.shape[1] == 1:  # one score per row: compare the whole vector
        rows_a, rows_b = rows_a.T, rows_b.T
    norms = np.linalg.norm(rows_a, axis=1) * np.linalg.norm(rows_b, axis=1)
    cosine = np.sum(rows_a * rows_b, axis=1) / np.where(norms > 0, norms, 1.0)
    return float(np.abs(a - b).max()), float(cosine.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=Path("data/models"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--min-cosine", type=float, default=0.999)
    args = parser.parse_args(argv)
    paths = models_under(args.models)
    if not paths:
        print(f"no ONNX models under {args.models} (run `avrec embed` and `avrec train`)")
        return 2
    available = ort.get_available_providers()
    cuda_note = ("" if cuda_usable() else "onnxruntime has no CUDA provider" if CUDA not in
                 available else f"the driver reports {cuda_device_count()} CUDA devices")
    print(f"onnxruntime {ort.__version__}, providers {available}"
          + (f"; dry run: {cuda_note}" if cuda_note else ""))
    print(f"{'model':<34}{'batch':>7}{'cpu ms':>9}{'cuda ms':>9}{'speed-up':>9}"
          f"{'max |diff|':>12}{'min cos':>9}  rows/s cpu / cuda")
    failed = False
    for path in paths:
        cpu = ort.InferenceSession(str(path), providers=[CPU])
        feeds = feeds_for(cpu)
        rows = next(iter(feeds.values())).shape[0]
        if "features" in feeds:  # the hybrid scorer: one pool of candidates
            rows = feeds["features"].shape[1]
        elif "item_vector" in feeds:
            rows = feeds["item_vector"].shape[0]
        cpu_out, cpu_s = timed(cpu, feeds, args.repeats)
        name = f"{path.parent.name[:22]}/{path.name}"[:33]
        line = f"{name:<34}{rows:>7}{cpu_s * 1e3:>9.2f}"
        if cuda_note:
            print(f"{line}{'-':>9}{'-':>9}{'-':>12}{'-':>9}  {rows / cpu_s:,.0f} / -")
            continue
        cuda = ort.InferenceSession(str(path), providers=[CUDA, CPU])
        if CUDA not in cuda.get_providers():
            print(f"{line}  CUDA provider did not load (no device?)")
            continue
        cuda_out, cuda_s = timed(cuda, feeds, args.repeats)
        diff, cosine = parity(cpu_out, cuda_out)
        failed |= cosine < args.min_cosine
        print(f"{line}{cuda_s * 1e3:>9.2f}{cpu_s / cuda_s:>9.1f}{diff:>12.2e}{cosine:>9.5f}"
              f"  {rows / cpu_s:,.0f} / {rows / cuda_s:,.0f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
