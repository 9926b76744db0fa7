"""Sphinx configuration of the gam-optax documentation.

Build it with ``sphinx-build -W -b html docs docs/_build/html`` (warnings are errors). The
guides are sections of the README, included so that there is one source; the API reference
comes from the docstrings; the quick-start notebook is rendered without being executed (the
test suite executes it).
"""

import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

import gam_optax  # noqa: E402

project = "gam-optax"
author = "gam-optax developers"
copyright = "gam-optax developers"
release = gam_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_nb",
]
exclude_patterns = ["_build", "jupyter_execute"]
html_theme = "furo"
html_title = f"gam-optax {release}"

autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tests/test_notebook.py executes it
# The README's sections are pages here: their links to repository files (not pages) and
# their heading levels are the README's; both are fine on GitHub and here.
suppress_warnings = ["myst.xref_missing", "myst.header"]

# The notebook lives in experiments/; Sphinx reads only its own source folder.
notebooks = pathlib.Path(__file__).parent / "notebooks"
notebooks.mkdir(exist_ok=True)
shutil.copy(ROOT / "experiments" / "notebooks" / "gam_quickstart.ipynb", notebooks)
