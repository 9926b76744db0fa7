"""Sphinx configuration of the gam-optax documentation.

Build it with ``pip install -e ".[docs]" && sphinx-build -W --keep-going -b html docs
docs/_build/html`` (the README's command; warnings are errors, and none is suppressed). Each
guide includes its section of the README, so that there is one source, and continues with
what the README leaves out; CONTRIBUTING.md is a page too. The API reference comes from the
docstrings (autodoc imports ``gam_optax.flax``: the ``docs`` extra installs Flax); the
quick-start notebook is rendered without being executed (the test suite executes it).

The build needs no network: the links to the jax, optax and flax documentation
(intersphinx) come from the small inventories in ``docs/inventories/``, one line per name
this documentation refers to, compiled here into the ``objects.inv`` format. Nor does the
site: no page loads a script, a stylesheet or an image from elsewhere. The maths is typeset
by the MathJax 3 that ``sphinx-mathjax-offline`` (the ``docs`` extra) copies into
``_static/mathjax``; Sphinx's default loads MathJax from a CDN, and offline the maths then
shows as raw LaTeX. ``tests/test_docs.py`` checks the built site.
"""

import inspect
import pathlib
import re
import shutil
import sys
import tempfile
import zlib

import sphinx.util.inspect

DOCS = pathlib.Path(__file__).parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import gam_optax  # noqa: E402

project = "gam-optax"
author = "gam-optax developers"
copyright = "gam-optax developers"
release = gam_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # sets mathjax_path to its own copy of MathJax: the site's
    "sphinx.ext.viewcode",
    "myst_nb",
]
exclude_patterns = ["_build", "jupyter_execute", "inventories"]
html_theme = "furo"
html_title = f"gam-optax {release}"

autodoc_typehints = "description"
# Types for the documented parameters only: not the expanded field types of the Flax
# TrainState that gam_optax.flax.TrainState extends.
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
# Signatures keep the names of type aliases (the modules use `from __future__ import
# annotations`, so autodoc sees these strings) instead of expanding them.
autodoc_type_aliases = {
    "jax.Array": "jax.Array",
    "optax.GradientTransformation": "optax.GradientTransformation",
    "optax.GradientTransformationExtraArgs": "optax.GradientTransformationExtraArgs",
    "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
    "optax.Schedule": "optax.Schedule",
    "optax.Params": "optax.Params",
    "optax.Updates": "optax.Updates",
    "optax.OptState": "optax.OptState",
    "Average": "Literal['direction', 'gradients']",
    "Mask": "Mask",
    "HMinusWeighting": "Literal['released', 'paper']",
    "nnx.Module": "flax.nnx.Module",
}
# An alias inside a union (``optax.ScalarOrSchedule | None``) is written with its repr by
# Sphinx 9.0 ("TypeAliasForwardRef('optax.ScalarOrSchedule') | None"); its name reads better.
sphinx.util.inspect.TypeAliasForwardRef.__repr__ = lambda self: self.name
napoleon_google_docstring = True
napoleon_numpy_docstring = False

myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # tests/experiments/test_notebook.py executes it

# The notebook lives in experiments/; Sphinx reads only its own source folder.
notebooks = DOCS / "notebooks"
notebooks.mkdir(exist_ok=True)
shutil.copy(ROOT / "experiments" / "notebooks" / "gam_quickstart.ipynb", notebooks)


# -- Intersphinx, offline ----------------------------------------------------------------


def _compile_inventory(source: pathlib.Path, target: pathlib.Path) -> None:
    """``docs/inventories/NAME.txt`` -> a Sphinx ``objects.inv`` (version 2)."""
    lines = [
        line
        for line in source.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    header = (
        f"# Sphinx inventory version 2\n# Project: {source.stem}\n# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    body = zlib.compress("".join(line + "\n" for line in lines).encode("utf-8"))
    target.write_bytes(header.encode("utf-8") + body)


_inventories = pathlib.Path(tempfile.mkdtemp(prefix="gam-optax-inventories-"))
INTERSPHINX_SITES = {
    "jax": "https://docs.jax.dev/en/latest/",
    "optax": "https://optax.readthedocs.io/en/latest/",
    "flax": "https://flax.readthedocs.io/en/latest/",
    "python": "https://docs.python.org/3/",
}
intersphinx_mapping = {}
for _name, _url in INTERSPHINX_SITES.items():
    _compile_inventory(DOCS / "inventories" / f"{_name}.txt", _inventories / f"{_name}.inv")
    intersphinx_mapping[_name] = (_url, str(_inventories / f"{_name}.inv"))


# -- The README's sections as pages ------------------------------------------------------

# The README's and CONTRIBUTING.md's links to repository files that are pages here, from
# the repository's root: each guide ``docs/guides/NAME.md`` is the page ``/guides/NAME``.
README_LINKS = {
    "experiments/RESULTS.md": "/results.md",
    "CONTRIBUTING.md": "/contributing.md",
    "README.md": "/index.md",
    **{
        f"docs/guides/{guide.name}": f"/guides/{guide.name}"
        for guide in sorted((DOCS / "guides").glob("*.md"))
    },
}


# Where the README's pointer to a guide leads inside that guide, which includes the pointer
# itself: the target (a MyST ``(label)=`` in the guide) of the section the pointer means.
GUIDE_CONTINUATIONS = {
    "install": "install-why",
    "family": "family-in-detail",
    "flax": "flax-in-detail",
    "data_parallel": "data-parallel-program",
    "performance": "performance-costs",
    "experiments": "experiments-in-detail",
}


def _readme_as_guide(app, relative_path, parent_docname, content):
    """The README (or CONTRIBUTING.md) included in a page: its links to repository files that
    are pages here lead to those pages, and in a guide the README's ``###`` subsections
    become ``##`` (the page title is the README's ``##``). A guide links to itself nowhere:
    the README's pointer to the guide that includes it becomes "below", to the section meant."""
    if pathlib.Path(relative_path).name not in ("README.md", "CONTRIBUTING.md"):
        return
    text = content[0]
    # MyST names the including page by its file's stem ("flax"), Sphinx by its docname.
    guide = pathlib.Path(parent_docname).name
    own = f"docs/guides/{guide}.md"
    if own in README_LINKS:
        label = GUIDE_CONTINUATIONS[guide]  # a new guide that includes the README: add it
        text = re.sub(rf"\[[^\]]*\]\({re.escape(own)}\)", f"[below](#{label})", text)
    for file, page in README_LINKS.items():
        text = text.replace(f"]({file})", f"]({page})")
    if pathlib.Path(relative_path).name == "README.md" and parent_docname != "index":
        out, fenced = [], False
        for line in text.splitlines():
            if line.startswith("```"):
                fenced = not fenced
            if not fenced and re.match(r"###+ ", line):
                line = line[1:]
            out.append(line)
        text = "\n".join(out) + "\n"
    content[0] = text


def _no_builtin_docstring(app, what, name, obj, options, lines):
    """A module constant (``GAM_PRESETS``, a dict) has no docstring of its own: autodoc
    would show ``dict``'s. Its description is in api.md."""
    if what == "data" and lines and type(obj).__doc__:
        if "\n".join(lines).split() == inspect.cleandoc(type(obj).__doc__).split():
            lines.clear()


def setup(app):
    app.connect("include-read", _readme_as_guide)
    app.connect("autodoc-process-docstring", _no_builtin_docstring)
