"""The one way avrec runs ONNX models: provider choice, session options and batching.

Every ONNX model in avrec (encoders, ranker, the gRPC server) goes through :class:`OnnxModel`.
This module imports neither torch nor transformers.

Provider choice is quiet: CUDA is only requested when onnxruntime was built with it AND the
driver (``libcuda``) reports at least one device; otherwise the CPU provider is used without
the error lines onnxruntime-gpu prints when asked for CUDA on a machine that has none.

Environment:

- ``AVREC_ORT_THREADS``: intra-op threads per session (default 1, suited to a small box
  serving several requests at once; batch jobs may pass ``threads`` explicitly).
- ``AVREC_ORT_DEVICE``: ``auto`` (default), ``cpu`` or ``cuda``.
- ``AVREC_ORT_SPIN``: ``1`` lets idle intra-op threads spin-wait (onnxruntime's default);
  avrec turns spinning off because on a small shared box spinning threads steal the cores
  the other threads and processes need (measured: 2 threads under load went from ~90 to
  ~150 images/s with spinning off).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

THREADS_ENV = "AVREC_ORT_THREADS"
DEVICE_ENV = "AVREC_ORT_DEVICE"
SPIN_ENV = "AVREC_ORT_SPIN"
CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
_LIBCUDA_NAMES = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports; 0 when there is no driver or no device."""
    for name in _LIBCUDA_NAMES:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        try:
            if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
                return 0
        except AttributeError:
            return 0
        return int(count.value)
    return 0


@functools.cache
def cuda_usable() -> bool:
    """True when onnxruntime has the CUDA provider and a CUDA device is really present."""
    if CUDA_EP not in ort.get_available_providers():
        return False
    if cuda_device_count() < 1:
        return False
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.suppress(Exception):
            preload(cuda=True, cudnn=True)
        if sink.getvalue().strip():
            log.debug("onnxruntime.preload_dlls: %s", sink.getvalue().strip())
    return True


def default_providers() -> list[str]:
    """Providers to request: CUDA then CPU when CUDA is usable, else CPU only."""
    device = os.environ.get(DEVICE_ENV, "auto").strip().lower()
    if device not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"{DEVICE_ENV} must be auto, cpu or cuda, not {device!r}")
    if device == "cpu":
        return [CPU_EP]
    if cuda_usable():
        return [CUDA_EP, CPU_EP]
    if device == "cuda":
        raise RuntimeError(f"{DEVICE_ENV}=cuda but no usable CUDA device/provider was found")
    return [CPU_EP]


def default_threads() -> int:
    """Intra-op threads per session: ``AVREC_ORT_THREADS`` or 1."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return 1
    threads = int(raw)
    if threads < 1:
        raise ValueError(f"{THREADS_ENV} must be >= 1, not {threads}")
    return threads


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Session options for a small CPU box: few threads that do not spin, sequential execution,
    all graph optimisations."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    spin = "1" if os.environ.get(SPIN_ENV, "").strip() == "1" else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


class OnnxModel:
    """One ONNX model loaded in an onnxruntime session.

    >>> model = OnnxModel("encoder.onnx")  # doctest: +SKIP
    >>> model.run({"pixel_values": batch})["image_embedding"]  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.path}")
        requested = list(providers) if providers is not None else default_providers()
        self.session = ort.InferenceSession(
            str(self.path), sess_options=session_options(threads), providers=requested
        )
        if CUDA_EP in requested and CUDA_EP not in self.session.get_providers():
            log.warning("CUDA requested for %s but onnxruntime fell back to CPU", self.path.name)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        """Execution providers the session actually uses, in priority order."""
        return list(self.session.get_providers())

    @functools.cached_property
    def metadata(self) -> dict[str, str]:
        """The model's ``metadata_props`` (custom metadata map)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def run(
        self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run once; returns ``{output name: array}`` for ``outputs`` (default: all)."""
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise KeyError(f"{self.path.name}: missing inputs {sorted(missing)}")
        names = list(outputs) if outputs is not None else self.output_names
        values = self.session.run(names, {k: feeds[k] for k in self.input_names})
        return dict(zip(names, values, strict=True))

    def run_batched(
        self,
        feeds: Mapping[str, np.ndarray],
        batch_size: int,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run over axis 0 of every feed in slices of ``batch_size``; outputs are concatenated."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        sizes = {len(feeds[k]) for k in self.input_names}
        if len(sizes) != 1:
            raise ValueError(f"feeds disagree on batch size: {sorted(sizes)}")
        (total,) = sizes
        names = list(outputs) if outputs is not None else self.output_names
        if total == 0:
            return {n: self._empty_output(n) for n in names}
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, total, batch_size):
            chunk = {k: feeds[k][start : start + batch_size] for k in self.input_names}
            for name, value in self.run(chunk, names).items():
                parts[name].append(value)
        return {n: np.concatenate(v, axis=0) for n, v in parts.items()}

    def _empty_output(self, name: str) -> np.ndarray:
        meta = next(o for o in self.session.get_outputs() if o.name == name)
        tail = meta.shape[1:]
        if not all(isinstance(d, int) for d in tail):
            raise ValueError(f"{name}: cannot shape an empty batch with dynamic dims {meta.shape}")
        return np.zeros((0, *tail), dtype=_ORT_DTYPES.get(meta.type, np.float32))

    def __repr__(self) -> str:
        return f"OnnxModel({self.path.name!r}, providers={self.providers})"
