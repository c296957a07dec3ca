"""avrec.onnx_runtime: provider choice (quiet without CUDA), session options, run/batching."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from avrec import onnx_runtime
from avrec.onnx_runtime import CPU_EP, CUDA_EP, OnnxModel

REPO = Path(__file__).resolve().parents[2]


def tiny_model(path: Path) -> Path:
    """``y = x @ W + 1`` with a dynamic batch axis, and two metadata entries."""
    weights = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "one"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            helper.make_tensor("W", TensorProto.FLOAT, [4, 3], weights.ravel().tolist()),
            helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    helper.set_model_props(model, {"model_name": "tiny", "output_dim": "3"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "tiny.onnx")


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_provider_choice_matches_the_machine() -> None:
    has_device = onnx_runtime.cuda_device_count() > 0
    has_ep = CUDA_EP in ort.get_available_providers()
    expected = [CUDA_EP, CPU_EP] if (has_device and has_ep) else [CPU_EP]
    assert onnx_runtime.default_providers() == expected


def test_session_creation_is_quiet(tiny: Path) -> None:
    """A fresh process creating a session prints nothing (no CUDA errors on a CPU box)."""
    code = (
        "import sys, numpy as np\n"
        "from avrec.onnx_runtime import OnnxModel\n"
        f"m = OnnxModel({str(tiny)!r})\n"
        "y = m.run({'x': np.ones((2, 4), np.float32)})['y']\n"
        "print(m.providers[0], y.shape)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.split()[0] in {CPU_EP, CUDA_EP}


def test_naive_cuda_request_is_what_we_avoid(tiny: Path) -> None:
    """Without a CUDA device, asking onnxruntime-gpu for CUDA logs errors; OnnxModel does not.

    On a machine with a usable GPU the same model must run on the CUDA provider instead, and
    with a CPU-only onnxruntime build the CPU provider is the only choice.
    """
    if onnx_runtime.cuda_usable():
        assert onnx_runtime.OnnxModel(tiny).providers[0] == CUDA_EP
        return
    if CUDA_EP not in ort.get_available_providers():
        assert onnx_runtime.default_providers() == [CPU_EP]
        return
    code = (
        "import onnxruntime as ort\n"
        f"ort.InferenceSession({str(tiny)!r}, providers=['CUDAExecutionProvider',"
        " 'CPUExecutionProvider'])\n"
    )
    assert run_python(code).stderr != ""


def test_device_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(onnx_runtime.DEVICE_ENV, "cpu")
    assert onnx_runtime.default_providers() == [CPU_EP]
    monkeypatch.setenv(onnx_runtime.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="AVREC_ORT_DEVICE"):
        onnx_runtime.default_providers()
    if not onnx_runtime.cuda_usable():
        monkeypatch.setenv(onnx_runtime.DEVICE_ENV, "cuda")
        with pytest.raises(RuntimeError, match="no usable CUDA"):
            onnx_runtime.default_providers()


def test_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(onnx_runtime.THREADS_ENV, raising=False)
    opts = onnx_runtime.session_options()
    assert opts.intra_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv(onnx_runtime.THREADS_ENV, "2")
    assert onnx_runtime.session_options().intra_op_num_threads == 2
    assert onnx_runtime.session_options(threads=3).intra_op_num_threads == 3
    monkeypatch.setenv(onnx_runtime.THREADS_ENV, "0")
    with pytest.raises(ValueError):
        onnx_runtime.default_threads()


def test_run_metadata_and_batching(tiny: Path) -> None:
    model = OnnxModel(tiny, providers=[CPU_EP])
    assert model.providers == [CPU_EP]
    assert model.input_names == ["x"] and model.output_names == ["y"]
    assert model.metadata == {"model_name": "tiny", "output_dim": "3"}
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    expected = x @ np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    np.testing.assert_allclose(model.run({"x": x})["y"], expected, rtol=1e-5)
    for batch in (1, 3, 10, 64):
        np.testing.assert_allclose(model.run_batched({"x": x}, batch)["y"], expected, rtol=1e-5)
    empty = model.run_batched({"x": x[:0]}, 4)["y"]
    assert empty.shape == (0, 3) and empty.dtype == np.float32


def test_errors(tiny: Path, tmp_path: Path) -> None:
    model = OnnxModel(tiny, providers=[CPU_EP])
    with pytest.raises(KeyError, match="missing inputs"):
        model.run({"z": np.ones((1, 4), np.float32)})
    with pytest.raises(ValueError):
        model.run_batched({"x": np.ones((2, 4), np.float32)}, 0)
    with pytest.raises(FileNotFoundError):
        OnnxModel(tmp_path / "nope.onnx")
