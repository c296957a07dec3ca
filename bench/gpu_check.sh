#!/usr/bin/env bash
# CUDA readiness: CUDA vs CPU execution provider parity and speed for every avrec ONNX model.
#
#   bash bench/gpu_check.sh [--models data/models] [--repeats 20]
#
# Python: $AVREC_PYTHON, else the project venv (~/.cache/avrec/venv) when it has onnxruntime,
# else a small venv (~/.cache/avrec/gpu-venv) with onnxruntime-gpu, numpy, polars and duckdb from
# $WHEELS (a directory of wheels, for machines without an index) or from pip's index.
# Models: the ONNX files `avrec embed` and `avrec train` wrote under data/models (copy them
# over on a machine that cannot build them). Without a CUDA device it is a dry run (exit 0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${AVREC_PYTHON:-$HOME/.cache/avrec/venv/bin/python}"
if ! "$PY" -c "import onnxruntime, numpy, polars, duckdb" 2>/dev/null; then
  GPU_VENV="$HOME/.cache/avrec/gpu-venv"
  test -x "$GPU_VENV/bin/python" || python3 -m venv "$GPU_VENV"
  PY="$GPU_VENV/bin/python"
  if ! "$PY" -c "import onnxruntime, numpy, polars, duckdb" 2>/dev/null; then
    if [ -n "${WHEELS:-}" ]; then
      "$PY" -m pip install -q --no-index --find-links "$WHEELS" onnxruntime-gpu numpy polars duckdb
    else
      "$PY" -m pip install -q onnxruntime-gpu numpy polars duckdb
    fi
  fi
fi
if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
exec "$PY" bench/gpu_check.py "$@"
