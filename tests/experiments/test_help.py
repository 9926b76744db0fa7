"""``--help`` of every program in experiments/: exit status 0, a usage line that names the
command to type (``python -m experiments...``), plain text (no reStructuredText double
backticks), and a description of every flag. Every other module says, when run, that it is
no program and which one to run instead."""

import argparse
import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[2]

# The command of each program -> the module whose make_parser() and main(argv) it runs.
ARGPARSE_PROGRAMS = {
    "experiments": "experiments.compare",
    "experiments.compare": "experiments.compare",
    "experiments.headroom": "experiments.headroom",
    "experiments.reproduce": "experiments.reproduce",
    "experiments.plot": "experiments.plot",
    "experiments.studies.cpu_gap": "experiments.studies.cpu_gap",
    "experiments.studies.count_bad_inputs": "experiments.studies.count_bad_inputs",
    "experiments.benchmark": "experiments.benchmark",
    "experiments.studies.dense_memory": "experiments.studies.dense_memory",
    "experiments.studies.arithmetic_floor": "experiments.studies.arithmetic_floor",
    "experiments.notebooks.refresh": "experiments.notebooks.refresh",
}
ABSL_PROGRAMS = ("experiments.train",)  # absl flags: run in a process of its own
TRAINER_FLAGS = {
    "workdir",
    "config",
    "resume",
    "allow_changes",
    "overwrite",
    "distributed",
    "coordinator_address",
    "num_processes",
    "process_id",
}


def modules_found() -> dict[str, str]:
    """``{module: its source}`` of every module of experiments/ (not packages)."""
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts): path.read_text()
        for path in (ROOT / "experiments").rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    }


def programs_found() -> set[str]:
    """Every module of experiments/ that runs as a program."""
    found = {"experiments"}  # experiments/__main__.py
    for module, text in modules_found().items():
        if 'if __name__ == "__main__"' in text and "not_a_program(" not in text:
            found.add(module)
    return found


NOT_PROGRAMS = sorted(set(modules_found()) - programs_found())


def test_every_program_is_checked():
    assert programs_found() == {*ARGPARSE_PROGRAMS, *ABSL_PROGRAMS}
    assert {"experiments.cli", "experiments.tables", "experiments.configs.default"} < {
        *NOT_PROGRAMS
    }


def assert_plain(text: str, command: str) -> None:
    assert text.startswith(f"usage: python -m {command}"), text[:200]
    assert "``" not in text, "reStructuredText markup in --help"
    assert ".py [" not in text.splitlines()[0], "the usage names a file, not the command"


@pytest.mark.parametrize("command", sorted(ARGPARSE_PROGRAMS))
def test_argparse_help_is_plain_and_describes_every_flag(command, capsys):
    module = importlib.import_module(ARGPARSE_PROGRAMS[command])
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    # python -m experiments.compare is python -m experiments: its usage names the shorter.
    assert_plain(capsys.readouterr().out, "experiments" if "compare" in command else command)
    parser = module.make_parser()
    bare = [
        action.option_strings or [action.dest]
        for action in parser._actions
        if not (action.help or "").strip()  # argparse.SUPPRESS hides a renamed flag: it has one
    ]
    assert not bare, f"flags without a help text: {bare}"
    for action in parser._actions:
        if action.help != argparse.SUPPRESS:
            assert "``" not in action.help


def test_the_trainer_help_is_plain_and_describes_every_flag():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert_plain(result.stdout, "experiments.train")
    described = {
        name: text.strip()
        for name, text in re.findall(r"^  --(?:\[no\])?(\w+):(.*)$", result.stdout, re.M)
    }
    assert set(described) == TRAINER_FLAGS
    assert all(described.values()), described


@pytest.mark.parametrize(
    "module, argument",
    [*((module, "--help") for module in NOT_PROGRAMS), ("experiments.cli", "--workdir=run")],
)
def test_a_module_that_is_no_program_says_which_to_run(module, argument, tmp_path):
    """``python -m experiments.cli --help`` used to exit 0 and print nothing: every module
    that is no program says so on one line, names a program, exits non-zero, writes nothing."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", module, argument],
        cwd=tmp_path,  # a relative --workdir would land here
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: python -m {module} is not a program ("), line
    instead = re.fullmatch(r".*; run python -m ([\w.]+)( [^;]*)? instead\.", line)
    assert instead and instead[1] in programs_found(), line
    assert not list(tmp_path.iterdir())


def test_the_notebook_refresh_needs_nbformat_to_run_only(monkeypatch, capsys, tmp_path):
    """Its --help works without the test extra; a refresh without it is one line saying
    what to install, not a traceback of ``import nbformat``."""
    for name in ("nbformat", "nbclient"):
        monkeypatch.setitem(sys.modules, name, None)  # `import nbformat` fails
    monkeypatch.delitem(sys.modules, "experiments.notebooks.refresh", raising=False)
    refresh = importlib.import_module("experiments.notebooks.refresh")
    with pytest.raises(SystemExit) as exit_:
        refresh.main(["--help"])
    assert exit_.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())  # argparse wraps its lines
    assert "NOTEBOOK the notebook to execute in place (default: experiments/notebooks/gam" in usage
    notebook = tmp_path / "copy.ipynb"
    notebook.write_text("{}")
    with pytest.raises(SystemExit) as exit_:
        refresh.main([str(notebook)])
    assert exit_.value.code == (
        "error: refreshing the notebook needs nbformat, which is not installed; install the "
        'test extra (nbformat, nbclient, ipykernel): pip install -e ".[test]"'
    )
    assert notebook.read_text() == "{}"
