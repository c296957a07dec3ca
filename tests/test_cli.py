"""The `avrec` console script end to end, as an analyst runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from avrec import cli, config
from avrec.commands import parse_time


def _avrec(*args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("avrec"))
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600)


def test_training_set_cli_writes_parquet(feature_store, tmp_path: Path) -> None:
    out = tmp_path / "ts.parquet"
    done = _avrec(
        "training-set",
        "--start",
        "2018-01-01",
        "--end",
        "2018-03-01",
        "--negatives",
        "2",
        "--feature-service",
        "behaviour_features",
        "--sampling",
        "popularity",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    frame = pl.read_parquet(out)
    assert "wrote" in done.stdout and frame.height > 0
    assert frame["label_timestamp"].min().year == 2018
    positives = frame.filter(pl.col("sample_type") == "positive").height
    assert frame.filter(pl.col("sample_type") == "sampled_negative").height == 2 * positives


def test_cli_errors_are_clear() -> None:
    bad_date = _avrec("training-set", "--start", "soon", "--end", "2018-03-01", "--out", "x")
    assert bad_date.returncode == 2 and "not an ISO 8601" in bad_date.stderr
    empty = cli.main(
        ["training-set", "--start", "2018-03-01", "--end", "2018-01-01", "--out", "x.parquet"]
    )
    assert empty == 2


def test_parse_time_defaults_to_utc() -> None:
    assert parse_time("2018-01-01").isoformat() == "2018-01-01T00:00:00+00:00"
    assert parse_time("2018-01-01T02:00:00+02:00").hour == 0


def test_global_options_hold_for_job_subcommands(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    url = "redis://127.0.0.1:6390/3"
    # once an AttributeError ('Namespace' object has no attribute 'func')
    code = cli.main(["--redis-url", url, "evaluate", "--models", "no-such-model"])
    assert code == 2 and "avrec evaluate: error: " in capsys.readouterr().err
    assert config.redis_url() == url
    assert cli.main(["--redis-url", url, "training-set", "--start", "2018-03-01",
                     "--end", "2018-01-01", "--out", "x.parquet"]) == 2


def test_a_job_subcommand_gets_the_global_options_and_the_one_error_path(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from avrec.web import serve

    monkeypatch.delenv("REDIS_URL", raising=False)
    url = "redis://127.0.0.1:1/0"
    seen = []

    def handler(args) -> int:
        seen.append((args.redis_url, config.redis_url(), args.port))
        raise ValueError("no service at the target")

    monkeypatch.setattr(serve, "run", handler)
    assert cli.main(["--redis-url", url, "web", "--port", "9"]) == 2
    assert seen == [(url, url, 9)]
    assert capsys.readouterr().err.splitlines() == ["avrec web: error: no service at the target"]


def test_a_job_subcommand_shows_its_own_options_and_errors(
        capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["web", "--help"])
    assert exit_.value.code == 0 and "--top-k" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--redis-url", "redis://h:1/0", "web", "--top-k", "0"])
    assert exit_.value.code == 2 and "between 1 and 50" in capsys.readouterr().err


def test_the_serve_subcommand_keeps_its_own_redis_url() -> None:
    args = cli.build_parser("serve").parse_args(["--redis-url", "redis://a:1/0", "serve"])
    assert args.redis_url == "redis://a:1/0" and args.command == "serve"
    args = cli.build_parser("serve").parse_args(
        ["--redis-url", "redis://a:1/0", "serve", "--redis-url", "redis://b:2/0"])
    assert args.redis_url == "redis://b:2/0"


def test_the_train_subcommand_defaults_to_the_shipped_training() -> None:
    from avrec.ranker.train_job import requested_training
    from avrec.ranker.training import TrainConfig

    assert requested_training(cli.build_parser("train").parse_args(["train"])) == TrainConfig()
    assert TrainConfig().loss == "softmax" and TrainConfig().item_dropout > 0
    args = cli.build_parser("train").parse_args(
        ["train", "--loss", "bce", "--negatives", "2", "--sampling", "popularity"])
    assert requested_training(args) == TrainConfig(loss="bce", negatives=2, sampling="popularity")


def test_the_training_set_subcommand_and_the_api_share_one_engine_default() -> None:
    import inspect
    import typing

    from avrec import names, training_set

    api = inspect.signature(training_set.build_training_set).parameters["engine"].default
    args = cli.build_parser("training-set").parse_args(
        ["training-set", "--start", "2017-01-01", "--end", "2018-01-01", "--out", "x.parquet"])
    assert args.engine == api == names.DEFAULT_TRAINING_SET_ENGINE
    assert typing.get_args(training_set.Engine) == names.TRAINING_SET_ENGINES
    demo = cli.build_parser("demo").parse_args(["demo"])
    assert demo.engine == api


def test_help_imports_no_job_module() -> None:
    code = ("import sys; from avrec import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'feast', 'avrec.ranker', 'avrec.encoders', "
            "'avrec.server') "
            "if m in sys.modules]\n"
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train" in done.stdout and "the rankers" in done.stdout
