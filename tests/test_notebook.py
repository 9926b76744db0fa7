"""The Colab/TPU quick-start notebook runs top to bottom (1 epoch, 2 CPU devices)."""

import json
import math
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parents[1] / "experiments" / "notebooks" / "gam_quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("GAM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("GAM_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")  # the kernel trains data-parallel, as on a TPU
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parents[2])}},
    ).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the curves
    for name in ("sgd", "gam"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1 and "test_accuracy" in json.loads(lines[-1])
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "parallel='jit' on 2 device(s)" in text
    flatness_lines = [line for line in text.splitlines() if "top eigenvalue" in line]
    assert [line.split(":")[0] for line in flatness_lines] == ["sgd", "gam"]
    for line in flatness_lines:
        values = [float(part.split()[-1]) for part in line.split(":")[1].split(",")]
        assert len(values) == 3 and all(math.isfinite(v) for v in values)
        assert values[0] > 0  # the top eigenvalue of a trained network's loss
