"""Command line of the trainer: ``python -m experiments.train`` (or ``experiments.main``).

  python -m experiments.train --workdir=runs/digits                 # offline default
  python -m experiments.train --config=experiments/configs/cifar10_resnet18.py \\
      --workdir=runs/c10 --config.optimizer=sgd --config.data_dir=~/tensorflow_datasets
  python -m experiments.train --config=... --workdir=runs/c10 --resume
"""

from __future__ import annotations

import pathlib
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import ConfigError, train

_DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "default.py"

FLAGS = flags.FLAGS
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics.jsonl go.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete a previous run in --workdir first.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEFAULT_CONFIG), "Training configuration file.", lock_config=True
)
flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    # Orbax reports every checkpoint step at INFO level; keep its warnings only.
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= logging.WARNING or "orbax" not in r.pathname
    )
    try:
        summary = train.train_and_evaluate(
            _CONFIG.value, _WORKDIR.value, resume=_RESUME.value, overwrite=_OVERWRITE.value
        )
    except ConfigError as e:
        sys.exit(f"error: {e}")
    print(
        f"final test accuracy {summary['final_test_accuracy']:.4f}, best "
        f"{summary['best_test_accuracy']:.4f} (epoch {summary['best_epoch']}), final train loss "
        f"{summary['train_loss']:.4f}; {summary['train_time']:.1f} s of training. "
        f"Metrics: {pathlib.Path(_WORKDIR.value) / 'metrics.jsonl'}"
    )


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
