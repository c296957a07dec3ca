"""Fusion metrics over several seeds: is learned fusion better than the weighted sum, and
the weighted sum better than one modality, beyond seed noise?

Reads the offline ``events``, ``items`` and ``item_encodings`` tables of ``AVREC_DATA_DIR``,
trains both fusions (and the single-modality ablations) per seed at one cutoff and prints
the mean and spread of each metric on the held-out pairs after the cutoff.

    python bench/fusion_report.py --cutoff 2016-07-01 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from dataclasses import replace

import numpy as np

from avrec import tables
from avrec.commands import parse_time
from avrec.encoders import fusion_evaluation, fusion_fit, fusion_training


def main(argv: list[str] | None = None) -> int:
    """Print per-method mean (min..max) of Recall@10/50 and genre lift over seeds."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cutoff", type=parse_time, default=parse_time("2016-07-01"))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    args = parser.parse_args(argv)
    events, items = tables.read_table("events"), tables.read_table("items")
    features = fusion_fit.ItemFeatures.from_encodings(tables.read_table("item_encodings"))
    seeds = [int(s) for s in args.seeds.split(",")]
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    chosen = []
    for seed in seeds:
        config = replace(fusion_fit.TrainConfig(), seed=seed)
        run = fusion_training.train_fusion(
            events, features, items, args.cutoff, config=config, ablations=True
        )
        chosen.append(run.a)
        for m in run.test:
            name = "a-sum (chosen a)" if m.method.startswith("a-sum (a=0.") else m.method
            for k in fusion_evaluation.KS:
                values[name][f"R@{k} all"].append(m.recall_all[k])
                values[name][f"R@{k} img"].append(m.recall_image[k])
            values[name]["genre lift"].append(m.genre_lift if m.genre_items else np.nan)
        print(f"seed {seed}: a={run.a:g}, pairs {run.pair_counts}, {run.seconds:.1f} s")
    columns = [f"R@{k} {s}" for s in ("all", "img") for k in fusion_evaluation.KS] + ["genre lift"]
    print(f"\ncutoff {args.cutoff.date()}, seeds {seeds}, chosen a {chosen}: mean (min..max)")
    print(f"{'method':<24}" + "".join(f"{c:>22}" for c in columns))
    for name, metrics in values.items():
        cells = []
        for c in columns:
            v = np.array(metrics[c])
            cells.append(
                f"{'-':>22}"
                if np.isnan(v).all()
                else f"{v.mean():>8.4f} ({v.min():.4f}..{v.max():.4f})"
            )
        print(f"{name:<24}" + "".join(f"{c:>22}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
