"""Execute the quick-start notebook in place, so that the documentation shows its outputs.

    python -m experiments.notebooks.refresh    (or: python experiments/notebooks/refresh.py)

Runs every cell in a fresh kernel, in the full setting (not the test suite's quick one),
with this checkout's ``gam_optax`` first on the kernel's path (the install cell then installs
nothing), stores the outputs, and records in the notebook's metadata the SHA-256 of the code
cells' sources it ran. The documentation renders those stored outputs (it does not execute
the notebook); ``tests/experiments/test_notebook.py`` fails when a code cell has changed
since the last refresh. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when a notebook is refreshed: --help works without them
    import nbformat

NOTEBOOK = pathlib.Path(__file__).with_name("gam_quickstart.ipynb")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def source_digest(notebook: nbformat.NotebookNode) -> str:
    """SHA-256 of the code cells' sources, in order: what the stored outputs came from."""
    code = [cell.source for cell in notebook.cells if cell.cell_type == "code"]
    return hashlib.sha256("\n\0".join(code).encode()).hexdigest()


def notebook_modules():
    """``(nbformat, NotebookClient)``; missing: one ``error:`` line naming the extra to install."""
    try:
        import nbformat
        from nbclient import NotebookClient
    except ModuleNotFoundError as e:
        raise SystemExit(
            f"error: refreshing the notebook needs {e.name}, which is not installed; install "
            f'the test extra (nbformat, nbclient, ipykernel): pip install -e ".[test]"'
        ) from None
    return nbformat, NotebookClient


def refresh(path: pathlib.Path = NOTEBOOK) -> None:
    nbformat, NotebookClient = notebook_modules()
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


def make_parser() -> argparse.ArgumentParser:
    """The command line: the notebook to refresh."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.notebooks.refresh",
        description=__doc__.split("\n")[0],
        epilog="Needs nbformat, nbclient and ipykernel (the test extra: pip install -e "
        '".[test]"). About a minute on 2 CPU cores.',
    )
    parser.add_argument(
        "notebook",
        nargs="?",
        metavar="NOTEBOOK",
        type=pathlib.Path,
        default=NOTEBOOK,
        help=f"the notebook to execute in place (default: experiments/notebooks/{NOTEBOOK.name})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if not args.notebook.is_file():
        raise SystemExit(f"error: {args.notebook} does not exist; name a notebook (.ipynb).")
    refresh(args.notebook)


if __name__ == "__main__":
    main()
