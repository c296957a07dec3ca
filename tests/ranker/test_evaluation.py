"""The harness end to end on the real MovieLens data (small grids), and its wiring checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from avrec.ranker import baselines, evaluate_job, evaluation, exploration, model_registry
from avrec.ranker.exploration import EXPLORE_SHARES, EXPLORE_SLOTS
from avrec.ranker.recommender import InteractionMatrix, Recommender
from avrec.ranker.splits import Split, per_user_split

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
    assert evaluate_job.main(argv) == 0
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
    specs = model_registry.model_specs(["popularity", "bpr"], quick=True)

    def run() -> dict:
        report = evaluation.evaluate(specs, ml_split, ml_items, seed=5)
        for result in report["models"].values():
            result.pop("seconds")
        report.pop("seconds")
        return report

    assert run() == run()


def write_encodings(vectors: pl.DataFrame, path: Path) -> None:
    """An item_encodings table: ``vectors`` as text, seeded image vectors on every other
    item, the encoder names the fusion reads."""
    images = baselines.random_item_vectors(vectors["item_id"].to_numpy(), dim=6, seed=2)
    with_image = pl.Series([i % 2 == 0 for i in range(vectors.height)])
    vectors.rename({"vector": "text_embedding"}).with_columns(
        pl.col("text_embedding").cast(pl.List(pl.Float32)),
        pl.when(with_image).then(images["vector"].cast(pl.List(pl.Float32)))
        .alias("image_embedding"),
        with_image.alias("has_image"),
        pl.lit("test-text").alias("text_encoder"), pl.lit("test-image").alias("image_encoder"),
    ).write_parquet(path)


def test_content_models_from_an_encodings_file(
    ml_offline: Path, ml_items: pl.DataFrame, tmp_path: Path
) -> None:
    vectors = baselines.random_item_vectors(ml_items["item_id"].to_numpy(), dim=8, seed=2)
    encodings = tmp_path / "item_encodings.parquet"
    write_encodings(vectors, encodings)
    argv = ["--out", str(tmp_path / "out"), "--offline", str(ml_offline), "--quick",
            "--models", "popularity,text-knn", "--split", "per-user",
            "--encodings", str(encodings)]
    assert evaluate_job.main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    text = report["splits"]["per-user"]["models"]["text-knn"]
    # random vectors carry no signal: far below popularity, near random
    assert text["test"]["ndcg@10"]["mean"] < 0.03
    assert "cold_items" in text["slices"]
    with pytest.raises(FileNotFoundError):
        model_registry.model_specs(["image-knn"], encodings=tmp_path / "missing.parquet")
    with pytest.raises(ValueError, match="unknown model"):
        model_registry.model_specs(["nope"])


def test_a_split_without_validation_cannot_be_tuned(
    ml_events: pl.DataFrame, ml_items: pl.DataFrame
) -> None:
    split = per_user_split(ml_events, validation_fraction=0.0)
    with pytest.raises(ValueError, match="nothing to tune"):
        evaluation.evaluate(model_registry.model_specs(["popularity"]), split, ml_items)


def test_exploration_shows_the_most_new_items_within_the_tolerance() -> None:
    curve = [{"slots": n, "share": 1.0, "ndcg@10": 0.2, "ndcg@20": 0.30 - 0.006 * n,
              "cold_recall@20": 0.01 * n} for n in (0, 1, 2, 3, 5)]
    # 5% of 0.30 = 0.015: 2 slots cost 0.012, 3 slots 0.018
    assert exploration.choose_exploration(curve, [10, 20], tolerance=0.05)["slots"] == 2
    assert exploration.choose_exploration(curve, [10, 20], tolerance=0.0)["slots"] == 0
    # slots for a share of the users are cheaper: 7 slots for 30% show 2.1 new items a user
    curve += [{"slots": n, "share": 0.3, "ndcg@10": 0.2, "ndcg@20": 0.30 - 0.002 * n,
               "cold_recall@20": 0.0} for n in (1, 2, 3, 5, 7, 8)]
    chosen = exploration.choose_exploration(curve, [10, 20], tolerance=0.05)
    assert (chosen["slots"], chosen["share"]) == (7, 0.3)  # 8 slots cost 0.016: too much
    # the same exposure: the better new-item recall, then the better NDCG@20
    curve += [{"slots": n, "share": 0.7, "ndcg@10": 0.2, "ndcg@20": 0.289,
               "cold_recall@20": 0.0} for n in (3, 3)]
    curve[-1]["cold_recall@20"] = 0.01
    chosen = exploration.choose_exploration(curve, [10, 20], tolerance=0.05)
    assert (chosen["share"], chosen["cold_recall@20"]) == (0.7, 0.01)


def test_hybrids_bring_their_generators_in_front() -> None:
    assert model_registry.with_generators(["popularity", "hybrid-id", "als"]) == [
        "ease", "itemknn", "popularity", "hybrid-id", "als"]
    assert model_registry.with_generators(["popularity"]) == ["popularity"]
    # the chosen hybrid runs before the models that keep its settings
    assert model_registry.with_generators(["ease", "served", "hybrid-id", "hybrid-mixed"]) == [
        "als", "itemknn", "ease", "hybrid-mixed", "served", "hybrid-id"]


def test_ablations_and_served_keep_the_chosen_hybrids_settings(tmp_path: Path) -> None:
    """They search their own grid only when ``hybrid-mixed`` has not run in the same run."""
    encodings = tmp_path / "item_encodings.parquet"
    vectors = baselines.random_item_vectors(np.arange(1, 5), dim=4, seed=0)
    write_encodings(vectors, encodings)
    specs = {s.name: s for s in model_registry.model_specs(
        ["hybrid-mixed", "hybrid-text"], encodings=encodings)}
    mixed, text = specs["hybrid-mixed"], specs["hybrid-text"]
    assert mixed.settings_from is None and text.settings_from == "hybrid-mixed"
    assert text.search_grid() == model_registry.HYBRID_GRID
    chosen = model_registry.HYBRID_GRID[1]
    assert mixed.tuned is not None
    mixed.tuned["hybrid-mixed"] = chosen  # what run_model records after tuning
    assert text.search_grid() == [chosen] and mixed.search_grid() == model_registry.HYBRID_GRID


def test_missing_inputs_fail_before_any_work(tmp_path: Path, ml_offline: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    def run(*argv: str) -> int:
        return evaluate_job.run(evaluate_job.parse_args(argv))

    with pytest.raises(FileNotFoundError, match="avrec ingest"):
        run("--offline", str(tmp_path), "--models", "popularity")
    monkeypatch.setenv("AVREC_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="avrec apply"):
        run("--offline", str(ml_offline), "--models", "popularity,deep-text")
    with pytest.raises(FileNotFoundError, match="encodings"):
        run("--offline", str(ml_offline), "--models", "hybrid-text",
            "--encodings", str(tmp_path / "none.parquet"))
    assert evaluate_job.main(["--offline", str(tmp_path), "--models", "popularity"]) == 2
    assert capsys.readouterr().err.startswith("avrec evaluate: error: no events, items table")
    assert not list(tmp_path.iterdir())  # nothing written


def test_each_model_is_reported_as_soon_as_it_finishes(
    ml_split: Split, ml_items: pl.DataFrame
) -> None:
    def broken(params: dict, seed: int) -> Recommender:
        raise RuntimeError("a late failure")

    specs = [*model_registry.model_specs(["popularity"], quick=True),
             evaluation.ModelSpec("broken", broken)]
    seen: list[list[str]] = []
    with pytest.raises(RuntimeError, match="late failure"):
        evaluation.evaluate(specs, ml_split, ml_items,
                            on_model=lambda kind, models: seen.append(list(models)))
    assert seen == [["popularity"]]


@pytest.mark.slow
def test_evaluate_runs_on_a_generic_catalogue_end_to_end(tmp_path: Path) -> None:
    """The shared MovieLens data written as events.csv + items.csv (a slice of users),
    ingested through the generic import, then the baselines, the hybrid (ID only, and over
    item vectors that a third of the items have) and the served pipeline evaluated with the
    CLI."""
    from avrec import behaviour_features, config, ingest

    source = config.datasets_dir() / "ml-latest-small"
    ratings = pl.read_csv(source / "ratings.csv").filter(pl.col("userId") <= 120)
    movies = pl.read_csv(source / "movies.csv").filter(
        pl.col("movieId").is_in(ratings["movieId"].unique().to_list()))
    ratings.select(pl.col("userId").alias("user_id"), pl.col("movieId").alias("item_id"),
                   pl.lit("rating").alias("event_type"), pl.col("rating").alias("value"),
                   "timestamp").write_csv(tmp_path / "events.csv")
    movies.select(pl.col("movieId").alias("item_id"), "title",
                  pl.col("genres").str.replace_all(r"\(no genres listed\)", "").alias("genres"),
                  ).write_csv(tmp_path / "items.csv")
    offline = tmp_path / "offline"
    ingest.ingest_generic(tmp_path / "events.csv", tmp_path / "items.csv", offline)
    behaviour_features.build(offline)
    items = pl.read_parquet(offline / "items.parquet")
    vectors = baselines.random_item_vectors(items["item_id"].to_numpy()[::3], dim=8, seed=1)
    encodings = tmp_path / "item_encodings.parquet"
    write_encodings(vectors, encodings)
    out = tmp_path / "report"
    argv = ["--out", str(out), "--offline", str(offline), "--quick", "--split", "per-user",
            "--models", "popularity,recent-popularity,hybrid-id,hybrid-text,served",
            "--encodings", str(encodings)]
    assert evaluate_job.main(argv) == 0
    report = json.loads((out / "report.json").read_text())["splits"]["per-user"]
    assert list(report["models"]) == ["ease", "als", "itemknn", "popularity",
                                      "recent-popularity", "hybrid-id", "hybrid-text", "served"]
    served = report["models"]["served"]
    assert served["test"]["ndcg@10"]["mean"] > report["models"]["popularity"]["test"][
        "ndcg@10"]["mean"]
    hybrid = report["models"]["hybrid-id"]
    assert hybrid["test"]["ndcg@10"]["mean"] > report["models"]["popularity"]["test"][
        "ndcg@10"]["mean"]
    assert len(hybrid["per_user_ndcg"]["ndcg@10"]) == report["counts"]["test_users"]
    assert "exploration" not in hybrid  # no content: new items cannot reach it
    exploration = report["models"]["hybrid-text"]["exploration"]
    assert exploration["chosen_slots"] in EXPLORE_SLOTS
    assert exploration["chosen_share"] in EXPLORE_SHARES
    policies = [(p["slots"], p["share"]) for p in exploration["test"]]
    assert policies == [(p["slots"], p["share"]) for p in exploration["validation"]]
    assert len(policies) == len(set(policies)) == 1 + (len(EXPLORE_SLOTS) - 1) * len(
        EXPLORE_SHARES)
    assert (out / "tradeoff.png").exists() and (out / "training.png").exists()
