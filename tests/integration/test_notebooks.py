"""Every walkthrough notebook runs top to bottom (small settings: DLEAF_QUICK=1)."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_five_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_pairs_are_in_sync(path):
    """Each notebook is a jupytext ``py:percent`` file (the one to edit and review) paired with a
    stripped ``.ipynb``; after an edit, ``jupytext --sync notebooks/*.py`` updates the pair."""
    import ast

    import jupytext

    py = path.with_suffix(".py")
    assert py.is_file(), f"{py.name} missing: run `jupytext --set-formats ipynb,py:percent {path.name}`"
    text = jupytext.read(py)
    nb = nbformat.read(path, as_version=4)
    assert [(c.cell_type, c.source) for c in text.cells] == [(c.cell_type, c.source) for c in nb.cells], \
        f"{path.name} and {py.name} differ: run `jupytext --sync {py}`"
    ast.parse("\n".join(c.source for c in text.cells if c.cell_type == "code"))  # valid Python


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown"  # opens with what it shows
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # outputs stripped in git
    os.environ["DLEAF_QUICK"] = "1"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
