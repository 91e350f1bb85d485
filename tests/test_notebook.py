"""The KV-compression notebook runs end to end and draws its figures; it is stored without
outputs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "kv_compression.ipynb"


def test_notebook_is_stored_without_outputs():
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install "
                                   "'quantref[dev]')")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, f"code cell {i} has outputs"


@pytest.mark.model
@pytest.mark.slow  # 100 s of CPU time in QUICK mode, the heaviest test of the suite
def test_notebook_runs_and_draws_its_figures(default_model_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat is not installed (pip install "
                                   "'quantref[dev]')")
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed (pip install "
                                   "'quantref[dev]')")
    pytest.importorskip("ipykernel", reason="ipykernel is not installed (pip install "
                        "'quantref[dev]'): the notebook needs a python3 kernel")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.skip("no 'python3' Jupyter kernelspec (python -m ipykernel install --sys-prefix)")

    # The python3 kernelspec runs "python" from PATH: make that this interpreter, which has
    # quantref. QUICK mode runs every cell on fewer tokens (the full run takes 2-3 minutes).
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep
                       + os.environ.get("PATH", ""))
    monkeypatch.setenv("QUANTREF_NOTEBOOK_QUICK", os.environ.get("QUANTREF_NOTEBOOK_QUICK", "1"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")

    nb = nbformat.read(NOTEBOOK, as_version=4)  # executed in memory: the file is not touched
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        assert cell.execution_count is not None, f"code cell {i} did not run"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"code cell {i}: {errors[0].ename}: {errors[0].evalue}"
    figures = [i for i, c in enumerate(code)
               if any("image/png" in o.get("data", {}) for o in c.outputs)]
    # the heatmaps, the PPL / KL scatter and the memory bars: one figure cell each
    assert len(figures) == 3, f"figures in code cells {figures}, expected 3"
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "turbo_kv_4b/v=q4" in text and "perplexity runs" in text
