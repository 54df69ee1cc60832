"""The quickstart notebook executes top to bottom and shows pictures (reconstructions and loss curves)."""

from __future__ import annotations

import shutil

import nbformat
from nbclient import NotebookClient

from tests.conftest import REPO


def test_quickstart_notebook_runs_and_shows_pictures(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("WANDB_MODE", "offline")
    shutil.copy(REPO / "notebooks" / "quickstart.ipynb", tmp_path)
    notebook = nbformat.read(tmp_path / "quickstart.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell if any cell fails
    pictures = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) >= 2, "expected the reconstruction grid and the loss curve as images"
    assert (tmp_path / "runs" / "ae_digits" / "quickstart" / "checkpoints" / "last.ckpt").is_file()
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "online linear probe accuracy" in text
