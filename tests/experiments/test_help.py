"""``--help`` of every program in experiments/: exit status 0, a usage line that names the
command to type (``python -m experiments...``), plain text (no reStructuredText double
backticks), and a description of every flag."""

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
}
ABSL_PROGRAMS = ("experiments.train",)  # absl flags: run in a process of its own
# Not checked here: the notebook's refresh script (a maintainer's tool, no flags).
NOT_CHECKED = ("experiments.notebooks.refresh",)
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


def programs_found() -> set[str]:
    """Every module of experiments/ that runs as a program."""
    found = {"experiments"}  # experiments/__main__.py
    for path in (ROOT / "experiments").rglob("*.py"):
        if path.name != "__main__.py" and 'if __name__ == "__main__"' in path.read_text():
            found.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def test_every_program_is_checked():
    checked = {*ARGPARSE_PROGRAMS, *ABSL_PROGRAMS, *NOT_CHECKED}
    assert programs_found() == checked


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
