"""The teaching notebooks execute headless, without error, and show their plots.

Each jupytext source docs/notebooks/NN_*.py is converted to a notebook, executed by
nbclient in a fresh kernel (the Python running the tests), and written, executed, to
build/notebooks/ (ignored by git) for a reader to open. A cell error fails the test; so
does a notebook whose executed output holds no image.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "docs" / "notebooks").glob("[0-9][0-9]_*.py"))
BUILD = ROOT / "build" / "notebooks"

jupytext = pytest.importorskip("jupytext", reason="the notebooks extra is not installed")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed")
pytest.importorskip("matplotlib", reason="the notebooks extra is not installed")


def test_there_are_four_notebooks():
    assert [p.name[:2] for p in SOURCES] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_executes_and_shows_plots(source):
    notebook = jupytext.read(source)
    # "python3" runs the interpreter running the tests (jupyter_client substitutes
    # sys.executable), so the kernel sees the installed project
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(source.parent)}})
    # inline figures, even where the caller's environment sets a non-interactive backend
    env = {**os.environ, "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    try:
        client.execute(env=env)
    finally:  # keep what ran, also when a cell failed
        BUILD.mkdir(parents=True, exist_ok=True)
        jupytext.write(notebook, BUILD / f"{source.stem}.ipynb")
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert images, f"{source.name} shows no plot in its executed output"
