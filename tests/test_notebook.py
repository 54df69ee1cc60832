"""The notebooks execute top to bottom and show their pictures.

quickstart: the default autoencoder, reconstructions and loss curves; ssl_digits: SimCLR's views,
PCA of trained vs random-init embeddings, probe and kNN scores."""

from __future__ import annotations

import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO

NOTEBOOKS = {
    # name: (pictures at least, checkpoint the run leaves, text its outputs must show)
    "quickstart": (2, "runs/ae_digits/quickstart/checkpoints/last.ckpt", "online linear probe accuracy"),
    "ssl_digits": (3, "runs/simclr_digits/notebook/checkpoints/last.ckpt", "probe, 10 labels/class"),
}


@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_and_shows_pictures(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("WANDB_MODE", "offline")
    shutil.copy(REPO / "notebooks" / f"{name}.ipynb", tmp_path)
    notebook = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell if any cell fails
    min_pictures, checkpoint, marker = NOTEBOOKS[name]
    pictures = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) >= min_pictures
    assert (tmp_path / checkpoint).is_file()
    text = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert marker in text
