"""The notebooks execute top to bottom and show their pictures.

quickstart: the default autoencoder, reconstructions and loss curves; ssl_digits: SimCLR's views,
PCA of trained vs random-init embeddings, probe and kNN scores."""

from __future__ import annotations

import shlex
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO, lgen_env, run_lgen

NOTEBOOKS = {
    # name: (pictures at least, checkpoint the run leaves, text its outputs must show)
    "quickstart": (2, "runs/ae_digits/quickstart/checkpoints/last.ckpt", "online linear probe accuracy"),
    "ssl_digits": (3, "runs/simclr_digits/notebook/checkpoints/last.ckpt", "probe, 10 labels/class"),
}


EVAL_COMMANDS = {"quickstart": 0, "ssl_digits": 2}  # `lgen eval` commands each notebook shows


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
    # The shell commands the notebook shows (its text and its output) run as written, on its checkpoint.
    shown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown") + "\n" + text
    commands = sorted({line.strip() for line in shown.splitlines() if line.strip().startswith("lgen eval ")})
    assert len(commands) >= EVAL_COMMANDS[name], commands
    for command in commands:
        run_lgen(*shlex.split(command)[1:], cwd=tmp_path, env=lgen_env(OMP_NUM_THREADS="1"))
