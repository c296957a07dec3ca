"""The input contract of an exported model, written next to it as ``contract.json``.

A :class:`ModelContract` says what an ONNX model (the ``ranker``, or the retrieval
``user_tower`` / ``item_tower``) expects: its inputs (names, dtypes, shapes with a symbolic
batch), the ordered dense feature names on the user and item side, the history length, the
item-vector dimension, which serving feature services must provide which ``<view>__<feature>``
fields, the item vectors (name and embedding version) it was trained with, and the rating mean
used for centring. Its ``version`` is a hash of all of that.

:func:`check_contract` compares a contract with an ONNX graph's inputs, the fields the
serving feature services provide and the embedding version being served, and raises one
:class:`ContractError` that lists every mismatch. This module imports neither torch nor feast,
so the server can use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from avrec.errors import ModelError
from avrec.names import BEHAVIOUR_FEATURES, ITEM_FEATURES, USER_FEATURES
from avrec.pit_join import DERIVED_AGES
from avrec.ranker.features import (
    HISTORY,
    ITEM,
    ITEM_AGES,
    ITEM_COUNTS,
    USER,
    USER_AGES,
    USER_COUNTS,
)

if TYPE_CHECKING:
    from feast import FeatureStore

    from avrec.ranker.features import FeatureEncoder

Kind = Literal["ranker", "user_tower", "item_tower"]
KINDS: tuple[str, ...] = ("ranker", "user_tower", "item_tower")
CONTRACT_FILE = "contract.json"
FORMAT = 1
BATCH = "batch"
ITEM_NO_VECTOR = "item_has_no_vector"
USER_SERVICE = USER_FEATURES
ITEM_SERVICE = ITEM_FEATURES
TRAINING_SERVICE = BEHAVIOUR_FEATURES
INPUT_NAMES: dict[str, tuple[str, ...]] = {
    "ranker": ("user_dense", "history", "history_mask", "item_vector", "item_dense"),
    "user_tower": ("user_dense", "history", "history_mask"),
    "item_tower": ("item_vector", "item_dense"),
}
# onnxruntime's type names (NodeArg.type) to numpy dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}

Dim = int | str


class ContractError(ModelError):
    """A model, its contract and what serving provides disagree; ``problems`` lists how."""

    def __init__(self, subject: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{subject}: {len(self.problems)} contract mismatch(es):\n{lines}")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, numpy dtype name, shape (``"batch"`` is symbolic)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    @classmethod
    def of(cls, value: Any) -> TensorSpec:
        """From a TensorSpec, or anything with ``name``, ``type`` and ``shape`` (an onnxruntime
        ``NodeArg``); unknown dims (``None``) become ``"?"``."""
        if isinstance(value, TensorSpec):
            return value
        dtype = ORT_DTYPES.get(value.type, value.type)
        shape = tuple("?" if d is None else d for d in value.shape)
        return cls(value.name, dtype, shape)


def _shape_problem(
    kind: str, name: str, expected: tuple[Dim, ...], actual: tuple[Dim, ...]
) -> str | None:
    """A symbolic dim in the contract accepts any symbolic dim in the graph; sizes must match."""
    fits = len(expected) == len(actual) and all(
        (isinstance(e, str) and not isinstance(a, int)) or (isinstance(e, int) and e == a)
        for e, a in zip(expected, actual, strict=True)
    )
    if fits:
        return None
    want, have = (", ".join(str(d) for d in dims) for dims in (expected, actual))
    return f"{kind} {name!r}: shape [{want}] in the contract, [{have}] in the graph"


def user_fields() -> tuple[str, ...]:
    """``<view>__<feature>`` fields the user side reads (ages are derived from timestamps)."""
    extra = ("mean_rating", "positive_share", "genre_affinity", "recent_items")
    return (*USER_COUNTS, *(DERIVED_AGES[a] for a in USER_AGES), *(USER + f for f in extra))


def item_fields() -> tuple[str, ...]:
    """``<view>__<feature>`` fields the item side reads."""
    return (*ITEM_COUNTS, *(DERIVED_AGES[a] for a in ITEM_AGES), f"{ITEM}mean_rating")


@dataclass(frozen=True)
class ModelContract:
    """What an exported model expects; see the module docstring."""

    kind: Kind
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    user_dense_names: tuple[str, ...]
    item_dense_names: tuple[str, ...]
    history: int
    item_vector_dim: int
    feature_services: Mapping[str, tuple[str, ...]]
    item_vectors: str
    embedding_version: str
    rating_mean: float
    training_feature_service: str = TRAINING_SERVICE
    format: int = FORMAT

    def payload(self) -> dict[str, Any]:
        """Everything the version hash covers, as plain JSON values."""
        data = asdict(self)
        data["inputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.inputs]
        data["outputs"] = [asdict(t) | {"shape": list(t.shape)} for t in self.outputs]
        data["user_dense_names"] = list(self.user_dense_names)
        data["item_dense_names"] = list(self.item_dense_names)
        data["feature_services"] = {k: list(v) for k, v in sorted(self.feature_services.items())}
        return data

    @functools.cached_property
    def version(self) -> str:
        """Content hash of the contract (16 hex digits; computed once, the contract is frozen,
        and every served answer carries it)."""
        text = json.dumps(self.payload(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_json(self) -> str:
        return json.dumps({**self.payload(), "version": self.version}, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelContract:
        data = dict(data)
        data.pop("version", None)
        specs = {
            key: tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data[key])
            for key in ("inputs", "outputs")
        }
        data |= specs
        data["user_dense_names"] = tuple(data["user_dense_names"])
        data["item_dense_names"] = tuple(data["item_dense_names"])
        data["feature_services"] = {k: tuple(v) for k, v in data["feature_services"].items()}
        return cls(**data)

    def save(self, directory: Path) -> Path:
        """Write ``contract.json`` into ``directory``; returns its path."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONTRACT_FILE
        path.write_text(self.to_json() + "\n")
        return path

    def problems(self) -> list[str]:
        """Inconsistencies inside the contract itself (names vs shapes, expected inputs)."""
        found = []
        if self.kind not in KINDS:
            found.append(f"kind {self.kind!r} is not one of {list(KINDS)}")
            return found
        expected = INPUT_NAMES[self.kind]
        if tuple(self.input_names) != expected:
            found.append(f"a {self.kind} takes inputs {list(expected)}, "
                         f"the contract lists {self.input_names}")
            return found
        sizes: dict[tuple[str, int], int] = {}
        if self.kind != "item_tower":
            sizes |= {
                ("user_dense", 1): len(self.user_dense_names),
                ("history", 1): self.history,
                ("history", 2): self.item_vector_dim,
                ("history_mask", 1): self.history,
            }
        if self.kind != "user_tower":
            sizes |= {("item_vector", 1): self.item_vector_dim,
                      ("item_dense", 1): len(self.item_dense_names)}
        for (name, axis), size in sizes.items():
            shape = self.input(name).shape
            if len(shape) <= axis or shape[axis] != size:
                found.append(f"input {name!r}: axis {axis} of {list(shape)} should be {size} "
                             f"(from the contract's names / history / item_vector_dim)")
        for spec in (*self.inputs, *self.outputs):
            if not spec.shape or spec.shape[0] != BATCH:
                found.append(f"{spec.name!r}: axis 0 must be the symbolic {BATCH!r}")
        return found


