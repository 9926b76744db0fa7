"""The trainer's command line: flags in, ``train.train_and_evaluate`` out, errors as one line.

  python -m experiments.train --workdir=DIR [--config=FILE] [--config.FIELD=VALUE ...]

(``python -m experiments.main`` is the same command; ``experiments/train.py`` shows examples,
the data-parallel settings and the multi-process flags.) Bad input (a config value, a
workdir, a damaged checkpoint, a diverged run) and file-system problems end the command with
one ``error: ...`` line and exit status 1.
"""

from __future__ import annotations

import logging as std_logging
import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import ConfigError, parallel, train

_DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "default.py"
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    """The command line: ``python -m experiments.train --workdir=DIR [--config=FILE] ...``."""
    if len(argv) > 1:
        sys.exit(
            f"error: unexpected arguments: {' '.join(argv[1:])}; every setting is a flag "
            f"(--workdir=DIR, --config.FIELD=VALUE): see --helpshort."
        )
    # Orbax reports every checkpoint step at INFO level; keep its warnings only.
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "orbax" not in r.pathname
    )
    config_file = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]
    if not pathlib.Path(config_file).is_file():
        sys.exit(f"error: the --config file {config_file} does not exist; check the path.")
    config = FLAGS.config
    try:
        if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes:
            parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        summary = train.train_and_evaluate(
            config,
            FLAGS.workdir,
            resume=FLAGS.resume,
            overwrite=FLAGS.overwrite,
            allow_changes=FLAGS.allow_changes or (),
        )
    except ConfigError as e:  # bad input, a damaged checkpoint, a diverged run
        sys.exit(f"error: {e}")
    except OSError as e:  # the file system: a full disk, permissions
        sys.exit(f"error: {e}; check the disk space and permissions of --workdir and retry.")
    if not parallel.is_main_process():
        return
    print(
        f"final test accuracy {summary['final_test_accuracy']:.4f}, best "
        f"{summary['best_test_accuracy']:.4f} (epoch {summary['best_epoch']}), final train loss "
        f"{summary['train_loss']:.4f}; {summary['train_time']:.1f} s of training. "
        f"Metrics: {pathlib.Path(FLAGS.workdir) / 'metrics.jsonl'}"
    )


def run() -> None:
    """Defines the flags and runs ``main``."""
    flags.DEFINE_string("workdir", None, "Where checkpoints and metrics.jsonl go.", required=True)
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
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies it).")
    flags.DEFINE_integer("num_processes", None, "Number of processes of the job.")
    flags.DEFINE_integer("process_id", None, "Index of this process, 0 to num_processes - 1.")
    try:  # config_flags applies the --config.<field>=... overrides of sys.argv here
        config_flags.DEFINE_config_file(
            "config", str(_DEFAULT_CONFIG), "Training configuration file.", lock_config=True
        )
    except (AttributeError, KeyError) as e:
        while isinstance(e, BaseException) and e.args:  # ml_collections nests its KeyError
            e = e.args[0]
        sys.exit(f"error: the config has no field {' '.join(str(e).split())}")
    # --helpshort lists the flags of the module that was run: this one, or experiments/train.py.
    for flag in FLAGS.get_flags_for_module(__name__):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    try:
        app.run(main)
    except Exception as e:
        if FLAGS.is_parsed():
            raise  # a bug in the program: keep its traceback
        # Raised while the flags were parsed: the --config file itself failed to run.
        reason = " ".join(str(e).split("Traceback")[0].split())
        sys.exit(f"error: the --config file failed to load ({type(e).__name__}: {reason}).")


if __name__ == "__main__":
    run()
