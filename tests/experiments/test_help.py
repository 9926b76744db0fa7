"""``--help`` of every program in experiments/: exit status 0, a usage line that names the
command to type (``python -m experiments...``), plain text (no reStructuredText double
backticks), and a description of every flag. Every other module says, when run, that it is
no program and which one to run instead."""

import argparse
import importlib
import os
import pathlib
import re
import shlex
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
    "experiments.studies.compile_time": "experiments.studies.compile_time",
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


# Programs whose --help does not show their defaults yet (their files are edited apart).
DEFAULTS_NOT_SHOWN: set[str] = set()


def shown_defaults(action: argparse.Action) -> set[str]:
    """The forms --help may give the default of ``action`` (none: it has none to show)."""
    default = action.default
    if not action.option_strings or action.help == argparse.SUPPRESS:
        return set()
    if default is None or default is False or default is argparse.SUPPRESS:
        return set()
    if not isinstance(default, list | tuple):
        return {str(default)}
    every = action.choices is not None and list(default) == list(action.choices)
    return {" ".join(map(str, default)) or "none", *(["all"] if every else [])}


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason="shows no defaults yet"))
        if c in DEFAULTS_NOT_SHOWN
        else c
        for c in sorted(ARGPARSE_PROGRAMS)
    ],
)
def test_every_help_shows_each_default(command, capsys):
    """``--help`` gives each option's default (``--setting resnet18`` was hidden, and is
    heavy on a CPU): "default" and the value in the option's own help."""
    module = importlib.import_module(ARGPARSE_PROGRAMS[command])
    with pytest.raises(SystemExit):
        module.main(["--help"])
    printed = "".join(capsys.readouterr().out.split())  # argparse wraps its lines
    parser = module.make_parser()
    missing = []
    for action in (a for a in parser._actions if a.help != argparse.SUPPRESS):
        block = "".join(parser._get_formatter()._format_action(action).split())
        assert block in printed  # the option's lines as --help printed them
        forms = shown_defaults(action)
        if forms and not any(
            re.search(f"default:?{re.escape(''.join(f.split()))}", block) for f in forms
        ):
            missing.append(f"{action.option_strings[0]} (default {action.default!r})")
    assert not missing, f"--help shows no default of {missing}"


def test_the_benchmark_description_lists_the_optimizers_it_times(capsys):
    from experiments import benchmark

    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    listed = re.search(r"The step-time table's optimizers \(--optimizers\): ([\w, ]+)\.", usage)
    [choices] = [a.choices for a in benchmark.make_parser()._actions if a.dest == "optimizers"]
    assert listed[1].split(", ") == list(choices) == list(benchmark.OPTIMIZERS)


@pytest.mark.parametrize(
    "command", ["experiments.benchmark", "experiments.headroom", "experiments.reproduce"]
)
def test_a_long_command_says_how_long_it_takes(command, capsys):
    module = importlib.import_module(command)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert re.search(r"How long.*\d+ (s|min)\b", usage), usage[-600:]


def test_each_duration_of_the_benchmark_is_that_of_a_command_it_takes():
    """The lines of the benchmark's table of durations name options it parses, each with
    a figure."""
    from experiments import benchmark

    parser = benchmark.make_parser()
    entries = re.split(r"\n  (?=--)", benchmark.HOW_LONG)[1:]  # a command and its figure
    assert len(entries) >= 8
    for entry in entries:
        command, figure = re.split(r"\s{2,}", entry, maxsplit=1)
        parser.parse_args(shlex.split(command.replace(" (the default)", "")))
        assert re.search(r"\d+ (s|min)\b|tens of minutes", figure), entry


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


def test_an_unknown_config_field_names_the_closest_fields():
    """``--config.gam.rhoo`` names the fields it may have meant and where they are documented
    (it used to say ``'rhoo'; give a config file``, or that the file failed to load)."""
    from experiments import cli

    where = "the fields are documented in experiments/configs/default.py."
    closest = "(closest: 'gam.rho', 'gsam.rho', 'sam.rho')"
    line = f"error: the config has no field 'gam.rhoo' {closest}; {where}"
    assert cli.unknown_field(["train", "--config.gam.rho=0.1", "--config.gam.rhoo=1"]) == line
    alone = "error: the config has no field 'foo' (no field has a close name); "
    assert cli.unknown_field(["train", "--config.foo=1"]) == alone + where
    mnist1d = ["--config", "experiments/configs/mnist1d.py:0.4", "--noconfig.augment.flip"]
    assert cli.unknown_field(["train", *mnist1d, "--config.gam.rho=0.1"]) is None


@pytest.mark.parametrize("command", ["experiments", "experiments.reproduce"])
def test_a_driver_names_the_closest_fields_too(command, capsys):
    module = importlib.import_module(ARGPARSE_PROGRAMS[command])
    with pytest.raises(SystemExit) as exit_:
        module.main(["--config.gam.rho=0.1", "--config.gam.rhoo=0.3"])
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.splitlines()[-1:]
    assert re.fullmatch(
        rf"python -m {command}: error: --config=\S+ --config.gam.rho=0.1 --config.gam.rhoo=0.3: "
        r"the config has no field 'gam.rhoo' \(closest: 'gam.rho', 'gsam.rho', 'sam.rho'\); "
        r"the fields are documented in experiments/configs/default.py.",
        line,
    ), line


@pytest.mark.parametrize("config", [[], ["--config=experiments/configs/mnist1d.py:0.4"]])
def test_the_trainer_refuses_an_unknown_config_field_in_one_line(config, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = tmp_path / "run"
    argv = ["-m", "experiments.train", f"--workdir={run}", *config, "--config.num_epoch=2"]
    result = subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: the config has no field 'num_epoch' (closest: 'num_epochs'); the fields are "
        "documented in experiments/configs/default.py."
    ]
    assert not run.exists()
