"""A small-scale reproduction: sgd vs sam vs gsam vs gam over seeds, accuracy and flatness.

Every (optimizer, seed) run trains ``configs/default.py`` (scikit-learn's digits, the small
BatchNorm CNN; or the ``--config`` below) with the same epoch budget, then measures the
flatness of the final parameters on the training objective (label smoothing included, no
augmentation, BatchNorm in inference mode): the Hessian's top eigenvalue (Lanczos), its
trace (Hutchinson) and the paper's first-order flatness R1 = r * max ||grad L|| over the
ball of radius r (the probe's ``--probe-radius``, on the first ``--flatness-examples``
training examples). It prints a markdown table of mean +- std over seeds and draws
``WORKDIR/reproduction.png``.

    python -m experiments.reproduce --workdir runs/reproduce --epochs 8 --seeds 5

Every run starts from one config, ``configs/default.py`` or ``--config=PATH[:ARG]`` with
``--config.FIELD=VALUE`` flags, as the training program reads them::

    python -m experiments.reproduce --config=experiments/configs/mnist1d.py:0.4 \\
        --config.learning_rate=0.05 --optimizers sgd gam --seeds 3 --epochs 10

An optimizer may carry overrides of its config section, ``NAME:KEY=VALUE,...``, e.g.
``reuse:every=5,alpha=0.2`` (amortised GAM) or ``looksam:every=10``: each method is the
config overrides it applies, ``{"optimizer": "reuse", "reuse.every": 5, ...}``, every field
checked against the config. ``--validation-examples N`` trains on all but the last N
training examples and reports accuracy on those N instead of the test set (for choosing
hyperparameters). A run already finished in WORKDIR is reused when its whole config is the
one asked (compared as a resume compares it), so an interrupted reproduction continues.
"""

from __future__ import annotations

import argparse
import ast
import json
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import scipy.stats
from matplotlib.figure import Figure

from experiments import (
    ConfigError,
    checkpoints,
    cli,
    configs,
    optimizers,
    tables,
    train,
    xla_options,
)
from experiments.configs import default
from experiments.run_flatness import measure as measure_flatness  # a finished run's flatness

COLUMNS = {
    # key: (heading, format)
    "final_test_accuracy": ("final test acc", "{:.4f}"),
    "best_test_accuracy": ("best test acc", "{:.4f}"),
    "train_loss": ("final train loss", "{:.4f}"),
    "top_eigenvalue": ("top Hessian eig", "{:.2f}"),
    "trace": ("Hessian trace", "{:.1f}"),
    "first_order_flatness": ("R1 (first-order)", "{:.4f}"),
    "wall_time": ("wall time s", "{:.0f}"),
}


