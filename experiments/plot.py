"""Loss and accuracy curves of training runs, one line per run, to a PNG.

  python -m experiments.plot RUN_DIR [RUN_DIR ...] --out curves.png

Each RUN_DIR is a ``--workdir`` of ``python -m experiments.train`` (it holds ``metrics.jsonl``).
Solid lines are the test set, dashed lines the training set.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence

import matplotlib
import matplotlib.pyplot as plt

from experiments import ConfigError, checkpoints


def read_metrics(run_dir: str | pathlib.Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``, one per epoch."""
    path = pathlib.Path(run_dir) / checkpoints.METRICS_NAME
    if not path.exists():
        raise SystemExit(f"error: {path} does not exist; is {run_dir} a --workdir of a run?")
    try:
        return checkpoints.read_metrics(path)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def plot_runs(run_dirs: Sequence[str | pathlib.Path]) -> matplotlib.figure.Figure:
    """A figure with a loss and an accuracy panel; per run, a test line and a train line."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for i, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        epochs = [r["epoch"] for r in records]
        name, color = pathlib.Path(run_dir).name, f"C{i}"
        for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
            ax.plot(epochs, [r[f"test_{key}"] for r in records], color=color, label=f"{name} test")
            ax.plot(
                epochs,
                [r[f"train_{key}"] for r in records],
                color=color,
                ls="--",
                label=f"{name} train",
            )
    loss_ax.set(xlabel="epoch", ylabel="loss (train: label-smoothed)", yscale="log")
    acc_ax.set(xlabel="epoch", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.legend(fontsize="small")
    return fig


def make_parser() -> argparse.ArgumentParser:
    """The command line: run directories and the PNG."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.plot",
        description=__doc__.split("\n")[0],
        epilog="Solid lines are the test set, dashed lines the training set.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a --workdir of python -m experiments.train (it holds metrics.jsonl)",
    )
    parser.add_argument(
        "--out", default="curves.png", help="the PNG to write (default: curves.png)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    matplotlib.use("Agg")  # files only; a notebook importing this module keeps its backend
    fig = plot_runs(args.run_dirs)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
