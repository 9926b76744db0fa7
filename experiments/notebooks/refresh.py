"""Execute the quick-start notebook in place, so that the documentation shows its outputs.

    python experiments/notebooks/refresh.py

Runs every cell in a fresh kernel, in the full setting (not the test suite's quick one),
with this checkout's ``gam_optax`` first on the kernel's path (the install cell then installs
nothing), stores the outputs, and records in the notebook's metadata the SHA-256 of the code
cells' sources it ran. The documentation renders those stored outputs (it does not execute
the notebook); ``tests/experiments/test_notebook.py`` fails when a code cell has changed
since the last refresh. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import sys

import nbformat

NOTEBOOK = pathlib.Path(__file__).with_name("gam_quickstart.ipynb")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def source_digest(notebook: nbformat.NotebookNode) -> str:
    """SHA-256 of the code cells' sources, in order: what the stored outputs came from."""
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    return hashlib.sha256("\n\0".join(code).encode()).hexdigest()


def refresh(path: pathlib.Path = NOTEBOOK) -> None:
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    env = {key: value for key, value in os.environ.items() if key != "GAM_NOTEBOOK_QUICK"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    previous = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(
            notebook,
            timeout=1800,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        ).execute()
    finally:
        os.environ.clear()
        os.environ.update(previous)
    notebook.metadata["gam_optax"] = {"executed_sources_sha256": source_digest(notebook)}
    nbformat.write(notebook, path)
    print(f"refreshed {path}")


if __name__ == "__main__":
    refresh(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else NOTEBOOK)
