"""The trainer's command line: flags in, a training function called, errors as one line.

``python -m experiments.train`` runs :func:`run` with ``train.train_and_evaluate``; this
module does not import ``experiments.train`` (which imports it: no import cycle). Bad input
(a config value, a workdir, a damaged checkpoint, a diverged run) and file-system problems
end the command with one ``error: ...`` line and exit status 1; ``--help`` prints
:data:`USAGE` and the flags, and exits 0. :class:`HelpFormatter` is the ``--help`` layout of
the argparse programs (each option's default shown).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging as std_logging
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import ConfigError, configs, parallel

_DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "default.py"
FLAGS = flags.FLAGS
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")

USAGE = """\
usage: python -m experiments.train --workdir=DIR [--config=FILE[:ARG]] [--config.FIELD=VALUE ...]
           [--resume [--allow_changes=FIELD,...] | --overwrite]
           [--distributed | --coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Trains one run of a config and evaluates it after every epoch. --workdir receives
metrics.jsonl (one record per epoch), TensorBoard scalars and Orbax checkpoints; a killed run
continues with --resume and ends as an uninterrupted one would. FILE defaults to
experiments/configs/default.py (a small CNN on scikit-learn's digits, offline), which
documents every field; --config.FIELD=VALUE changes one (e.g. --config.gam.rho=0.1).

examples:
  python -m experiments.train --workdir=runs/digits
  python -m experiments.train --config=experiments/configs/cifar.py:cifar100,resnet18 \\
      --workdir=runs/c100 --config.data_dir=~/tensorflow_datasets
  python -m experiments.train --config=... --workdir=runs/c100 --resume
  python -m experiments.train --config=... --workdir=runs/c100 --resume \\
      --config.learning_rate=0.05 --allow_changes=learning_rate    # after a divergence

Several devices: --config.parallel=jit (or pmap). The trainer's default
--config.average=gradients (gam_optax's default is 'direction') averages every gradient over
the devices, so a step is the one-device step on the global batch: a run, or its resume,
takes the same steps (up to rounding) on any number of devices. Several processes (GPU
hosts, TPU VMs): run the same command on every host with --distributed (Cloud TPU, SLURM and
Open MPI are detected), or with --coordinator_address, --num_processes and --process_id.
"""


def define_flags() -> None:
    """The trainer's flags; ``--config`` applies the ``--config.FIELD=VALUE`` of sys.argv."""
    flags.DEFINE_string(
        "workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard go.", required=True
    )
    flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
    flags.DEFINE_list(
        "allow_changes",
        None,
        "With --resume: config fields that may differ from the checkpoint's (e.g. "
        "learning_rate after a divergence).",
    )
    flags.DEFINE_bool("overwrite", False, "Delete a previous run in --workdir first.")
    flags.DEFINE_bool(
        "distributed", False, "Join a multi-process job (jax.distributed.initialize)."
    )
    flags.DEFINE_string(
        "coordinator_address", None, "HOST:PORT of process 0 (implies --distributed)."
    )
    flags.DEFINE_integer("num_processes", None, "Number of processes of the job.")
    flags.DEFINE_integer("process_id", None, "Index of this process, 0 to num_processes - 1.")
    try:  # config_flags applies the --config.<field>=... overrides of sys.argv here
        config_flags.DEFINE_config_file(
            "config",
            str(_DEFAULT_CONFIG),
            "The config file, FILE[:ARG] (ARG chooses a variant, e.g. cifar.py:cifar10,resnet18).",
            lock_config=True,
        )
    except (AttributeError, KeyError) as e:
        while isinstance(e, BaseException) and e.args:  # ml_collections nests its KeyError
            e = e.args[0]
        reason = " ".join(str(e).split())
        sys.exit(unknown_field(sys.argv) or f"error: the config has no field {reason}")


def unknown_field(argv: Sequence[str]) -> str | None:
    """The error line of the first ``--config.FIELD=VALUE`` of ``argv`` whose FIELD the
    config lacks, with the closest field names; None when it has every one (or its file does
    not load, which is an error of its own)."""
    try:
        fields = field_names(configs.from_flags(config_argument(argv)))
    except ConfigError:
        return None
    for name in override_names(argv):
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            closest = (
                f"closest: {', '.join(map(repr, close))}" if close else "no field has a close name"
            )
            return (
                f"error: the config has no field {name!r} ({closest}); the fields are "
                f"documented in experiments/configs/default.py."
            )
    return None


def config_error(path: str, flags: Sequence[str], error: Exception) -> str:
    """What a driver says when ``--config=path`` and its ``--config.FIELD=VALUE`` ``flags``
    fail: a field the config lacks as :func:`unknown_field` names it, else ``error``."""
    line = unknown_field([f"--config={path}", *flags])
    return f"--config={path} {' '.join(flags)}: {line[len('error: ') :]}" if line else str(error)


def config_argument(argv: Sequence[str]) -> str:
    """The ``--config=FILE[:ARG]`` of ``argv`` (``--config FILE`` too; default: default.py)."""
    for i, arg in enumerate(argv):
        if re.fullmatch(r"--?config", arg) and i + 1 < len(argv):
            return argv[i + 1]
        if re.match(r"--?config=", arg):
            return arg.split("=", 1)[1]
    return str(_DEFAULT_CONFIG)


def override_names(argv: Sequence[str]) -> list[str]:
    """The FIELD of each ``--config.FIELD=VALUE`` (``--noconfig.FIELD``) of ``argv``."""
    return [m[1] for a in argv if (m := re.match(r"--?(?:no)?config\.([^=]+)", a))]


def field_names(config: Any, prefix: str = "") -> list[str]:
    """Every field of ``config``, dotted (``gam``, ``gam.rho``, ...)."""
    names = []
    for key, value in config.items():
        names.append(f"{prefix}{key}")
        if hasattr(value, "items"):  # a section
            names += field_names(value, f"{prefix}{key}.")
    return names


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` of the argparse programs: each option's default after its help, unless
    the help says it already (no default, None or False: nothing; every choice: "all")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = default_text(action)
        if shown is None or "default" in text:
            return text
        return f"{text} (default: {shown})"


class RawHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter`, the description and the epilog printed as written."""


def default_text(action: argparse.Action) -> str | None:
    """An option's default as ``--help`` shows it (None: it shows none)."""
    default = action.default
    if not action.option_strings or action.help == argparse.SUPPRESS:
        return None
    if default is None or default is False or default is argparse.SUPPRESS:
        return None
    if isinstance(default, list | tuple):
        if action.choices is not None and list(default) == list(action.choices):
            return "all"
        return " ".join(map(str, default)) or "none"
    return str(default).replace("%", "%%")  # help strings are %-formatted


def help_text(full: bool = False) -> str:
    """:data:`USAGE` and the trainer's flags (``full``: every flag of every module)."""
    listing = FLAGS.get_help() if full else FLAGS.module_help(__name__).strip().split("\n", 1)[1]
    return f"{USAGE}\nflags:\n{listing}\n"


def main(argv: Sequence[str], train_and_evaluate: Callable[..., dict[str, Any]]) -> None:
    """The command line, once absl has parsed the flags."""
    if len(argv) > 1:
        sys.exit(
            f"error: unexpected arguments: {' '.join(argv[1:])}; every setting is a flag "
            f"(--workdir=DIR, --config.FIELD=VALUE): see --help."
        )
    if FLAGS.allow_changes and not FLAGS.resume:
        sys.exit(
            f"error: --allow_changes={','.join(FLAGS.allow_changes)} applies to --resume only "
            f"(the fields that may differ from the checkpoint's); add --resume to continue "
            f"the run in --workdir, or drop --allow_changes for a fresh run."
        )
    # Orbax reports every checkpoint step at INFO level; keep its warnings only.
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "orbax" not in r.pathname
    )
    config_file = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]
    if not pathlib.Path(config_file).is_file():
        sys.exit(f"error: the --config file {config_file} does not exist; check the path.")
    try:
        if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes:
            parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        summary = train_and_evaluate(
            FLAGS.config,
            FLAGS.workdir,
            resume=FLAGS.resume,
            overwrite=FLAGS.overwrite,
            allow_changes=FLAGS.allow_changes or (),
        )
    except ConfigError as e:  # bad input, a damaged checkpoint, a diverged run
        sys.exit(f"error: {e}")
    except OSError as e:  # the file system: a full disk, permissions
        sys.exit(f"error: {e}; check the disk space and permissions of --workdir and retry.")
    if parallel.is_main_process():
        print(summary_line(summary, FLAGS.workdir))


def summary_line(summary: dict[str, Any], workdir: str) -> str:
    """The run's result in one line (and a notice first if this call trained nothing)."""
    notice = ""
    if summary.get("epochs_trained") == 0:
        notice = (
            f"nothing was trained: {workdir} already holds all {summary['epoch']} epochs "
            f"(raise --config.num_epochs to train more). Its result:\n"
        )
    return (
        f"{notice}final test accuracy {summary['final_test_accuracy']:.4f}, best "
        f"{summary['best_test_accuracy']:.4f} (epoch {summary['best_epoch']}), final train "
        f"loss {summary['train_loss']:.4f}; {summary['train_time']:.1f} s of training steps "
        f"(+ {summary.get('compile_time', 0.0):.1f} s compiling). "
        f"Metrics: {pathlib.Path(workdir) / 'metrics.jsonl'}"
    )


def run(train_and_evaluate: Callable[..., dict[str, Any]]) -> None:
    """Defines the flags, answers ``--help`` (exit status 0), and runs :func:`main`."""
    define_flags()
    asked = [a for a in sys.argv[1:] if a.split("=")[0] in HELP_FLAGS]
    if asked:
        print(help_text(full=any(a.startswith("--helpfull") for a in asked)), end="")
        sys.exit(0)
    try:
        app.run(functools.partial(main, train_and_evaluate=train_and_evaluate))
    except Exception as e:
        if FLAGS.is_parsed():
            raise  # a bug in the program: keep its traceback
        # Raised while the flags were parsed: a --config.FIELD the config lacks, or the
        # --config file itself failed to run.
        reason = " ".join(str(e).split("Traceback")[0].split())
        sys.exit(
            unknown_field(sys.argv)
            or f"error: the --config file failed to load ({type(e).__name__}: {reason})."
        )


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(
        __spec__,
        "python -m experiments.train",
        "the command line of python -m experiments.train",
    )
