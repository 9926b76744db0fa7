"""The quick-start notebook: it runs as opened, and its stored outputs are current.

* The install cell runs unedited where gam-optax is importable (it installs nothing), in a
  checkout (it installs the checkout), and elsewhere (a wheel beside the notebook; without
  one it stops and says to install from a checkout: no package index serves gam-optax), and
  every pip call it makes keeps the installed jax, jaxlib and their plugins at their
  versions. pip is mocked: nothing is installed.
* The stored outputs, which the documentation shows, came from the code cells as they are
  (``experiments/notebooks/refresh.py`` records their digest).
* The whole notebook executes top to bottom (quick setting, 2 CPU devices).
"""

import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jaxlib
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).parents[2]
NOTEBOOK = ROOT / "experiments" / "notebooks" / "gam_quickstart.ipynb"
REFRESH = "python experiments/notebooks/refresh.py"


def _refresh_module():
    spec = importlib.util.spec_from_file_location("refresh", NOTEBOOK.with_name("refresh.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read():
    return nbformat.read(NOTEBOOK, as_version=4)


def _code(notebook):
    return [cell.source for cell in notebook.cells if cell.cell_type == "code"]


def _text(notebook):
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    return outputs, "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


# ---------------------------------------------------------------------------
# The install cell, run in a subprocess with pip (and, where a case says so, the presence
# of modules and distributions) mocked.
# ---------------------------------------------------------------------------

RUNNER = r"""
import importlib.metadata, importlib.util, json, os, subprocess, sys, types

hidden = set(json.loads(os.environ["HIDE_MODULES"]))
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name in hidden else find_spec(name, *a)
hidden_dists = set(json.loads(os.environ["HIDE_DISTS"]))
extra = [types.SimpleNamespace(name=n, version=v) for n, v in json.loads(os.environ["EXTRA_DISTS"])]
distributions = importlib.metadata.distributions
importlib.metadata.distributions = lambda **k: [
    *(d for d in distributions(**k) if (d.name or "").lower() not in hidden_dists), *extra
]
calls = []


def run(args, **kwargs):
    constraints = args[args.index("-c") + 1]
    with open(constraints) as file:
        calls.append({"args": list(args), "constraints": file.read().split()})
    rc, stderr = int(os.environ["PIP_RC"]), os.environ["PIP_STDERR"]
    return subprocess.CompletedProcess(args, rc, "", stderr)


subprocess.run = run
try:
    exec(compile(os.environ["CELL"], "install-cell", "exec"), {"__name__": "__main__"})
    status = "ok"
except SystemExit as error:
    status = f"exit: {error}"
with open(os.environ["REPORT"], "w") as file:
    json.dump({"calls": calls, "status": status, "path0": sys.path[0]}, file)
"""

INSTALLED_JAX = [f"jax=={jax.__version__}", f"jaxlib=={jaxlib.__version__}"]


def run_install_cell(tmp_path, cwd, *, hide=(), hide_dists=(), extra_dists=(), rc=0, stderr=""):
    report = tmp_path / "report.json"
    env = dict(os.environ)
    env.update(
        CELL=_code(_read())[0],
        REPORT=str(report),
        HIDE_MODULES=json.dumps(list(hide)),
        HIDE_DISTS=json.dumps(list(hide_dists)),
        EXTRA_DISTS=json.dumps(list(extra_dists)),
        PIP_RC=str(rc),
        PIP_STDERR=stderr,
        # gam_optax importable from anywhere: this checkout's (CI installs it editable).
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    done = subprocess.run(
        [sys.executable, "-c", RUNNER], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text())
    result["stdout"] = done.stdout
    for call in result["calls"]:  # pip install, never an upgrade, never jax itself
        args = call["args"]
        assert args[:5] == [sys.executable, "-m", "pip", "install", "-q"]
        assert not {"-U", "--upgrade", "--force-reinstall"} & set(args)
        assert not [a for a in args if re.match(r"(jax|jaxlib|libtpu)\b", a)]
    return result


@pytest.fixture
def outside(tmp_path):
    """A folder outside the checkout (no gam_optax package above it)."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert not any((d / "gam_optax").exists() for d in (folder, *folder.parents))
    return folder


def test_install_cell_is_the_first_and_needs_no_edit():
    notebook = _read()
    first = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert first.source == _code(notebook)[0]
    assert 'importlib.util.find_spec("gam_optax")' in first.source
    assert "REPO" not in first.source and "<" not in first.source  # no placeholder to fill


def test_install_cell_installs_nothing_where_gam_optax_is_installed(tmp_path, outside):
    for cwd in (outside, NOTEBOOK.parent):
        result = run_install_cell(tmp_path, cwd)
        assert result["calls"] == [] and result["status"] == "ok", result
        assert result["stdout"] == ""


def test_install_cell_installs_the_checkout_it_runs_in(tmp_path):
    result = run_install_cell(tmp_path, NOTEBOOK.parent, hide=["gam_optax"])
    (call,) = result["calls"]
    assert call["args"][5:7] == ["-e", str(ROOT.resolve())]
    assert set(INSTALLED_JAX) <= set(call["constraints"])  # jax and jaxlib kept
    assert result["status"] == "ok"
    assert result["path0"] == str(ROOT.resolve())  # importable at once, without a restart


def test_install_cell_elsewhere_installs_the_wheel_and_keeps_the_accelerator_jax(tmp_path, outside):
    wheel = outside / "gam_optax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    accelerator = [
        ("jax-cuda12-plugin", "0.10.2"),
        ("libtpu", "0.0.21"),
        ("jaxtyping", "0.3"),  # not a jax build: not pinned
        ("libtpu", "0.0.1"),  # shadowed by the first on sys.path
        (None, "1.0"),  # broken metadata
    ]
    result = run_install_cell(
        tmp_path, outside, hide=["gam_optax", "flax"], extra_dists=accelerator
    )
    (call,) = result["calls"]
    assert call["args"][5:] == ["flax", str(wheel.resolve()), "-c", call["args"][-1]]
    pins = set(call["constraints"])
    assert {*INSTALLED_JAX, "jax-cuda12-plugin==0.10.2", "libtpu==0.0.21"} <= pins
    assert not [pin for pin in pins if pin.startswith("jaxtyping")]  # not a jax build
    assert [pin for pin in call["constraints"] if pin.startswith("libtpu")] == ["libtpu==0.0.21"]
    assert "kept as installed: jax" in result["stdout"]


def test_install_cell_installs_a_wheel_beside_the_notebook(tmp_path, outside):
    wheel = outside / "gam_optax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    (call,) = run_install_cell(tmp_path, outside, hide=["gam_optax"])["calls"]
    assert call["args"][5] == str(wheel.resolve())


def test_install_cell_elsewhere_without_a_wheel_says_to_install_from_a_checkout(tmp_path, outside):
    """No package index serves gam-optax: the cell asks no index for it (a name taken there
    by someone else would be installed), and says where it comes from."""
    result = run_install_cell(tmp_path, outside, hide=["gam_optax"])
    assert result["calls"] == []
    assert result["status"].startswith("exit: gam-optax installs from a checkout")
    assert 'pip install -e ".[experiments]"' in result["status"]
    assert "python -m build --wheel" in result["status"]


def test_install_cell_failures_say_what_to_do(tmp_path, outside):
    (outside / "gam_optax-0.1.0-py3-none-any.whl").write_bytes(b"")
    conflict = "ERROR: Cannot install gam-optax because these package versions have conflicts"
    result = run_install_cell(tmp_path, outside, hide=["gam_optax"], rc=1, stderr=conflict)
    assert "It may not change jax/jaxlib" in result["status"]
    assert conflict in result["stdout"]  # pip's own words are shown


def test_install_cell_without_jax_lets_pip_install_it(tmp_path, outside):
    (outside / "gam_optax-0.1.0-py3-none-any.whl").write_bytes(b"")
    result = run_install_cell(tmp_path, outside, hide=["gam_optax"], hide_dists=["jax", "jaxlib"])
    (call,) = result["calls"]
    assert call["constraints"] == [] and "no jax yet" in result["stdout"]


# ---------------------------------------------------------------------------
# What it teaches, and its stored outputs.
# ---------------------------------------------------------------------------


def test_notebook_teaches_linen_with_the_train_state_and_nnx_and_installs_from_a_checkout():
    notebook = _read()
    code = _code(notebook)
    imports = [
        line for cell in code for line in cell.splitlines() if line.startswith(("import", "from"))
    ]
    # It teaches the library: the model, loss, chain and step are written in the notebook,
    # and it needs gam_optax, not the repository's experiments package.
    assert "import gam_optax" in imports and not [line for line in imports if "experiments" in line]
    joined = "\n".join(code)
    assert "gam_optax.gam(" in joined
    assert "gam_optax.flax.TrainState.create(" in joined
    assert "state.apply_gradients(grads=g0, loss_fn=loss_fn, batch_stats=batch_stats)" in joined
    assert "nnx.Optimizer(" in joined and "gam_optax.flax.nnx_loss_fn(model, loss)" in joined
    assert "optimizer.update(model, g0, loss_fn=loss_fn)" in joined
    # It has no home outside a checkout: no badge or link to a hosted copy, and no package
    # index to install from.
    markdown = "\n".join(c.source for c in notebook.cells if c.cell_type == "markdown")
    assert "colab.research.google.com" not in markdown and "REPLACE-WITH" not in markdown
    assert 'pip install -e ".[experiments]"' in markdown
    assert not re.search(r"pip install (-U )?[\"']?gam-optax\b", markdown + joined)


def _check_outputs(notebook, epochs):
    outputs, text = _text(notebook)
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the curves
    num_train = int(next(line for line in text.splitlines() if "training and" in line).split()[0])
    for name in ("sgd", "gam", "nnx gam"):
        line = next(line for line in text.splitlines() if line.startswith(f"{name}: test accuracy"))
        accuracy, steps = float(line.split()[-3].rstrip(",")), int(line.split()[-2])
        assert steps == epochs * (num_train // 64)  # epochs of batch 64
        assert 0.5 < accuracy <= 1.0  # it learned (chance is 0.1)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("optimizer"))
    assert lines[header].split()[1:5] == ["test", "accuracy", "top", "eigenvalue"]
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert [row[0] for row in rows] == ["sgd", "gam"]
    for row in rows:
        values = [float(v) for v in row[1:]]
        assert len(values) == 4 and all(math.isfinite(v) for v in values)
        assert values[1] > 0  # the top eigenvalue of a trained network's loss
    return text


def test_stored_outputs_are_current_and_complete():
    """The documentation shows the stored outputs: the full setting, from these cells."""
    notebook = _read()
    recorded = notebook.metadata.get("gam_optax", {}).get("executed_sources_sha256")
    assert recorded == _refresh_module().source_digest(notebook), (
        f"a code cell changed since the stored outputs were made: run {REFRESH}"
    )
    text = _check_outputs(notebook, epochs=15)
    assert "JAX" in text and "QUICK" not in text
    outputs, _ = _text(notebook)
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    install = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert install.outputs == []  # gam-optax was importable: the cell installed nothing


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("GAM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "2")  # the kernel trains data-parallel, as on a TPU
    # This checkout's gam_optax: the install cell finds it and installs nothing.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    notebook = _read()
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    text = _check_outputs(notebook, epochs=3)
    assert "data-parallel over 2 device(s)" in text
    assert "pip install" not in text
