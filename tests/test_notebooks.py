"""The notebooks: each `.ipynb` matches its jupytext source and runs top to bottom on the CPU.

The source of a notebook is `notebooks/<name>.py` (jupytext percent format); the `.ipynb` beside
it is the same cells with their outputs. After editing either, bring the other up to date with
`jupytext --sync notebooks/<name>.py` (and refresh the outputs with
`cd notebooks && jupyter-execute --inplace <name>.ipynb`).
"""

import glob
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "notebooks")
NAMES = ["01_loss", "02_saturation"]


def _cells(notebook):
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_every_notebook_has_its_source_and_no_other_files():
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*")))
    assert found == sorted(f"{name}.{ext}" for name in NAMES for ext in ("ipynb", "py"))


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_its_source(name):
    source = jupytext.read(os.path.join(NOTEBOOK_DIR, f"{name}.py"), fmt="py:percent")
    notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"), as_version=4)
    assert _cells(notebook) == _cells(source), (
        f"notebooks/{name}.ipynb and notebooks/{name}.py differ: edit one, then run "
        f"`jupytext --sync notebooks/{name}.py`"
    )
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"  # paired


def _execute(name):
    notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"), as_version=4)
    # kernel "python3" is the interpreter running pytest: jupyter_client replaces the kernel
    # spec's bare "python" by sys.executable, so the notebook sees this virtualenv.
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    code_cells = _execute(name)
    outputs = [output for cell in code_cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    assert [output for output in outputs if "image/png" in output.get("data", {})], (
        "the notebook draws no figure")
    if name == "01_loss":
        # Its first cell installs the library only where it is missing: not here.
        assert "noisy_softmax_jax" in code_cells[0].source
        assert code_cells[0].get("outputs") == []
