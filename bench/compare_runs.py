"""Paired comparison of models across evaluation reports (seeds), from ``report.json`` files.

    python bench/compare_runs.py data/reports/issue9-per-user data/reports/issue9-seed1 ...
        [--against ease] [--split per-user]

Prints, per model, test NDCG@10 (mean ± SE), the ratio to the reference model and the paired
t-test p-value on per-user NDCG@10 (same users, same split) for each report, then the mean
over reports. The reference defaults to the strongest baseline on test, so the bar is the
hardest one, not the one validation picked.

``--rechoose`` also applies today's exploration rule
(:func:`avrec.ranker.exploration.choose_exploration`) to each report's stored validation curve and
prints the test point of the policy it picks: what today's rule would have shipped from a
run made under an earlier rule (per-user values are stored for the shipped point only, so
no p-value).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats


def load(path: Path, split: str) -> dict:
    report = json.loads((path / "report.json").read_text())
    return report["splits"][split]["models"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+")
    parser.add_argument("--against", default=None, help="reference model (default: best "
                        "baseline on test in the first report)")
    parser.add_argument("--split", default="per-user")
    parser.add_argument("--rechoose", action="store_true",
                        help="re-apply today's exploration rule to the stored curves")
    args = parser.parse_args()
    runs = [load(p, args.split) for p in args.reports]
    first = runs[0]
    baseline_names = [n for n, m in first.items() if not n.startswith(("hybrid", "sequential",
                                                                       "deep", "two-tower"))]
    against = args.against or max(baseline_names, key=lambda n: first[n]["test"]["ndcg@10"]["mean"])
    print(f"reference: {against}; {len(runs)} report(s): {[str(p) for p in args.reports]}")
    print(f"{'model':<18} {'NDCG@10 per report':<40} {'mean':>7} {'x ref':>6} {'p (each)':<24} "
          f"{'cold R@20':>9} {'slots':>5}")
    for name in first:
        values, ratios, pvalues = [], [], []
        for run in runs:
            if name not in run or against not in run:
                continue
            model, ref = run[name], run[against]
            values.append(model["test"]["ndcg@10"]["mean"])
            ratios.append(values[-1] / ref["test"]["ndcg@10"]["mean"])
            a = np.asarray(model["per_user_ndcg"]["ndcg@10"])
            b = np.asarray(ref["per_user_ndcg"]["ndcg@10"])
            pvalues.append(float(stats.ttest_rel(a, b).pvalue) if name != against else 1.0)
        cold = first[name]["slices"]["cold_items"]["recall@20"]["mean"]
        explored = first[name].get("exploration", {})
        slots = explored.get("chosen_slots", "-")
        if explored.get("chosen_share", 1.0) < 1.0:
            slots = f"{slots}@{explored['chosen_share']:.0%}"
        shown = ", ".join(f"{v:.4f}" for v in values)
        ps = ", ".join(f"{p:.2g}" for p in pvalues)
        print(f"{name:<18} {shown:<40} {np.mean(values):>7.4f} {np.mean(ratios):>6.3f} "
              f"{ps:<24} {cold:>9.4f} {slots!s:>5}")
    if args.rechoose:
        rechoose(args.reports, runs)


def rechoose(paths: list[Path], runs: list[dict]) -> None:
    """Each report's exploring models at the policy today's rule picks on validation."""
    from avrec.ranker.exploration import choose_exploration

    print("\ntoday's exploration rule on the stored validation curves (test values):")
    for path, run in zip(paths, runs, strict=True):
        for name, model in run.items():
            explored = model.get("exploration", {})
            if not explored.get("validation") or not explored.get("test"):
                continue
            ks = [int(k.split("@")[1]) for k in explored["test"][0] if k.startswith("ndcg@")]
            pick = choose_exploration(explored["validation"], ks, explored["tolerance"])
            test = next(p for p in explored["test"]
                        if (p["slots"], p["share"]) == (pick["slots"], pick["share"]))
            cold = next(k for k in test if k.startswith("cold_recall@"))
            print(f"  {path}: {name} {pick['slots']} slots for {pick['share']:.0%}: " +
                  ", ".join(f"{k} {test[k]:.4f}" for k in (*(f'ndcg@{k}' for k in ks), cold)))


if __name__ == "__main__":
    main()