def parse_method(text: str, base: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """The command line's ``NAME:KEY=VALUE,...`` as the config overrides of that run.

    A KEY is a field of NAME's config section; ``SECTION.KEY`` a field of another (e.g. the
    transformation that ``reuse`` wraps). Each field is checked against ``base`` (default
    ``configs/default.py``).

    >>> parse_method("reuse:every=5,alpha=0.2,gam.rho_prime=0.05")
    {'optimizer': 'reuse', 'reuse.every': 5, 'reuse.alpha': 0.2, 'gam.rho_prime': 0.05}
    """
    name, _, rest = text.partition(":")
    if name not in optimizers.NAMES:
        raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(optimizers.NAMES)}.")
    base = base if base is not None else default.get_config()
    method: dict[str, Any] = {"optimizer": name}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"bad override {item!r} in {text!r}: write KEY=VALUE.")
        key = key if "." in key else f"{name}.{key}"
        try:
            method[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            method[key] = value  # a bare word, e.g. inner=gam
        try:
            configs.override(base, {key: method[key]})
        except ConfigError as e:
            raise ConfigError(f"bad override {item!r} in {text!r}: {e}") from None
    return method


def describe(overrides: Mapping[str, Any]) -> str:
    """A run's overrides as its tables and folders name it, fields of the optimizer's own
    section without their section.

    >>> describe({"optimizer": "reuse", "reuse.every": 5, "gam.rho_prime": 0.05})
    'reuse:every=5,gam.rho_prime=0.05'
    """
    name = overrides.get("optimizer", "")
    items = [
        f"{key.removeprefix(f'{name}.')}={value}"
        for key, value in overrides.items()
        if key != "optimizer"
    ]
    return f"{name}:{','.join(items)}" if items else name


RENAMED_RHO = (
    "--rho is now --probe-radius (the radius of the flatness probe R1; SAM's rho is an "
    "optimizer override)."
)
# Config fields that change no result: a cached run is reused whatever their values.
BOOKKEEPING = checkpoints.MAY_CHANGE_ON_RESUME - {"num_epochs"}


def cached(workdir: pathlib.Path, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The finished run in ``workdir`` if its config is ``wanted`` (the comparison of a
    resume, bookkeeping fields aside), None if there is none; a run of another config is
    refused."""
    result_path = workdir / "result.json"
    if not result_path.exists():
        return None
    result = json.loads(result_path.read_text())
    if "config" not in result:
        raise ConfigError(
            f"{result_path} records no config (written by an older version), so it "
            f"cannot be matched to this run; delete it to rerun, or use another --workdir."
        )
    differ = checkpoints.changed_fields(
        result["config"],
        wanted,
        may_change=BOOKKEEPING,
        defaults=json.loads(default.get_config().to_json_best_effort()),
    )
    if differ:
        diffs = checkpoints.describe_changes(differ, "there", "here")
        raise ConfigError(
            f"{workdir} holds a finished run of other settings ({diffs}); use another --workdir."
        )
    return result


def run_one(
    overrides: Mapping[str, Any],
    seed: int,
    epochs: int,
    workdir: pathlib.Path,
    probe_radius: float,
    train_examples: int | None = None,
    flatness_examples: int | None = None,
    validation_examples: int | None = None,
    base: ml_collections.ConfigDict | None = None,
    measure: bool = True,
) -> dict:
    """Train (or reuse) the run of ``base`` with ``overrides`` (``{"optimizer": "sam",
    "sam.rho": 0.1}``) and measure it; the result is cached in ``result.json``.

    ``base`` is the config to start from (default ``configs/default.py``); the seed also
    seeds its label noise, so every optimizer of one seed sees the same noisy labels.
    ``measure=False`` skips the flatness measures (e.g. runs that only choose a radius).
    """
    run = {**overrides, "seed": seed, "num_epochs": epochs, "label_noise_seed": seed}
    if train_examples is not None:
        run["num_train_examples"] = train_examples
    run.update(validation_examples=validation_examples, progress_bar=False)
    config = configs.override(base if base is not None else default.get_config(), run)
    wanted = json.loads(config.to_json_best_effort())  # the run's identity: its whole config
    result = cached(workdir, wanted)
    fresh = result is None
    if result is None:
        start = time.perf_counter()
        summary = train.train_and_evaluate(config, workdir, overwrite=True)
        result = {
            "optimizer": describe(overrides),
            "seed": seed,
            "epochs": epochs,
            "validation_examples": validation_examples,
            "num_train_examples": config.num_train_examples,
            "label_noise": config.label_noise,
            "label_noise_seed": config.label_noise_seed,
            "config": wanted,
            "wall_time": time.perf_counter() - start,
            **{k: summary[k] for k in ("final_test_accuracy", "best_test_accuracy", "train_loss")},
        }
    # What the flatness measures used (results of older versions name the radius "rho").
    probe = {"radius": probe_radius, "examples": flatness_examples}
    old = result.get("flatness_probe") or {}
    measured = {"radius": old.get("radius", old.get("rho")), "examples": old.get("examples")}
    remeasure = measure and measured != probe
    if remeasure:  # measured now, or again
        result.update(measure_flatness(config, workdir, probe_radius, seed, flatness_examples))
        result["flatness_probe"] = probe
    if fresh or remeasure:
        (workdir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def summarise(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
    """optimizer -> column -> (mean, std over seeds)."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for optimizer in dict.fromkeys(r["optimizer"] for r in results):
        rows = [r for r in results if r["optimizer"] == optimizer]
        table[optimizer] = {
            key: (float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows])))
            for key in COLUMNS
        }
    return table


def interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The Student-t confidence interval of the mean of ``values``."""
    n, mean = len(values), float(np.mean(values))
    if n < 2:
        return mean, mean
    half = scipy.stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n)
    return mean - half, mean + half


def seeds_needed(std: float, half_width: float, level: float = 0.95) -> int:
    """The fewest paired seeds ``n`` (at least 2) whose Student-t interval has a half-width
    ``t(n - 1) * std / sqrt(n)`` of at most ``half_width``, were the seeds' spread ``std``:
    what a target precision would cost, from the spread measured so far.

    >>> seeds_needed(std=0.3, half_width=0.3)  # t(5) / sqrt(6) = 1.05, t(6) / sqrt(7) = 0.92
    7
    """
    if not half_width > 0:
        raise ValueError(f"half_width must be > 0, got {half_width}")
    quantile = lambda n: scipy.stats.t.ppf(0.5 + level / 2, n - 1)
    z = scipy.stats.norm.ppf(0.5 + level / 2)  # t(n - 1) > z: no n below (z * std / h)^2
    n = max(2, int((z * std / half_width) ** 2))
    while quantile(n) * std / np.sqrt(n) > half_width:
        n += 1
    return n


def interval_table(results: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """95% intervals of the mean over seeds, one row per optimizer."""
    rows = []
    for optimizer in dict.fromkeys(r["optimizer"] for r in results):
        runs = [r for r in results if r["optimizer"] == optimizer]
        cells = [optimizer]
        for key in keys:
            low, high = interval([r[key] for r in runs])
            fmt = COLUMNS[key][1]
            cells.append(f"[{fmt.format(low)}, {fmt.format(high)}]")
        rows.append(cells)
    header = ["optimizer", *(f"{COLUMNS[k][0]} 95% CI" for k in keys)]
    return tables.table(header, rows, markdown=True)


def markdown_table(table: dict[str, dict[str, tuple[float, float]]], seeds: int) -> str:
    rows = [
        [optimizer]
        + [
            f"{fmt.format(values[key][0])} ± {fmt.format(values[key][1])}"
            for key, (_, fmt) in COLUMNS.items()
        ]
        for optimizer, values in table.items()
    ]
    header = ["optimizer", *(heading for heading, _ in COLUMNS.values())]
    return tables.table(header, rows, markdown=True) + f"\n\nmean ± std over {seeds} seeds"


def plot(results: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """One panel per measure, one column of points (one per seed) per optimizer."""
    keys = ["final_test_accuracy", "top_eigenvalue", "trace", "first_order_flatness"]
    optimizers = list(dict.fromkeys(r["optimizer"] for r in results))
    fig = Figure(figsize=(4 * len(keys), 3.5))
    axes = fig.subplots(1, len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for i, optimizer in enumerate(optimizers):
            values = [r[key] for r in results if r["optimizer"] == optimizer]
            ax.scatter(np.full(len(values), i), values, alpha=0.6)
            ax.errorbar(i, np.mean(values), yerr=np.std(values), fmt="_k", capsize=6, ms=20)
        ax.set_xticks(range(len(optimizers)), optimizers)
        ax.set_title(COLUMNS[key][0])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


HOW_LONG = (
    "How long: the defaults (4 optimizers x 5 seeds, 8 epochs on digits) take about 5 min "
    "on 2 CPU cores (measured: one seed of the 4, training and flatness, 52 s at load "
    "average 2-3). Each finished run prints a line with the seconds so far; finished runs "
    "in --workdir are reused, so a killed command continues."
)


def make_parser() -> argparse.ArgumentParser:
    """The driver's options; ``--config.FIELD=VALUE`` flags pass through to the config."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.reproduce",
        description=__doc__.split("\n\n")[0],
        epilog=HOW_LONG,
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        type=pathlib.Path,
        default=pathlib.Path("runs/reproduce"),
        help="where the runs and the summary go (default: runs/reproduce)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="the config every run starts from, PATH[:ARG] as the training program's "
        "(default experiments/configs/default.py); --config.FIELD=VALUE changes its fields",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=["sgd", "sam", "gsam", "gam"],
        help=f"NAME or NAME:KEY=VALUE,... with NAME one of {', '.join(optimizers.NAMES)}",
    )
    parser.add_argument(
        "--seeds", type=int, default=5, help="runs per optimizer, seeds 0 to N - 1 (default: 5)"
    )
    parser.add_argument("--epochs", type=int, default=8, help="epochs per run (default: 8)")
    parser.add_argument(
        "--probe-radius", type=float, default=0.05, help="the radius of the flatness probe R1"
    )
    parser.add_argument("--rho", type=float, help=argparse.SUPPRESS)  # renamed --probe-radius
    parser.add_argument(
        "--train-examples",
        type=int,
        default=None,
        help="use only the first N training examples (quick runs)",
    )
    parser.add_argument(
        "--flatness-examples",
        type=int,
        default=512,
        help="measure flatness on the first N training examples",
    )
    parser.add_argument(
        "--validation-examples",
        type=int,
        default=None,
        help="hold out the last N training examples; report accuracy on them, not on the test set",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, tuple[float, float]]]:
    parser = make_parser()
    args, config_flags = configs.parse_with_config(parser, argv)
    if args.rho is not None:
        parser.error(RENAMED_RHO)
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be >= 1")
    try:
        path = args.config or default.__file__
        base = configs.from_flags(path, config_flags) if args.config or config_flags else None
        methods = {text: parse_method(text, base) for text in args.optimizers}
    except ConfigError as e:
        parser.error(cli.config_error(path, config_flags, e))
    xla_options.cache_compilations(args.workdir / "compilation_cache")
    results, start = [], time.perf_counter()
    try:
        for seed in range(args.seeds):
            for text, method in methods.items():
                run_dir = (
                    args.workdir / f"{text.translate(str.maketrans(':,', '--', '='))}-seed{seed}"
                )
                results.append(
                    run_one(
                        method,
                        seed,
                        args.epochs,
                        run_dir,
                        args.probe_radius,
                        args.train_examples,
                        args.flatness_examples,
                        args.validation_examples,
                        base,
                    )
                )
                print(
                    f"done {run_dir} (run {len(results)} of {args.seeds * len(methods)}, "
                    f"{time.perf_counter() - start:.0f} s so far)",
                    file=sys.stderr,
                    flush=True,
                )
    except ConfigError as e:
        sys.exit(f"error: {e}")
    table = summarise(results)
    print(markdown_table(table, args.seeds))
    print()
    print(interval_table(results, ["final_test_accuracy", "top_eigenvalue"]))
    if args.validation_examples:
        print(
            f"\n'test' = validation: the last {args.validation_examples} training examples, "
            "held out from training; the test set was not used."
        )
    plot(results, args.workdir / "reproduction.png")
    print(f"\nplot: {args.workdir / 'reproduction.png'}")
    return table


if __name__ == "__main__":
    main()
