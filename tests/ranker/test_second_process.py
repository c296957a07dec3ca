"""``avrec evaluate --processes 2``: the models of the second process give the inline numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from avrec.errors import ModelError
from avrec.ranker import cpu_share, evaluate_job, evaluation, model_registry
from avrec.ranker.second_process import SecondProcess, SpecArgs
from avrec.ranker.splits import per_user_split
from tests.synthetic_catalogue import synthetic_catalogue

MODELS = ["popularity", "sequential-id"]


def _without_seconds(report: dict[str, Any]) -> str:
    """The report as JSON without its timings (NaN, e.g. a slice without users, equals NaN)."""
    report.pop("seconds")
    for result in report["models"].values():
        result.pop("seconds")
    return json.dumps(report, sort_keys=True)


def test_the_second_process_gives_the_inline_numbers() -> None:
    data = synthetic_catalogue()
    split = per_user_split(data.events)
    inline = evaluation.evaluate(model_registry.model_specs(MODELS, quick=True), split,
                                 data.items, seed=3)
    here, second = evaluate_job.split_processes(MODELS, 2, SpecArgs(quick=True))
    assert here == ["popularity"] and second is not None and second.names == ("sequential-id",)
    seen: list[list[str]] = []
    cpus = cpu_share.usable_cpus()
    beside = evaluation.evaluate(model_registry.model_specs(here, quick=True), split,
                                 data.items, seed=3, second=second,
                                 on_model=lambda kind, models: seen.append(list(models)))
    assert seen[-1] == MODELS  # each report as it arrives, in the asked order at the end
    assert cpu_share.usable_cpus() == cpus  # every CPU is this process's again
    assert _without_seconds(beside) == _without_seconds(inline)


def test_one_process_or_one_side_runs_inline() -> None:
    assert evaluate_job.split_processes(MODELS, 1, SpecArgs()) == (MODELS, None)
    assert evaluate_job.split_processes(["sequential-id"], 2, SpecArgs()) == (
        ["sequential-id"], None)
    assert evaluate_job.split_processes(["ease", "als"], 2, SpecArgs()) == (["ease", "als"], None)


def test_a_failure_in_the_second_process_is_an_error_here(tmp_path: Path) -> None:
    data = synthetic_catalogue()
    split = per_user_split(data.events)
    second = SecondProcess(["sequential-mixed"], SpecArgs(encodings=tmp_path / "none.parquet"))
    specs = model_registry.model_specs(["popularity"], quick=True)
    with pytest.raises(ModelError, match="needs item encodings"):
        evaluation.evaluate(specs, split, data.items, second=second)


def test_the_ablations_shared_between_the_processes_give_the_inline_numbers(
    tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """Once ``hybrid-mixed`` has run, its ablations go to whichever process is free (with
    the run's settings and generator fits): the second one takes some, the numbers stay."""
    from avrec.ranker import baselines
    from tests.ranker.test_evaluation import write_encodings

    data = synthetic_catalogue()
    # each user's ratings 10 minutes apart: co-consumption pairs for the gated fusion
    events = data.events.sort("user_id", "event_timestamp").with_columns(
        pl.col("event_timestamp").first().over("user_id")
        + pl.duration(minutes=10 * pl.int_range(pl.len()).over("user_id")))
    split = per_user_split(events)
    encodings = tmp_path / "item_encodings.parquet"
    write_encodings(baselines.random_item_vectors(data.items["item_id"].to_numpy(), dim=4,
                                                  seed=0), encodings)
    names = model_registry.with_generators(
        ["hybrid-mixed", "hybrid-text", "hybrid-id", "hybrid-image"])
    args = SpecArgs(quick=True, encodings=encodings)

    def specs(names: list[str], state: model_registry.RunState | None = None) -> list:
        return model_registry.model_specs(names, quick=True, encodings=encodings, state=state)

    inline = evaluation.evaluate(specs(names), split, data.items, seed=3)
    state = model_registry.RunState()
    here, second = evaluate_job.split_processes(names, 2, args, state)
    assert here == names and second is not None and second.names == ()
    assert second.shared == ("hybrid-text", "hybrid-id", "hybrid-image")
    capfd.readouterr()
    beside = evaluation.evaluate(specs(here, state), split, data.items, seed=3, second=second)
    assert "(second process)" in capfd.readouterr().out  # it took a share
    assert list(beside["models"]) == names
    assert _without_seconds(beside) == _without_seconds(inline)


def test_nothing_is_shared_without_the_chosen_hybrid() -> None:
    assert model_registry.shareable(["hybrid-text", "hybrid-id"]) == []
    assert model_registry.shareable(["hybrid-mixed", "served", "hybrid-id"]) == ["hybrid-id"]