def _tensor_problems(
    kind: str, expected: Sequence[TensorSpec], actual: Iterable[Any]
) -> list[str]:
    graph = {t.name: t for t in map(TensorSpec.of, actual)}
    wanted = {t.name: t for t in expected}
    found = []
    missing = [n for n in wanted if n not in graph]
    extra = [n for n in graph if n not in wanted]
    if missing:
        found.append(f"{kind}(s) {missing} in the contract are missing from the graph")
    if extra:
        found.append(f"graph {kind}(s) {extra} are not in the contract")
    for name in wanted.keys() & graph.keys():
        want, have = wanted[name], graph[name]
        if want.dtype != have.dtype:
            found.append(f"{kind} {name!r}: dtype {want.dtype} in the contract, "
                         f"{have.dtype} in the graph")
        shape = _shape_problem(kind, name, want.shape, have.shape)
        if shape:
            found.append(shape)
    return found


def _field_problems(
    required: Mapping[str, Sequence[str]], provided: Mapping[str, Collection[str]]
) -> list[str]:
    found = []
    for service, fields in required.items():
        if service not in provided:
            found.append(f"feature service {service!r} is not served "
                         f"(served: {sorted(provided)})")
            continue
        missing = [f for f in fields if f not in provided[service]]
        if missing:
            found.append(f"feature service {service!r} does not provide {missing}")
    return found


def check_contract(
    contract: ModelContract,
    onnx_model_inputs: Iterable[Any],
    feature_fields: Mapping[str, Collection[str]],
    *,
    embedding_version: str | None = None,
    onnx_model_outputs: Iterable[Any] | None = None,
) -> None:
    """Raise :class:`ContractError` listing every mismatch, or return quietly.

    ``onnx_model_inputs`` / ``onnx_model_outputs``: :class:`TensorSpec`\\ s or onnxruntime
    ``NodeArg``\\ s (``session.get_inputs()``). ``feature_fields``: serving feature service
    name -> the ``<view>__<feature>`` fields it provides (see :func:`service_fields`).
    ``embedding_version``: the version of the item vectors being served, when known.
    """
    found = contract.problems()
    found += _tensor_problems("input", contract.inputs, onnx_model_inputs)
    if onnx_model_outputs is not None:
        found += _tensor_problems("output", contract.outputs, onnx_model_outputs)
    found += _field_problems(contract.feature_services, feature_fields)
    if embedding_version is not None and embedding_version != contract.embedding_version:
        found.append(f"embedding version {embedding_version!r} is served, the model was "
                     f"trained with {contract.embedding_version!r} ({contract.item_vectors})")
    if found:
        raise ContractError(f"{contract.kind} contract {contract.version}", found)


