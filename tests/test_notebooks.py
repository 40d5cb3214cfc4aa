"""Every notebook in notebooks/ runs top to bottom, small (TF_MOE_SMALL=1).

Each notebook is executed with nbclient in a fresh `python3` kernel of this
interpreter (ipykernel's built-in kernel spec), from the notebooks/ directory,
with a per-cell timeout; any cell error fails the test. The notebooks are
committed with their outputs cleared, which the last test checks.
"""

import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 240  # seconds, per cell


def _kernel_manager():
    """A kernel manager that starts ipykernel with this interpreter.

    No installed kernel spec is needed (`python -m ipykernel install` is not
    required): the kernel is this Python, whatever `python3` spec Jupyter
    would find on the machine.
    """
    from jupyter_client.manager import KernelManager

    manager = KernelManager(kernel_name="python3")
    manager.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f",
                                "{connection_file}"]
    return manager


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_small(path, monkeypatch):
    monkeypatch.setenv("TF_MOE_SMALL", "1")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
        km=_kernel_manager(), resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert not errors


def test_notebooks_exist_and_are_committed_without_outputs():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_", "05_"):
        assert any(name.startswith(prefix) for name in names), names
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name}: clear the outputs before committing "
                    "(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)")
