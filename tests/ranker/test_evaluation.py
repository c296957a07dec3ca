"""The harness end to end on the real MovieLens data (small grids), and its wiring checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ranker import baselines, evaluation
from ranker.recommender import InteractionMatrix, Recommender
from ranker.splits import Split, per_user_split

RANKING = ["recall@10", "recall@20", "ndcg@10", "ndcg@20", "mrr"]


class Oracle(Recommender):
    """Knows the answers: scores 1 on the given (user, item) pairs, 0 elsewhere."""

    name = "oracle"

    def __init__(self, answers: pl.DataFrame) -> None:
        super().__init__()
        self.answers = answers
        self.known: InteractionMatrix | None = None

    def _fit(self, interactions: pl.DataFrame, items: pl.DataFrame) -> None:
        self.known = InteractionMatrix.build(self.answers, self.item_ids)

    def _score(self, user_ids: np.ndarray, as_of: np.ndarray | None) -> np.ndarray:
        assert self.known is not None
        rows = self.known.rows(user_ids)
        out = np.zeros((user_ids.size, self.item_ids.size))
        hit = rows >= 0
        out[hit] = self.known.matrix[rows[hit]].toarray()
        return out


@pytest.fixture(scope="module")
def cli_report(ml_offline: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("evaluation")
    argv = ["--out", str(out), "--offline", str(ml_offline), "--quick",
            "--models", "random,popularity,itemknn,bpr,als", "--split", "both"]
    assert evaluation.main(argv) == 0
    return out, json.loads((out / "report.json").read_text())


def test_cli_writes_json_markdown_and_chart(cli_report: tuple[Path, dict]) -> None:
    out, report = cli_report
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## per-user split" in md and "## global split" in md
    for model in ("random", "popularity", "itemknn", "bpr", "als"):
        assert f"| {model} |" in md
    assert set(report["splits"]) == {"per-user", "global"}


def test_per_user_report_counts_dates_and_sanity(cli_report: tuple[Path, dict]) -> None:
    split = cli_report[1]["splits"]["per-user"]
    assert split["counts"]["test_users"] == 592
    assert split["counts"]["items"] == 9742
    assert split["dates"]["test_start"]["min"] >= split["dates"]["first_rating"]
    models = split["models"]
    for result in models.values():
        for name in RANKING:
            stat = result["test"][name]
            assert 0.0 <= stat["mean"] <= 1.0 and stat["se"] >= 0 and stat["n"] == 592
        assert 0.0 <= result["binary"]["auc"] <= 1.0
    ndcg = {name: result["test"]["ndcg@10"]["mean"] for name, result in models.items()}
    assert ndcg["random"] < 0.01 < ndcg["popularity"]
    assert ndcg["itemknn"] > ndcg["popularity"] and ndcg["als"] > ndcg["popularity"]
    best = split["best_baseline"]
    assert best != "random" and best not in split["paired_tests"]
    assert split["paired_tests"]["random"]["ndcg@10"]["wilcoxon_p"] < 1e-6
    cold = split["slices"]["cold_items"]
    assert 0.001 < cold["random_expected_recall@20"] < 0.004 and cold["users"] > 0


def test_global_report_cuts_and_users(cli_report: tuple[Path, dict]) -> None:
    split = cli_report[1]["splits"]["global"]
    assert split["dates"]["validation_start"]["min"] < split["dates"]["test_start"]["min"]
    assert 0 < split["counts"]["test_users"] < 610
    for result in split["models"].values():
        assert result["test"]["ndcg@10"]["n"] == split["counts"]["test_users"]


def test_an_oracle_scores_perfectly_so_relevance_and_exclusion_line_up(
    ml_split: Split, ml_items: pl.DataFrame
) -> None:
    test = ml_split.stage("test")
    report = evaluation.evaluate([Oracle(test.positives)], ml_split, ml_items, k=(10, 20))
    result = report["models"]["oracle"]["test"]
    assert result["ndcg@10"]["mean"] == pytest.approx(1.0)
    assert result["ndcg@20"]["mean"] == pytest.approx(1.0)
    assert result["mrr"]["mean"] == pytest.approx(1.0)
    n_relevant = test.positives.group_by("user_id").len()["len"].to_numpy()
    assert result["recall@20"]["mean"] == pytest.approx(np.minimum(1, 20 / n_relevant).mean())


def test_evaluation_is_deterministic(ml_split: Split, ml_items: pl.DataFrame) -> None:
    specs = evaluation.model_specs(["popularity", "bpr"], quick=True)

    def run() -> dict:
        report = evaluation.evaluate(specs, ml_split, ml_items, seed=5)
        for result in report["models"].values():
            result.pop("seconds")
        report.pop("seconds")
        return report

    assert run() == run()


def test_content_models_from_an_encodings_file(
    ml_offline: Path, ml_items: pl.DataFrame, tmp_path: Path
) -> None:
    vectors = baselines.random_item_vectors(ml_items["item_id"].to_numpy(), dim=8, seed=2)
    encodings = tmp_path / "item_encodings.parquet"
    vectors.rename({"vector": "text_embedding"}).with_columns(
        pl.lit(None, dtype=pl.List(pl.Float32)).alias("image_embedding")
    ).write_parquet(encodings)
    argv = ["--out", str(tmp_path / "out"), "--offline", str(ml_offline), "--quick",
            "--models", "popularity,text-knn", "--split", "per-user",
            "--encodings", str(encodings)]
    assert evaluation.main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    text = report["splits"]["per-user"]["models"]["text-knn"]
    # random vectors carry no signal: far below popularity, near random
    assert text["test"]["ndcg@10"]["mean"] < 0.03
    assert "cold_items" in text["slices"]
    with pytest.raises(FileNotFoundError):
        evaluation.model_specs(["image-knn"], encodings=tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="unknown model"):
        evaluation.model_specs(["nope"])


def test_a_split_without_validation_cannot_be_tuned(
    ml_events: pl.DataFrame, ml_items: pl.DataFrame
) -> None:
    split = per_user_split(ml_events, validation_fraction=0.0)
    with pytest.raises(ValueError, match="nothing to tune"):
        evaluation.evaluate(evaluation.model_specs(["popularity"]), split, ml_items)
