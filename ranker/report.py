"""Render an evaluation report: ``report.json``, ``report.md`` (tables) and ``report.png``."""

from __future__ import annotations

import json
import math
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    """Plain JSON types: numpy scalars unwrapped, NaN/inf as null, dates as ISO text."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_se(stat: dict[str, float] | None) -> str:
    if not stat:
        return "n/a"
    return f"{_num(stat['mean'])} ± {_num(stat['se'])}"


def _p(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.2g}" if value >= 1e-4 else "<1e-4"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


def _ranking_columns(ks: list[int]) -> list[str]:
    return [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr"]


def split_markdown(name: str, split: dict[str, Any], ks: list[int]) -> str:
    """One split: dates, counts, the test table, binary metrics, slices, tuned parameters."""
    counts, dates, kmax = split["counts"], split["dates"], max(ks)
    select = split["selection_metric"]
    best = split["best_baseline"]
    lines = [f"## {name} split", ""]
    lines.append(f"Ratings {dates['first_rating']} .. {dates['last_rating']}.")
    for column in ("validation_start", "test_start"):
        if column in dates:
            d = dates[column]
            lines.append(
                f"{column} (test users): min {d['min']}, median {d['median']}, max {d['max']}."
            )
    lines.append(
        f"{counts['users']} users, {counts['items']} items; "
        f"ratings train {counts['train_ratings']}, "
        f"validation {counts['validation_ratings']}, test {counts['test_ratings']}; "
        f"{counts['validation_users']} validation users, {counts['test_users']} test users, "
        f"{counts['test_positives']} test positives."
    )
    lines += ["", f"Test, mean ± standard error over users (tuned on validation {select}; "
              f"p-values: paired t / Wilcoxon on {select} vs the best baseline, **{best}**).", ""]
    columns = _ranking_columns(ks)
    header = ["model", *columns, *[f"cov@{k}" for k in ks], f"p({select}) t / W"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, result in split["models"].items():
        test = result["test"]
        paired = split["paired_tests"].get(model, {}).get(select)
        p = f"{_p(paired['t_p'])} / {_p(paired['wilcoxon_p'])}" if paired else "(best)"
        row = [model, *[_mean_se(test.get(c)) for c in columns],
               *[_num(result["coverage"][f"coverage@{k}"], 3) for k in ks], p]
        lines.append("| " + " | ".join(row) + " |")
    cold, short = split["slices"]["cold_items"], split["slices"]["short_history"]
    lines += ["", f"Binary metrics on labelled test pairs (rating >= threshold), F1 threshold "
              f"chosen on validation; slices: cold items = test positives on items with no fit "
              f"interactions ({cold['users']} users; random's expected recall@{kmax} "
              f"{_num(cold[f'random_expected_recall@{kmax}'])}), short history = users with at "
              f"most {short['max_fit_ratings']} fit ratings ({short['users']} users).", ""]
    header = ["model", "AUC", "accuracy", "precision", "recall", "F1", "pairs",
              f"cold recall@{kmax}", f"short {select}", "fallback users", "params", "seconds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, result in split["models"].items():
        b, sl = result["binary"], result["slices"]
        row = [model, _num(b["auc"]), _num(b["accuracy"]), _num(b["precision"]),
               _num(b["recall"]), _num(b["f1"]), str(b["pairs"]),
               _mean_se(sl["cold_items"].get(f"recall@{kmax}")),
               _mean_se(sl["short_history"].get(select)), str(result["fallback_users"]),
               _params(result["params"]), f"{result['seconds']['total']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    ks = report["k"]
    lines = ["# Offline evaluation", "",
             f"Full-catalogue ranking (no sampled negatives), previously seen items excluded; "
             f"positive = rating >= {report['positive_threshold']}; seed {report['seed']}.", ""]
    for model, why in report.get("skipped_models", {}).items():
        lines.append(f"Skipped {model}: {why}.")
    for name, split in report["splits"].items():
        lines += ["", split_markdown(name, split, ks)]
        lines += exploration_markdown(split, ks)
    return "\n".join(lines) + "\n"


def exploration_markdown(split: dict[str, Any], ks: list[int]) -> list[str]:
    """The cold-item trade-off of models with exploration slots (chosen on validation)."""
    lines = []
    cold = f"cold_recall@{max(ks)}"
    metrics = [f"ndcg@{k}" for k in ks] + [cold]
    for model, run in split["models"].items():
        exploration = run.get("exploration")
        if not exploration:
            continue
        lines += ["", f"Exploration of {model} (new items at the end of the top {max(ks)} "
                  f"for the share of users with the longest histories; chosen on validation: "
                  f"{describe_exploration(exploration)}: of the policies losing at most "
                  f"{exploration['tolerance']:.0%} of validation ndcg@{max(ks)}, the one "
                  f"showing the most new items (slots x share), ties to the better "
                  f"validation {cold}):", "",
                  "| slots | share of users | " + " | ".join(f"validation {m}" for m in metrics)
                  + " | " + " | ".join(f"test {m}" for m in metrics) + " |",
                  "|---" * (2 + 2 * len(metrics)) + "|"]
        for val, test in zip(exploration["validation"], exploration["test"], strict=True):
            lines.append(f"| {val['slots']} | {_share(val)} | "
                         + " | ".join(_num(val[m]) for m in metrics)
                         + " | " + " | ".join(_num(test[m]) for m in metrics) + " |")
    return lines


def _share(point: dict[str, Any]) -> str:
    return f"{point.get('share', 1.0):.0%}"


def describe_exploration(exploration: dict[str, Any]) -> str:
    """The chosen policy in words, e.g. ``3 slots for users with >= 120 events (30%)``.

    >>> describe_exploration({"chosen_slots": 3, "chosen_share": 0.3, "min_history": 120})
    '3 exploration slots for users with >= 120 events (30% of users)'
    >>> describe_exploration({"chosen_slots": 2})
    '2 exploration slots for every user'
    """
    slots = exploration["chosen_slots"]
    if exploration.get("chosen_share", 1.0) >= 1.0 or not exploration.get("min_history"):
        return f"{slots} exploration slots for every user"
    return (f"{slots} exploration slots for users with >= {exploration['min_history']} events "
            f"({exploration['chosen_share']:.0%} of users)")


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars of the test ranking metrics per model (error bars: standard errors)."""
    plt = _pyplot()
    ks = report["k"]
    columns = _ranking_columns(ks)
    splits = report["splits"]
    fig, axes = plt.subplots(1, max(len(splits), 1), figsize=(7 * max(len(splits), 1), 4.5),
                             squeeze=False)
    for ax, (name, split) in zip(axes[0], splits.items(), strict=False):
        models = list(split["models"])
        width = 0.8 / len(models)
        x = np.arange(len(columns))
        for i, model in enumerate(models):
            test = split["models"][model]["test"]
            means = [test[c]["mean"] or 0.0 for c in columns]
            errors = [test[c]["se"] or 0.0 for c in columns]
            ax.bar(x + i * width, means, width, yerr=errors, capsize=2, label=model)
        ax.set_xticks(x + 0.4 - width / 2, columns)
        users = split["counts"]["test_users"]
        ax.set_title(f"{name} split ({users} test users)")
        ax.set_ylabel("mean over test users")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tradeoff_chart(report: dict[str, Any], path: Path) -> Path | None:
    """NDCG@k against cold-item Recall@max(k) per number of exploration slots (test and
    validation curves; the chosen operating point circled), one panel per split."""
    plt = _pyplot()
    ks = report["k"]
    cold, guard = f"cold_recall@{max(ks)}", f"ndcg@{max(ks)}"
    panels = [(name, model, run["exploration"]) for name, split in report["splits"].items()
              for model, run in split["models"].items() if run.get("exploration")]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (split, model, exploration) in zip(axes[0], panels, strict=True):
        for stage, style in (("test", "o-"), ("validation", "s--")):
            curve = exploration.get(stage, [])
            none = [p for p in curve if p["slots"] == 0]
            for share in dict.fromkeys(p.get("share", 1.0) for p in curve):
                line = none + [p for p in curve if p["slots"] and p.get("share", 1.0) == share]
                for metric in (f"ndcg@{min(ks)}", guard):
                    ax.plot([p[cold] for p in line], [p[metric] for p in line], style,
                            label=f"{stage} {metric}, {share:.0%} of users", markersize=4)
            for p in curve:
                if stage == "test":
                    ax.annotate(f"{p['slots']}@{_share(p)}", (p[cold], p[guard]), fontsize=6)
        chosen = [p for p in exploration.get("test", []) if p["slots"] ==
                  exploration["chosen_slots"] and p.get("share", 1.0) ==
                  exploration.get("chosen_share", 1.0)]
        for p in chosen:
            ax.plot([p[cold]], [p[guard]], "o", markersize=12, fillstyle="none", color="k",
                    label=f"shipped: {p['slots']} slots for {_share(p)} of users")
        ax.set_xlabel(f"cold-item recall@{max(ks)}")
        ax.set_ylabel("NDCG")
        ax.set_title(f"{model}, {split} split: exploration slots")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def training_chart(report: dict[str, Any], path: Path) -> Path | None:
    """Per-epoch training curves of the learned models (test-stage fit)."""
    plt = _pyplot()
    panels = [(name, model, run["training"]) for name, split in report["splits"].items()
              for model, run in split["models"].items() if run.get("training")]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (split, model, curves) in zip(axes[0], panels, strict=True):
        for name, values in curves.items():
            ax.plot(range(1, len(values) + 1), values, label=name)
        ax.set_title(f"{model} ({split})", fontsize="small")
        ax.set_xlabel("epoch")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(report: dict[str, Any], out: Path) -> Path:
    """Write ``report.json`` under ``out`` (also for partial reports, after each model)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jsonable(report), indent=2, allow_nan=False) + "\n")
    tmp.replace(json_path)
    return json_path


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and ``report.png`` under ``out``."""
    clean = jsonable(report)
    json_path = write_json(clean, out)
    md_path = out / "report.md"
    md_path.write_text(markdown(clean))
    extra = [tradeoff_chart(clean, out / "tradeoff.png"),
             training_chart(clean, out / "training.png")]
    return [json_path, md_path, chart(clean, out / "report.png"), *[p for p in extra if p]]
