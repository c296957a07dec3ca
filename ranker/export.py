"""Export the ranker and the retrieval user tower to ONNX, check parity, load with a contract.

:func:`export_ranker` / :func:`export_user_tower` / :func:`export_item_tower` write
``<kind>.onnx`` (dynamic batch, opset :data:`~avrec.names.OPSET`, torch's dynamo exporter)
and ``contract.json`` into one directory per model, with ``kind`` and ``contract_hash`` in
the model's ``metadata_props``. Given real batches they also run the ONNX model through
:class:`avrec.onnx_runtime.OnnxModel` next to torch and refuse an export whose outputs differ
by more than ``tolerance``.

:func:`load_model` is the serving side: it refuses a model whose metadata, graph or contract
disagree, or whose contract asks for features the serving feature services do not provide.
torch is imported only inside the export functions, so loading needs no torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from avrec.names import OPSET
from avrec.onnx_runtime import OnnxModel
from avrec.ranker.contract import (
    CONTRACT_FILE,
    ContractError,
    ModelContract,
    check_contract,
    load_contract,
)

if TYPE_CHECKING:
    import torch

    from avrec.ranker.model import ItemTower, Ranker, UserTower

TOLERANCE = 1e-4
KIND_KEY = "kind"
HASH_KEY = "contract_hash"
EMBEDDING_KEY = "embedding_version"


LATEST = "LATEST"


def latest_model_dir(root: Path) -> Path:
    """The newest run under a models root, named by its ``LATEST`` file (``avrec train``)."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"no trained model under {root}; run `avrec train` first")
    return Path(root) / pointer.read_text().strip()


def model_path(directory: Path, kind: str) -> Path:
    """Where the ONNX file of a model of ``kind`` lives in its directory."""
    return Path(directory) / f"{kind}.onnx"


@dataclass(frozen=True)
class Parity:
    """ONNX vs torch on the same batches: largest and mean absolute output difference."""

    max_abs_diff: float
    mean_abs_diff: float
    rows: int
    batches: int


@dataclass(frozen=True)
class Exported:
    """What an export wrote, and its parity when batches were given."""

    path: Path
    contract_path: Path
    contract: ModelContract
    parity: Parity | None


