"""The ONNX models a server runs, loaded with their contracts checked against the feature store.

A model directory written by ``avrec train`` holds ``ranker/`` and, optionally, the retrieval
pair ``user_tower/`` and ``item_tower/`` and the hybrid ranker ``hybrid/``
(:mod:`avrec.ranker.hybrid_pipeline`), which serves ``Recommend`` and ``Rank`` when present.
:func:`load_serving_models` loads each through
:func:`avrec.ranker.export.load_model`, which refuses a model whose graph, contract or required
feature-service fields disagree with what this feature store serves; the three must also share
one feature layout (dense feature names, history length, item vectors). The ranker and the
towers were fitted apart, so each side keeps its own encoder (rating centre).

:class:`ServingModels` scores one user against many items: the user's inputs are broadcast over
the candidates, so a request is one ONNX run.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avrec.onnx_runtime import OnnxModel
from avrec.ranker.contract import ContractError, ModelContract
from avrec.ranker.export import HASH_KEY, KIND_KEY, ONE_USER, LoadedModel, load_model, one_user_path
from avrec.ranker.features import FeatureEncoder
from avrec.ranker.hybrid_pipeline import PipelineError, SavedPipeline

GENRE_PREFIX = "genre_affinity["
VECTOR_FIELDS = {"mixed": "embedding", "asum": "embedding_asum"}


def encoder_from_contract(contract: ModelContract) -> FeatureEncoder:
    """The training-time :class:`FeatureEncoder` a contract describes (names, rating centre)."""
    genres = sum(name.startswith(GENRE_PREFIX) for name in contract.user_dense_names)
    encoder = FeatureEncoder(genres=genres, rating_mean=contract.rating_mean)
    encoder.user_dense_names = list(contract.user_dense_names)
    encoder.item_dense_names = list(contract.item_dense_names[:-1])
    return encoder


@dataclass(frozen=True)
class UserInputs:
    """One user's model inputs: ``user_dense [1, U]``, ``history [1, H, D]``, ``mask [1, H]``."""

    dense: np.ndarray
    history: np.ndarray
    mask: np.ndarray


