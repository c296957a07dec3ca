"""ONNX export of the ranker and the user tower: parity on real batches, the contract, refusals."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from avrec import behaviour_features, tables
from avrec.onnx_runtime import OnnxModel
from avrec.ranker.contract import (
    ContractError,
    ModelContract,
    TensorSpec,
    check_contract,
    load_contract,
    ranker_contract,
    service_fields,
)
from avrec.ranker.deep_ranker import DeepRanker
from avrec.ranker.export import (
    HASH_KEY,
    KIND_KEY,
    USER_INPUTS,
    export_item_tower,
    export_one_user_ranker,
    export_ranker,
    export_user_tower,
    load_model,
    model_path,
    one_user_batch,
)
from avrec.ranker.features import ItemVectors
from avrec.ranker.splits import Split
from avrec.ranker.training import TrainConfig, model_inputs, torch_threads
from avrec.ranker.two_tower import TwoTowerRecommender
from avrec.ranker.two_tower_training import TwoTowerConfig, encode_rows, positive_rows
from tests.ranker.test_two_tower import genre_vectors

VERSION = "genre-projection-v1"
SERVICES = ("user_features", "item_features")
BATCH_SIZES = (1, 7, 256, 1000)


@dataclasses.dataclass(frozen=True)
class Slice:
    """Real fit interactions of a few users, the catalogue, the store, item vectors."""

    train: pl.DataFrame
    items: pl.DataFrame
    store: Any
    vectors: ItemVectors
    genres: int


@pytest.fixture(scope="module")
def real(movielens_offline: Path, feature_store, ml_split: Split) -> Slice:
    items = tables.read_table("items", movielens_offline)
    users = np.sort(ml_split.train["user_id"].unique().to_numpy())[:40]
    train = ml_split.train.filter(pl.col("user_id").is_in(users.tolist())).with_columns(
        pl.lit("rating").alias("event_type")
    )
    genres = len(behaviour_features.genre_vocabulary(items))
    return Slice(train, items, feature_store, genre_vectors(items), genres)


@pytest.fixture(scope="module")
def fields(real: Slice) -> dict[str, set[str]]:
    return service_fields(real.store, SERVICES)


def batches(arrays_of, n: int) -> list[list[np.ndarray]]:
    """Real batches of several sizes (the dynamic batch axis), from ``n`` rows."""
    out, start = [], 0
    for size in BATCH_SIZES:
        idx = np.arange(start, min(start + size, n))
        if idx.size:
            out.append(arrays_of(idx))
        start += size
    return out


@pytest.fixture(scope="module")
def ranker_export(real: Slice, tmp_path_factory: pytest.TempPathFactory):
    deep = DeepRanker(
        real.vectors,
        real.store,
        real.genres,
        config=TrainConfig(epochs=2, negatives=2, progress=False),
        seed=0,
    )
    with torch_threads(1):
        deep.fit(real.train, real.items)
    rows = deep.labelled_rows(real.train, real.items)
    data = deep.encode(rows)
    assert deep.model is not None
    contract = ranker_contract(deep.encoder, real.vectors.dim, real.vectors.name, VERSION)
    arrays = batches(
        lambda idx: [t.numpy() for t in model_inputs(data, idx, deep.vectors.vectors)], rows.height
    )
    exported = export_ranker(deep.model, contract, tmp_path_factory.mktemp("ranker"), arrays)
    return exported, deep, arrays


@pytest.fixture(scope="module")
def tower_export(real: Slice, tmp_path_factory: pytest.TempPathFactory):
    model = TwoTowerRecommender(
        real.vectors,
        real.store,
        real.genres,
        TwoTowerConfig(epochs=2, dim=32, batch_size=256),
        embedding_version=VERSION,
    ).fit(real.train, real.items)
    rows = positive_rows(real.train, real.items, real.store)
    data = encode_rows(model.encoder, real.vectors, rows)
    arrays = batches(lambda idx: model.user_inputs(data, idx), rows.height)
    assert model.user_tower is not None
    exported = export_user_tower(
        model.user_tower, model.contract(), tmp_path_factory.mktemp("user_tower"), arrays
    )
    return exported, model, arrays


@pytest.fixture(scope="module")
def item_tower_export(tower_export, real: Slice, tmp_path_factory: pytest.TempPathFactory):
    _, model, _ = tower_export
    rows = positive_rows(real.train, real.items, real.store)
    data = encode_rows(model.encoder, real.vectors, rows)

    def item_inputs(idx: np.ndarray) -> list[np.ndarray]:
        _, _, _, item, dense = model_inputs(data, idx, real.vectors.vectors)
        return [item.numpy(), dense.numpy()]

    arrays = batches(item_inputs, rows.height)
    exported = export_item_tower(
        model.item_tower, model.item_contract(), tmp_path_factory.mktemp("item_tower"), arrays
    )
    return exported, model, arrays


EXPORTS = ["ranker_export", "tower_export", "item_tower_export"]


def test_one_user_graph_equals_the_reference_graph(ranker_export) -> None:
    exported, deep, arrays = ranker_export
    one_user = export_one_user_ranker(deep.model, exported.contract, exported.path.parent, arrays)
    print(f"one-user graph: max |onnx - torch| {one_user.parity.max_abs_diff:.2e} "
          f"over {one_user.parity.rows} rows")
    assert one_user.parity.max_abs_diff < 1e-4 and one_user.parity.batches == len(arrays)
    fast, reference = OnnxModel(one_user.path), OnnxModel(exported.path)
    assert fast.metadata[HASH_KEY] == exported.contract.version
    for batch in arrays:
        batch = one_user_batch(batch)
        names = exported.contract.input_names
        expected = reference.run(dict(zip(names, batch, strict=True)))["logit"]
        feeds = {n: a[:1] if n in USER_INPUTS else a for n, a in zip(names, batch, strict=True)}
        got = fast.run(feeds)["logit"]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("which", EXPORTS)
def test_onnx_matches_torch_on_real_batches(which: str, request: pytest.FixtureRequest) -> None:
    exported, _, arrays = request.getfixturevalue(which)
    parity = exported.parity
    print(
        f"{exported.contract.kind}: max |onnx - torch| {parity.max_abs_diff:.2e}, "
        f"mean {parity.mean_abs_diff:.2e} over {parity.rows} rows"
    )
    assert parity.batches == len(BATCH_SIZES)
    assert parity.rows == sum(len(a[0]) for a in arrays) > 1000
    assert parity.max_abs_diff < 1e-4


@pytest.mark.parametrize("which", EXPORTS)
def test_files_metadata_and_dynamic_batch(which: str, request: pytest.FixtureRequest) -> None:
    exported, _, _ = request.getfixturevalue(which)
    contract = exported.contract
    model = OnnxModel(exported.path)
    assert exported.path == model_path(exported.path.parent, contract.kind)
    assert model.metadata[KIND_KEY] == contract.kind
    assert model.metadata[HASH_KEY] == contract.version
    assert [i.shape[0] for i in model.session.get_inputs()] == ["batch"] * len(contract.inputs)
    assert model.input_names == contract.input_names
    assert model.output_names == contract.output_names


def test_ranker_contract_describes_the_model(ranker_export) -> None:
    exported, deep, _ = ranker_export
    contract = exported.contract
    assert contract.kind == "ranker"
    assert contract.item_dense_names[-1] == "item_has_no_vector"
    assert list(contract.user_dense_names) == deep.encoder.user_dense_names
    assert contract.input("item_dense").shape == ("batch", len(deep.encoder.item_dense_names) + 1)
    assert contract.input("history").shape == ("batch", 20, deep.vectors.dim)
    assert contract.rating_mean == pytest.approx(deep.encoder.rating_mean)
    assert set(contract.feature_services) == set(SERVICES)
    assert "user_behaviour__recent_items" in contract.feature_services["user_features"]
    assert "item_behaviour__first_interaction_at" in contract.feature_services["item_features"]


def test_contract_round_trip(ranker_export, tower_export) -> None:
    for exported, _, _ in (ranker_export, tower_export):
        loaded = load_contract(exported.contract_path)
        assert loaded == exported.contract
        assert loaded.version == exported.contract.version
        assert load_contract(exported.path.parent) == loaded
        stored = json.loads(exported.contract_path.read_text())
        assert stored["version"] == loaded.version and stored["kind"] == loaded.kind
    assert ranker_export[0].contract.version != tower_export[0].contract.version


def test_loader_accepts_a_matching_model(ranker_export, fields) -> None:
    exported, deep, arrays = ranker_export
    loaded = load_model(exported.path.parent, fields, embedding_version=VERSION)
    feeds = dict(zip(loaded.contract.input_names, arrays[1], strict=True))
    with torch.no_grad():
        expected = deep.model(*map(torch.from_numpy, arrays[1])).numpy()
    np.testing.assert_allclose(loaded.run(feeds), expected, atol=1e-4)


def test_renamed_feature_is_refused(tower_export, fields) -> None:
    renamed = {k: set(v) for k, v in fields.items()}
    renamed["user_features"].discard("user_behaviour__interactions_7d")
    renamed["user_features"].add("user_behaviour__interactions_week")
    with pytest.raises(ContractError, match="interactions_7d") as error:
        load_model(tower_export[0].path.parent, renamed)
    assert "'user_features' does not provide" in str(error.value)
    with pytest.raises(ContractError, match="'user_features' is not served"):
        load_model(tower_export[0].path.parent, {"item_features": fields["item_features"]})


def test_wrong_embedding_version_is_refused(ranker_export, fields) -> None:
    with pytest.raises(ContractError, match=r"'other-v2' is served.*'genre-projection-v1'"):
        load_model(ranker_export[0].path.parent, fields, embedding_version="other-v2")


def _with_item_dim(contract: ModelContract, dim: int) -> ModelContract:
    inputs = tuple(
        TensorSpec(t.name, t.dtype, (*t.shape[:-1], dim))
        if t.name in ("history", "item_vector")
        else t
        for t in contract.inputs
    )
    return dataclasses.replace(contract, inputs=inputs, item_vector_dim=dim)


def test_wrong_dimension_is_refused(ranker_export, fields, tmp_path: Path) -> None:
    exported = ranker_export[0]
    graph = OnnxModel(exported.path).session.get_inputs()
    dim = exported.contract.item_vector_dim
    wrong = _with_item_dim(exported.contract, dim + 1)
    with pytest.raises(ContractError) as error:
        check_contract(wrong, graph, fields)
    message = str(error.value)
    assert (
        f"input 'history': shape [batch, 20, {dim + 1}] in the contract, "
        f"[batch, 20, {dim}] in the graph" in message
    )
    assert f"input 'item_vector': shape [batch, {dim + 1}]" in message
    # The same contract saved next to the model (a valid file, but not this model's).
    directory = tmp_path / "model"
    directory.mkdir()
    model_path(directory, "ranker").write_bytes(exported.path.read_bytes())
    wrong.save(directory)
    with pytest.raises(ContractError, match="contract_hash"):
        load_model(directory, fields)


def test_inconsistent_contract_and_graph_list_every_problem(ranker_export, fields) -> None:
    contract = ranker_export[0].contract
    graph = list(map(TensorSpec.of, OnnxModel(ranker_export[0].path).session.get_inputs()))
    inconsistent = dataclasses.replace(contract, item_vector_dim=contract.item_vector_dim * 2)
    with pytest.raises(ContractError) as error:
        check_contract(
            inconsistent,
            [*graph[:-1], TensorSpec("extra", "float32", ("batch",))],
            fields,
            embedding_version="other",
        )
    problems = error.value.problems
    assert any(f"should be {contract.item_vector_dim * 2}" in p for p in problems)
    assert any("['item_dense']" in p and "missing" in p for p in problems)
    assert any("['extra']" in p and "not in the contract" in p for p in problems)
    assert any("embedding version" in p for p in problems)
    assert len(problems) >= 5
    doubled = [TensorSpec(t.name, "float64", t.shape) for t in graph]
    with pytest.raises(ContractError, match="dtype float32 in the contract, float64"):
        check_contract(contract, doubled, fields)
    check_contract(contract, graph, fields, embedding_version=VERSION)


def test_edited_contract_file_is_refused(tower_export, tmp_path: Path) -> None:
    data = json.loads(tower_export[0].contract_path.read_text())
    data["user_dense_names"][0] = "log1p(something_else)"
    edited = tmp_path / "contract.json"
    edited.write_text(json.dumps(data))
    with pytest.raises(ContractError, match="edited after export"):
        load_contract(edited)


def test_contract_and_loader_import_without_torch() -> None:
    code = (
        "import sys, avrec.ranker.contract, avrec.ranker.export; sys.exit(1 if 'torch' in "
        "sys.modules else 0)"
    )
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0