def load_contract(path: Path) -> ModelContract:
    """Read ``contract.json`` (a file, or a model directory holding one).

    Refuses a file whose stored version does not match its content (edited after export).
    """
    path = Path(path)
    file = path / CONTRACT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no contract at {file}")
    data = json.loads(file.read_text())
    if data.get("format") != FORMAT:
        raise ContractError(str(file), [f"format {data.get('format')!r}, expected {FORMAT}"])
    contract = ModelContract.from_dict(data)
    if data.get("version") != contract.version:
        raise ContractError(str(file), [
            f"stored version {data.get('version')!r} does not match the content "
            f"({contract.version}): the file was edited after export"
        ])
    return contract


def service_fields(store: FeatureStore, services: Iterable[str]) -> dict[str, set[str]]:
    """``<view>__<feature>`` fields each feature service provides, from the Feast registry."""
    out = {}
    for name in services:
        projections = store.get_feature_service(name).feature_view_projections
        out[name] = {f"{p.name_alias or p.name}__{f.name}" for p in projections for f in p.features}
    return out


OUTPUTS: dict[str, str] = {
    "ranker": "logit", "user_tower": "user_vector", "item_tower": "item_tower_vector",
}


def contract_for(
    kind: Kind,
    encoder: FeatureEncoder,
    item_vector_dim: int,
    item_vectors: str,
    embedding_version: str,
    output_dim: int | None = None,
    history: int = HISTORY,
) -> ModelContract:
    """The contract of a model of ``kind`` trained on ``encoder``'s features: the inputs of
    :data:`INPUT_NAMES`, the user side and/or the item side (item dense features end with the
    ``item_has_no_vector`` flag, as in DeepRanker), and the services that provide them."""
    user_names = tuple(encoder.user_dense_names) if kind != "item_tower" else ()
    item_names = (*encoder.item_dense_names, ITEM_NO_VECTOR) if kind != "user_tower" else ()
    shapes: dict[str, tuple[Dim, ...]] = {
        "user_dense": (BATCH, len(user_names)),
        "history": (BATCH, history, item_vector_dim),
        "history_mask": (BATCH, history),
        "item_vector": (BATCH, item_vector_dim),
        "item_dense": (BATCH, len(item_names)),
    }
    services = {}
    if user_names:
        services[USER_SERVICE] = user_fields()
    if item_names:
        services[ITEM_SERVICE] = item_fields()
    output = (BATCH,) if kind == "ranker" else (BATCH, output_dim)
    return ModelContract(
        kind=kind,
        inputs=tuple(TensorSpec(name, "float32", shapes[name]) for name in INPUT_NAMES[kind]),
        outputs=(TensorSpec(OUTPUTS[kind], "float32", output),),
        user_dense_names=user_names,
        item_dense_names=item_names,
        history=history,
        item_vector_dim=item_vector_dim,
        feature_services=services,
        item_vectors=item_vectors,
        embedding_version=embedding_version,
        rating_mean=float(encoder.rating_mean),
    )


def ranker_contract(
    encoder: FeatureEncoder,
    item_vector_dim: int,
    item_vectors: str,
    embedding_version: str,
    history: int = HISTORY,
) -> ModelContract:
    """The contract of a :class:`avrec.ranker.model.Ranker` (output ``logit``)."""
    return contract_for("ranker", encoder, item_vector_dim, item_vectors, embedding_version,
                        history=history)


def user_tower_contract(
    encoder: FeatureEncoder,
    item_vector_dim: int,
    output_dim: int,
    item_vectors: str,
    embedding_version: str,
    history: int = HISTORY,
) -> ModelContract:
    """The contract of a :class:`avrec.ranker.model.UserTower`: user features in, a unit vector
    out."""
    return contract_for("user_tower", encoder, item_vector_dim, item_vectors, embedding_version,
                        output_dim, history)


def item_tower_contract(
    encoder: FeatureEncoder,
    item_vector_dim: int,
    output_dim: int,
    item_vectors: str,
    embedding_version: str,
    history: int = HISTORY,
) -> ModelContract:
    """The contract of a :class:`avrec.ranker.model.ItemTower`: item vector and behaviour in, a unit
    vector out (the vectors an ANN index is built from)."""
    return contract_for("item_tower", encoder, item_vector_dim, item_vectors, embedding_version,
                        output_dim, history)
