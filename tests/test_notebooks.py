"""The analysts' notebook runs top to bottom against the real feature store (it never rots)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import polars as pl
import pytest
from nbclient import NotebookClient

from avrec import config

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "training_sets.ipynb"


def _outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") or str(o.get("data", {}).get("text/plain", ""))
                     for cell in notebook.cells if cell.cell_type == "code"
                     for o in cell.get("outputs", []))


@pytest.mark.usefixtures("feature_store")
def test_training_sets_notebook_runs(tmp_path: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
    # the kernel inherits this process's environment: AVREC_DATA_DIR and REDIS_URL of the tests
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    text = _outputs(notebook)
    assert "test AUC" in text
    auc = float(text.split("test AUC ")[1].split()[0])
    assert 0.55 < auc <= 1.0, auc  # behaviour features separate likes from sampled negatives
    images = [o for cell in notebook.cells for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2, "label balance and feature-over-time figures"
    written = pl.read_parquet(config.data_dir() / "training_sets" / "notebook.parquet")
    assert written.height > 0
    assert {"label", "label_timestamp", "sample_type"} <= set(written.columns)
