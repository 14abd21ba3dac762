"""The notebooks: stored without outputs, and each runs top to bottom on the bundled model.

Execution uses nbclient with the current interpreter's ``python3`` kernel (the same as
``pytest --nbmake notebooks/``). It needs the bundled model; without it the execution
tests skip.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_inspector", "03_entity_vs_relation", "04_editing", "05_teaching_demo"]


def test_all_notebooks_present():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped(path):
    nbformat = pytest.importorskip("nbformat")
    book = nbformat.read(path, as_version=4)
    nbformat.validate(book)
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    from workbench.loading import ModelLoadError, bundled_path

    try:
        bundled_path()
    except ModelLoadError:
        pytest.skip("bundled model not built yet")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    book = nbformat.read(path, as_version=4)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The kernel inherits this: one thread is fastest for the small bundled model, and far
    # faster than several on a busy machine (threads spin-wait for each other).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The kernel imports this checkout's package, whatever the install state of the venv.
    root = str(path.parent.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    started = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - started
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    print(f"{path.name}: {elapsed:.1f} s")
