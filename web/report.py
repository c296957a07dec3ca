"""The latest ``avrec evaluate`` report (``report.json``) for the evaluation page: its runs,
a metrics table per split, and charts (test metrics with standard errors, the cold-item slice,
the item-vector ablation); the report's own PNG figures are served by name from a fixed list."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avrec.errors import InputError
from avrec.web.charts import Bar, bar_chart

FIGURES = ("report.png", "tradeoff.png", "training.png")
ABLATION_SUFFIXES = ("-mixed", "-asum", "-text", "-image", "-id")


class ReportError(InputError):
    """A report.json that cannot be read as an evaluation report."""


@dataclass(frozen=True)
class Run:
    name: str
    directory: Path

    @property
    def modified(self) -> float:
        return (self.directory / "report.json").stat().st_mtime


def find_runs(roots: list[Path]) -> list[Run]:
    """Every directory holding a ``report.json`` directly under a root (or the root itself),
    newest first."""
    runs: dict[Path, Run] = {}
    for root in roots:
        candidates = [root, *sorted(p for p in root.iterdir() if p.is_dir())] \
            if root.is_dir() else []
        for directory in candidates:
            if (directory / "report.json").is_file():
                name = directory.name if directory != root else root.name
                runs.setdefault(directory.resolve(), Run(name, directory))
    return sorted(runs.values(), key=lambda r: r.modified, reverse=True)


def _stat(stat: Any) -> tuple[float | None, float | None]:
    if not isinstance(stat, dict):
        return None, None
    mean, se = stat.get("mean"), stat.get("se")
    ok = isinstance(mean, int | float) and math.isfinite(mean)
    return (float(mean) if ok else None), (float(se) if isinstance(se, int | float) else None)


def _text(stat: Any) -> str:
    mean, se = _stat(stat)
    if mean is None:
        return "n/a"
    return f"{mean:.4f} ± {se:.4f}" if se is not None else f"{mean:.4f}"


@dataclass
class SplitView:
    name: str
    columns: list[str]
    rows: list[list[str]]
    best: str | None
    partial: bool
    charts: list[str] = field(default_factory=list)
    facts: str = ""


def split_view(name: str, split: dict[str, Any], ks: list[int]) -> SplitView:
    models = split.get("models", {})
    kmin, kmax = min(ks), max(ks)
    metrics = [f"ndcg@{k}" for k in ks] + [f"recall@{k}" for k in ks] + ["mrr"]
    cold = f"recall@{kmax}"
    best = split.get("best_baseline")
    select = split.get("selection_metric", f"ndcg@{kmin}")
    paired = split.get("paired_tests", {})
    columns = ["model", *metrics, f"cold {cold}", f"p vs {best or 'best'} ({select})",
               "seconds"]
    rows = []
    for model, result in models.items():
        test = result.get("test", {})
        cold_stat = result.get("slices", {}).get("cold_items", {}).get(cold)
        p = paired.get(model, {}).get(select, {}).get("t_p") if model != best else None
        p_text = "(best)" if model == best else ("n/a" if p is None else
                                                 (f"{p:.2g}" if p >= 1e-4 else "<1e-4"))
        seconds = result.get("seconds", {}).get("total")
        rows.append([model, *[_text(test.get(m)) for m in metrics], _text(cold_stat), p_text,
                     f"{seconds:.0f}" if isinstance(seconds, int | float) else "n/a"])
    view = SplitView(name, columns, rows, best, bool(split.get("partial")))
    counts = split.get("counts", {})
    if counts:
        view.facts = (f"{counts.get('test_users', '?')} test users, "
                      f"{counts.get('test_positives', '?')} test positives, "
                      f"{counts.get('items', '?')} items")

    def bars(metric_of) -> list[Bar]:
        out = []
        for model, result in models.items():
            mean, se = _stat(metric_of(result))
            if mean is not None:
                out.append(Bar(model, mean, se, highlight=model == best))
        return out

    for metric in (f"ndcg@{kmin}", f"recall@{kmax}"):
        found = bars(lambda r, m=metric: r.get("test", {}).get(m))
        if found:
            view.charts.append(bar_chart(f"{name}: test {metric} (± 1 s.e.)", found))
    cold_bars = bars(lambda r: r.get("slices", {}).get("cold_items", {}).get(cold))
    if cold_bars:
        view.charts.append(bar_chart(f"{name}: cold-item {cold} (items with no fit "
                                     "interaction)", cold_bars))
    ablation = [b for b in bars(lambda r: r.get("test", {}).get(f"ndcg@{kmin}"))
                if b.label.endswith(ABLATION_SUFFIXES)]
    if len(ablation) > 1:
        view.charts.append(bar_chart(f"{name}: item-vector ablation, test ndcg@{kmin}",
                                     ablation))
    return view


@dataclass
class ReportView:
    run: Run
    splits: list[SplitView]
    figures: list[str]
    skipped: dict[str, str]
    seed: Any


def load(run: Run) -> ReportView:
    """The report of ``run`` as tables and charts (ReportError when it is not a report)."""
    try:
        report = json.loads((run.directory / "report.json").read_text())
        ks = sorted(int(k) for k in report.get("k") or [10, 20])
        splits = [split_view(name, split, ks) for name, split in report["splits"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReportError(f"{run.directory / 'report.json'} is not a readable evaluation "
                         f"report ({type(exc).__name__})") from None
    figures = [name for name in FIGURES if (run.directory / name).is_file()]
    return ReportView(run, splits, figures, dict(report.get("skipped_models") or {}),
                      report.get("seed"))
