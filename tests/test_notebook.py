"""The Colab/TPU quick-start notebook runs top to bottom (3 epochs, 2 CPU devices)."""

import math
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).parents[1] / "experiments" / "notebooks" / "gam_quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("GAM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")  # the kernel trains data-parallel, as on a TPU
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    imports = [
        line for cell in code for line in cell.splitlines() if line.startswith(("import", "from"))
    ]
    # It teaches the library: the model, loss, chain and step are written in the notebook,
    # and it needs gam_optax, not the repository's experiments package.
    assert "import gam_optax" in imports and not [line for line in imports if "experiments" in line]
    assert any("gam_optax.gam(" in cell for cell in code)
    assert any("tx.update(g0, state.opt_state, state.params, loss_fn=loss_fn)" in c for c in code)
    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the curves
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "data-parallel over 2 device(s)" in text
    num_train = int(next(line for line in text.splitlines() if "training and" in line).split()[0])
    for name in ("sgd", "gam"):
        line = next(line for line in text.splitlines() if line.startswith(f"{name}: test accuracy"))
        accuracy, steps = float(line.split()[3].rstrip(",")), int(line.split()[4])
        assert steps == 3 * (num_train // 64)  # 3 epochs of batch 64
        assert 0.5 < accuracy <= 1.0  # it learned (chance is 0.1)
    flatness_lines = [line for line in text.splitlines() if "top eigenvalue" in line]
    assert [line.split(":")[0] for line in flatness_lines] == ["sgd", "gam"]
    for line in flatness_lines:
        values = [float(part.split()[-1]) for part in line.split(":")[1].split(",")]
        assert len(values) == 3 and all(math.isfinite(v) for v in values)
        assert values[0] > 0  # the top eigenvalue of a trained network's loss