@dataclass(frozen=True)
class ServingModels:
    """The ranker and (optionally) the retrieval towers, with the encoder they share."""

    directory: Path
    ranker: LoadedModel
    user_tower: LoadedModel | None
    item_tower: LoadedModel | None
    encoder: FeatureEncoder
    tower_encoder: FeatureEncoder | None = None
    one_user: OnnxModel | None = None
    hybrid: SavedPipeline | None = None

    @property
    def contract(self) -> ModelContract:
        return self.ranker.contract

    @property
    def version(self) -> str:
        """``<run directory>/<ranker contract hash>``, plus ``+hybrid-<feature signature>``
        when the hybrid serves."""
        version = f"{self.directory.name}/{self.contract.version}"
        if self.hybrid is not None:
            version += f"+hybrid-{self.hybrid.config.signature}"
        return version

    @property
    def vector_field(self) -> str:
        """The ``item_embedding`` field holding the vectors the models were trained on."""
        name = self.contract.item_vectors
        if name not in VECTOR_FIELDS:
            raise ContractError(str(self.directory), [
                f"the model was trained on {name!r} item vectors; the online store serves "
                f"{sorted(VECTOR_FIELDS)}"
            ])
        return VECTOR_FIELDS[name]

    def score(self, user: UserInputs, vectors: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Logits of one user against ``n`` items (``vectors [n, D]``, ``dense [n, I]``).

        Runs the one-user serving graph when the model directory has it (the user side
        computed once), else the batch-aligned ranker with the user's inputs broadcast.
        """
        if self.one_user is not None:
            feeds = {"user_dense": user.dense, "history": user.history,
                     "history_mask": user.mask, "item_vector": vectors, "item_dense": dense}
            feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
            return self.one_user.run(feeds, ["logit"])["logit"]
        return self.score_batched(user, vectors, dense)

    def score_batched(
        self, user: UserInputs, vectors: np.ndarray, dense: np.ndarray
    ) -> np.ndarray:
        """Logits through the batch-aligned reference graph ``ranker.onnx``."""
        n = len(vectors)
        feeds = {
            "user_dense": np.broadcast_to(user.dense, (n, user.dense.shape[1])),
            "history": np.broadcast_to(user.history, (n, *user.history.shape[1:])),
            "history_mask": np.broadcast_to(user.mask, (n, user.mask.shape[1])),
            "item_vector": vectors,
            "item_dense": dense,
        }
        feeds = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()}
        return self.ranker.run(feeds)

    def user_vector(self, user: UserInputs) -> np.ndarray:
        """The retrieval user tower's unit vector ``[dim]``."""
        assert self.user_tower is not None
        feeds = {"user_dense": user.dense, "history": user.history, "history_mask": user.mask}
        return self.user_tower.run(feeds)[0]

    def item_vectors(self, vectors: np.ndarray, dense: np.ndarray, batch: int = 4096) -> np.ndarray:
        """The retrieval item tower's unit vectors ``[n, dim]``."""
        assert self.item_tower is not None
        parts = [
            self.item_tower.run({"item_vector": vectors[s : s + batch],
                                 "item_dense": dense[s : s + batch]})
            for s in range(0, len(vectors), batch)
        ]
        return np.concatenate(parts).astype(np.float32)


def _same_encoding(ranker: ModelContract, other: ModelContract) -> list[str]:
    found = []
    if other.kind == "user_tower" and other.user_dense_names != ranker.user_dense_names:
        found.append(f"{other.kind} reads other user features than the ranker")
    if other.kind == "item_tower" and other.item_dense_names != ranker.item_dense_names:
        found.append(f"{other.kind} reads other item features than the ranker")
    for attr in ("history", "item_vector_dim", "item_vectors", "embedding_version"):
        if getattr(other, attr) != getattr(ranker, attr):
            found.append(f"{other.kind} {attr}={getattr(other, attr)!r}, "
                         f"ranker {attr}={getattr(ranker, attr)!r}")
    return found


def load_one_user(
    directory: Path, ranker: LoadedModel, threads: int | None, tolerance: float = 1e-4,
    seed: int = 0,
) -> OnnxModel | None:
    """The one-user serving graph next to ``ranker.onnx``, if exported; refused unless it is
    stamped with the ranker's contract and agrees with the reference graph on seeded inputs."""
    path = one_user_path(directory)
    if not path.is_file():
        return None
    model = OnnxModel(path, threads=threads)
    contract = ranker.contract
    found = [f"{path.name}: metadata {key}={model.metadata.get(key)!r}, expected {want!r}"
             for key, want in ((KIND_KEY, ONE_USER), (HASH_KEY, contract.version))
             if model.metadata.get(key) != want]
    if model.input_names != contract.input_names:
        found.append(f"{path.name}: inputs {model.input_names}, contract {contract.input_names}")
    if found:
        raise ContractError(str(directory), found)
    rng = np.random.default_rng(seed)
    n, dims = 16, {"user_dense": len(contract.user_dense_names),
                   "item_dense": len(contract.item_dense_names)}
    user = UserInputs(
        rng.normal(size=(1, dims["user_dense"])).astype(np.float32),
        rng.normal(size=(1, contract.history, contract.item_vector_dim)).astype(np.float32),
        (rng.random((1, contract.history)) < 0.7).astype(np.float32),
    )
    vectors = rng.normal(size=(n, contract.item_vector_dim)).astype(np.float32)
    dense = rng.normal(size=(n, dims["item_dense"])).astype(np.float32)
    reference = ServingModels(directory, ranker, None, None, encoder_from_contract(contract))
    fast = ServingModels(directory, ranker, None, None, reference.encoder, None, model)
    diff = float(np.abs(fast.score(user, vectors, dense)
                        - reference.score(user, vectors, dense)).max())
    if not diff < tolerance:
        raise ContractError(str(directory), [
            f"{path.name} differs from ranker.onnx by {diff:.3g} (tolerance {tolerance:g})"])
    return model


def load_serving_models(
    directory: Path,
    feature_fields: Mapping[str, Collection[str]],
    embedding_version: str | None,
    threads: int | None = None,
    retrieval: bool = True,
    hybrid: bool = True,
) -> ServingModels:
    """Load and check a model directory; raises :class:`ContractError` listing mismatches."""
    directory = Path(directory)
    if not (directory / "ranker").is_dir():
        raise FileNotFoundError(f"{directory} holds no ranker/ (write one with `avrec train`)")
    kwargs = {"embedding_version": embedding_version, "threads": threads}
    ranker = load_model(directory / "ranker", feature_fields, **kwargs)
    one_user = load_one_user(directory / "ranker", ranker, threads)
    towers: dict[str, LoadedModel | None] = {"user_tower": None, "item_tower": None}
    if retrieval:
        for kind in towers:
            if (directory / kind).is_dir():
                towers[kind] = load_model(directory / kind, feature_fields, **kwargs)
    problems = [
        p for t in towers.values() if t for p in _same_encoding(ranker.contract, t.contract)
    ]
    user_tower, item_tower = towers["user_tower"], towers["item_tower"]
    if (user_tower is None) != (item_tower is None):
        problems.append("the retrieval pair is incomplete: need user_tower/ and item_tower/")
    elif user_tower and item_tower and user_tower.contract.rating_mean != (
        item_tower.contract.rating_mean
    ):
        problems.append("the user and item towers centre ratings differently")
    if problems:
        raise ContractError(str(directory), problems)
    pipeline = None
    if hybrid and (directory / "hybrid").is_dir():
        try:
            pipeline = SavedPipeline.read(directory / "hybrid", threads)
        except (PipelineError, FileNotFoundError) as exc:
            raise ContractError(str(directory), [f"hybrid/: {exc}"]) from exc
    models = ServingModels(
        directory, ranker, user_tower, item_tower, encoder_from_contract(ranker.contract),
        encoder_from_contract(user_tower.contract) if user_tower else None, one_user, pipeline,
    )
    _ = models.vector_field
    return models
