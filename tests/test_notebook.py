"""The quickstart notebook, executed end to end on tiny weights the command line makes."""

from __future__ import annotations

import os
import re
import shutil

import nbformat
import pytest
from nbclient import NotebookClient
from test_main import ROOT

# The command line or another program in a process of its own: `-m 'not e2e'` skips them.
pytestmark = pytest.mark.e2e

NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, fmnist_source, pretrained_tiny, monkeypatch):
    data_dir = tmp_path / "tfds"
    workdir = tmp_path / "work"
    # The notebook finds the pre-trained tiny model where a pretrain run leaves it.
    shutil.copytree(pretrained_tiny[0].parent, workdir / "pretrain")
    for name, value in {
        "JJ_WORKDIR": workdir,
        "JJ_DATA_DIR": data_dir,
        "JJ_SOURCE_DIR": fmnist_source,
        "JJ_NUM_TRAIN": 128,
        "JJ_NUM_EVAL": 100,
        "JJ_STEPS": 6,
        "JJ_BATCH": 32,
    }.items():
        monkeypatch.setenv(name, str(value))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3").execute(
        cwd=os.path.join(ROOT, "notebooks")
    )
    text = "\n".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream"
    )
    accuracies = dict(re.findall(r"^(.+?): (\d+\.\d\d)%$", text, re.M))
    assert set(accuracies) == {"dense", "magnitude pruning, no search", "jackpot after 6 steps"}
    assert all(0 <= float(a) <= 100 for a in accuracies.values())
    assert float(accuracies["dense"]) > 30  # the band task of the tiny data is easy
    # The sparsity tables: of the budget, and of the masks found (the same counts).
    assert text.count("| **total over masked layers** | 205456 | 20545 | 90.00% |") == 2
    assert "IoU with the magnitude mask:" in text
    images = [
        out
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if "image/png" in out.get("data", {})
    ]
    assert len(images) == 1  # the loss and churn plot