@dataclass(frozen=True)
class LoadedModel:
    """An ONNX model whose contract was checked at load time."""

    model: OnnxModel
    contract: ModelContract

    def run(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's single output for ``feeds`` (named as in the contract)."""
        (name,) = self.contract.output_names
        return self.model.run(feeds, [name])[name]


def _example(contract: ModelContract, batch: int = 2) -> tuple[torch.Tensor, ...]:
    import torch

    shapes = [tuple(batch if isinstance(d, str) else d for d in t.shape) for t in contract.inputs]
    return tuple(torch.ones(s) if t.name == "history_mask" else torch.zeros(s)
                 for t, s in zip(contract.inputs, shapes, strict=True))


def _write_onnx(
    model: torch.nn.Module,
    contract: ModelContract,
    path: Path,
    kind: str | None = None,
    example: tuple[torch.Tensor, ...] | None = None,
    batched: Sequence[str] | None = None,
) -> None:
    import onnx
    import torch

    from avrec.encoders.onnx_export import quiet_exporter_loggers

    batch = torch.export.Dim("batch")
    batched = contract.input_names if batched is None else batched
    with warnings.catch_warnings(), quiet_exporter_loggers():
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
        program = torch.onnx.export(
            model.eval(),
            example or _example(contract),
            input_names=contract.input_names,
            output_names=contract.output_names,
            dynamic_shapes={name: {0: batch} if name in batched else {}
                            for name in contract.input_names},
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    proto = program.model_proto
    meta = {KIND_KEY: kind or contract.kind, HASH_KEY: contract.version,
            EMBEDDING_KEY: contract.embedding_version}
    kept = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def parity(
    model: torch.nn.Module, onnx_model: OnnxModel, batches: Iterable[Sequence[np.ndarray]]
) -> Parity:
    """Run torch and ONNX on each batch (arrays in the model's input order) and compare."""
    import torch

    model.eval()
    worst, total, values, rows, count = 0.0, 0.0, 0, 0, 0
    for batch in batches:
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in batch]
        with torch.no_grad():
            expected = model(*map(torch.from_numpy, arrays)).numpy()
        feeds = dict(zip(onnx_model.input_names, arrays, strict=True))
        got = next(iter(onnx_model.run(feeds).values()))
        diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
        total, values = total + float(diff.sum()), values + diff.size
        rows, count = rows + len(arrays[0]), count + 1
    return Parity(worst, total / max(values, 1), rows, count)


def export_model(
    model: torch.nn.Module,
    contract: ModelContract,
    directory: Path,
    batches: Iterable[Sequence[np.ndarray]] | None = None,
    tolerance: float = TOLERANCE,
) -> Exported:
    """Write ``<kind>.onnx`` + ``contract.json``; check the graph, and parity when batches are
    given (an export outside ``tolerance`` is removed and refused)."""
    problems = contract.problems()
    if problems:
        raise ContractError(f"{contract.kind} contract {contract.version}", problems)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = model_path(directory, contract.kind)
    _write_onnx(model, contract, path)
    contract_path = contract.save(directory)
    onnx_model = OnnxModel(path, threads=1)
    check_contract(contract, onnx_model.session.get_inputs(), contract.feature_services,
                   onnx_model_outputs=onnx_model.session.get_outputs())
    result = None if batches is None else parity(model, onnx_model, batches)
    if result is not None and not result.max_abs_diff < tolerance:
        path.unlink()
        contract_path.unlink()
        raise ValueError(f"{contract.kind}: ONNX differs from torch by {result.max_abs_diff:.3g}"
                         f" (tolerance {tolerance:g}); export removed")
    return Exported(path, contract_path, contract, result)


def export_ranker(
    model: Ranker,
    contract: ModelContract,
    directory: Path,
    batches: Iterable[Sequence[np.ndarray]] | None = None,
    tolerance: float = TOLERANCE,
) -> Exported:
    """Export a :class:`avrec.ranker.model.Ranker` (output ``logit``) under a ``ranker``
    contract."""
    if contract.kind != "ranker":
        raise ValueError(f"a Ranker needs a 'ranker' contract, not {contract.kind!r}")
    return export_model(model, contract, directory, batches, tolerance)


ONE_USER = "ranker_one_user"
USER_INPUTS = ("user_dense", "history", "history_mask")


def one_user_path(directory: Path) -> Path:
    """The serving graph of a ranker directory (see :func:`export_one_user_ranker`)."""
    return Path(directory) / f"{ONE_USER}.onnx"


def one_user_batch(batch: Sequence[np.ndarray]) -> list[np.ndarray]:
    """A batch-aligned ranker batch turned into one user's: row 0's user inputs for all items."""
    return [np.repeat(a[:1], len(a), 0) if i < len(USER_INPUTS) else a
            for i, a in enumerate(batch)]


def export_one_user_ranker(
    model: Ranker,
    contract: ModelContract,
    directory: Path,
    batches: Iterable[Sequence[np.ndarray]],
    tolerance: float = TOLERANCE,
) -> Exported:
    """Write the serving graph ``ranker_one_user.onnx``: one user's inputs ``[1, ...]`` against
    ``N`` candidates, the user side computed once.

    Same weights, inputs and contract as ``ranker.onnx`` (whose batch-aligned graph remains the
    reference); parity is checked against the torch model on real batches, each turned into
    one user's (:func:`one_user_batch`), and an export outside ``tolerance`` is refused.
    """
    import torch

    class OneUserRanker(torch.nn.Module):
        """``Ranker.forward`` for one user. The attention MLP's first layer is linear in
        ``[h, q, h*q, h-q]``, so its weight blocks apply to the history once, to each candidate
        once, and to ``h*q`` as one matrix product; the user's dense arch runs once."""

        def __init__(self, ranker: Ranker) -> None:
            super().__init__()
            self.ranker = ranker

        def attend(self, history, mask, queries):
            first, rest = self.ranker.attention.score[0], self.ranker.attention.score[1:]
            w_h, w_q, w_hq, w_d = first.weight.split(history.shape[-1], dim=1)
            per_history = history @ (w_h + w_d).T + first.bias  # [L, hidden]
            per_query = queries @ (w_q - w_d).T  # [N, hidden]
            crossing = (history[:, None, :] * w_hq[None]).flatten(0, 1)  # [L*hidden, dim]
            crossed = (queries @ crossing.T).reshape(-1, history.shape[0], w_h.shape[0])
            logits = rest(crossed + per_history[None] + per_query[:, None]).squeeze(-1)
            logits = logits.masked_fill(mask[None] <= 0, -1e4)
            weights = torch.softmax(logits, dim=1) * (mask[None] > 0).to(history.dtype)
            return weights @ history

        def forward(self, user_dense, history, history_mask, item_vector, item_dense):
            r = self.ranker
            items = r.item_proj(item_vector)
            pooled = self.attend(r.item_proj(history[0]), history_mask[0], items)
            user = r.user_arch(user_dense).expand(items.shape[0], -1)
            return r.over(r.interaction([user, pooled, items, r.item_arch(item_dense)]))

    if contract.kind != "ranker":
        raise ValueError(f"the one-user graph needs a 'ranker' contract, not {contract.kind!r}")
    path = one_user_path(directory)
    example = tuple(t[:1] if spec.name in USER_INPUTS else t.repeat(3, *[1] * (t.dim() - 1))
                    for spec, t in zip(contract.inputs, _example(contract), strict=True))
    _write_onnx(OneUserRanker(model), contract, path, ONE_USER, example,
                batched=("item_vector", "item_dense"))
    onnx_model = OnnxModel(path, threads=1)
    worst, total, values, rows, count = 0.0, 0.0, 0, 0, 0
    model.eval()
    for batch in batches:
        arrays = [np.ascontiguousarray(a, dtype=np.float32) for a in one_user_batch(batch)]
        with torch.no_grad():
            expected = model(*map(torch.from_numpy, arrays)).numpy().astype(np.float64)
        feeds = {name: a[:1] if name in USER_INPUTS else a
                 for name, a in zip(contract.input_names, arrays, strict=True)}
        got = next(iter(onnx_model.run(feeds).values())).astype(np.float64)
        diff = np.abs(got - expected)
        worst, total = max(worst, float(diff.max(initial=0.0))), total + float(diff.sum())
        values, rows, count = values + diff.size, rows + len(got), count + 1
    result = Parity(worst, total / max(values, 1), rows, count)
    if not result.max_abs_diff < tolerance:
        path.unlink()
        raise ValueError(f"{ONE_USER}: ONNX differs from torch by {result.max_abs_diff:.3g}"
                         f" (tolerance {tolerance:g}); export removed")
    return Exported(path, directory / CONTRACT_FILE, contract, result)


def export_user_tower(
    tower: UserTower,
    contract: ModelContract,
    directory: Path,
    batches: Iterable[Sequence[np.ndarray]] | None = None,
    tolerance: float = TOLERANCE,
) -> Exported:
    """Export a :class:`avrec.ranker.model.UserTower` (output ``user_vector``)."""
    if contract.kind != "user_tower":
        raise ValueError(f"a UserTower needs a 'user_tower' contract, not {contract.kind!r}")
    return export_model(tower, contract, directory, batches, tolerance)


def export_item_tower(
    tower: ItemTower,
    contract: ModelContract,
    directory: Path,
    batches: Iterable[Sequence[np.ndarray]] | None = None,
    tolerance: float = TOLERANCE,
) -> Exported:
    """Export a :class:`avrec.ranker.model.ItemTower` (output ``item_tower_vector``)."""
    if contract.kind != "item_tower":
        raise ValueError(f"an ItemTower needs an 'item_tower' contract, not {contract.kind!r}")
    return export_model(tower, contract, directory, batches, tolerance)


def load_model(
    directory: Path,
    feature_fields: Mapping[str, Collection[str]],
    *,
    embedding_version: str | None = None,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
) -> LoadedModel:
    """Load ``<kind>.onnx`` of a model directory and check it against ``contract.json``.

    Refused (:class:`ContractError`) when the model's metadata names another kind or contract,
    the graph's inputs/outputs differ from the contract, a serving feature service lacks a
    field the model reads, or ``embedding_version`` differs from the one trained with.
    """
    directory = Path(directory)
    contract = load_contract(directory / CONTRACT_FILE)
    model = OnnxModel(model_path(directory, contract.kind), threads=threads, providers=providers)
    meta = model.metadata
    stamped = [
        f"model metadata {key}={meta.get(key)!r}, contract says {want!r}"
        for key, want in ((KIND_KEY, contract.kind), (HASH_KEY, contract.version))
        if meta.get(key) != want
    ]
    if stamped:
        raise ContractError(str(model.path), stamped)
    check_contract(
        contract,
        model.session.get_inputs(),
        feature_fields,
        embedding_version=embedding_version,
        onnx_model_outputs=model.session.get_outputs(),
    )
    return LoadedModel(model, contract)
