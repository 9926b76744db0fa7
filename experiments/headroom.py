"""Does flatness buy accuracy? The SAM family against SGD where digits has headroom.

Three settings, each a config of the training program (the default CNN):

- ``noise20``, ``noise40``: ``configs/digits_noisy.py:0.2`` / ``:0.4``, symmetric label noise
  on the training split (the test labels are clean), 30 epochs;
- ``lowdata``: ``configs/digits_lowdata.py``, 180 of the 898 training examples, 30 epochs.

The protocol, per setting:

1. **Radius on validation.** Each optimizer's radius is chosen from a small grid
   (:data:`GRIDS`) by the mean final accuracy on a validation split -- the last
   ``validation_examples`` training examples held out, the test set unused -- over
   ``--tune-seeds`` seeds. ``reuse`` (amortised GAM) takes GAM's choice.
2. **Test.** Each optimizer at its chosen radius trains on the whole training split for
   ``--seeds`` seeds: seed ``i`` fixes the initialisation, the data order and the label noise
   for every optimizer, so runs are paired by seed.
3. **Tables.** Mean +- std of the final test accuracy and of the flatness of the final
   training objective (as ``experiments.reproduce``), and the paired difference to sgd with
   its 95% confidence interval (Student t over seeds).

::

    python -m experiments.headroom --setting noise40 --workdir runs/headroom --seeds 5
    python -m experiments.headroom --plot --workdir runs/headroom   # every finished setting

Finished runs are reused, so an interrupted benchmark continues, and more seeds extend it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from experiments import ConfigError, reproduce, tables, xla_options
from experiments.configs import digits_lowdata, digits_noisy


@dataclasses.dataclass(frozen=True)
class Setting:
    config: Callable[[], ml_collections.ConfigDict]
    validation_examples: int  # held out of the training split to choose the radius
    label: str  # for tables and plots


SETTINGS = {
    "noise20": Setting(lambda: digits_noisy.get_config("0.2"), 200, "20% label noise"),
    "noise40": Setting(lambda: digits_noisy.get_config("0.4"), 200, "40% label noise"),
    "lowdata": Setting(digits_lowdata.get_config, 60, "180 training examples"),
}

# optimizer -> the radius settings tried on validation (``experiments.reproduce`` overrides).
GRIDS = {
    "sgd": [""],
    "sam": ["rho=0.05", "rho=0.1", "rho=0.2"],
    "gsam": ["rho=0.05", "rho=0.1", "rho=0.2"],
    "gam": ["rho_prime=0.02", "rho_prime=0.05", "rho_prime=0.1"],  # rho (0.2) fixed
    "sam_gam": [f"sam_rho={r},hvp_step={r}" for r in (0.05, 0.1, 0.2)],
}
# Amortised GAM: the reuse rule chosen on validation (RESULTS.md, "Amortised GAM"), around
# GAM's choice.
FOLLOWERS = {"reuse": ("gam", "every=5,alpha=1.0,rescale=False")}
OPTIMIZERS = (*GRIDS, *FOLLOWERS)
TUNE_SEED = 100  # tuning seeds are 100, 101, ...: never a test run's


def spec(optimizer: str, choice: str) -> str:
    """``('gam', 'rho_prime=0.05')`` -> ``'gam:rho_prime=0.05'``; ``reuse`` wraps GAM's."""
    if optimizer in FOLLOWERS:
        inner, rule = FOLLOWERS[optimizer]
        inner_overrides = ",".join(f"{inner}.{item}" for item in filter(None, choice.split(",")))
        return f"{optimizer}:{rule}" + (f",{inner_overrides}" if inner_overrides else "")
    return f"{optimizer}:{choice}" if choice else optimizer


def choose(accuracies: dict[str, list[float]]) -> str:
    """The grid value with the best mean validation accuracy (the first one on a tie)."""
    return max(accuracies, key=lambda choice: np.mean(accuracies[choice]))


def paired_differences(results: Sequence[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """optimizer -> per-seed ``key`` minus sgd's on the same seed."""
    sgd = {r["seed"]: r[key] for r in results if r["optimizer"] == "sgd"}
    differences: dict[str, list[float]] = {}
    for r in results:
        if r["seed"] in sgd:
            differences.setdefault(r["name"], []).append(r[key] - sgd[r["seed"]])
    return differences


def run_setting(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Chooses each optimizer's radius on validation, then runs the test seeds; prints the
    tables and writes ``WORKDIR/NAME/summary.json``."""
    setting, workdir = SETTINGS[name], args.workdir / name
    base = setting.config()
    epochs = args.epochs or base.num_epochs

    def run(optimizer_spec, seed, folder, validation=None):
        label = optimizer_spec.translate(str.maketrans(":,", "--", "="))
        result = reproduce.run_one(
            optimizer_spec,
            seed,
            epochs,
            workdir / folder / f"{label}-seed{seed}",
            args.rho,
            flatness_examples=args.flatness_examples,
            validation_examples=validation,
            base=base,
            measure=validation is None,  # choosing a radius needs the accuracy alone
        )
        print(f"done {name}/{folder}/{label}-seed{seed}", file=sys.stderr, flush=True)
        return result

    # 1. The radius of each optimizer, on the validation split (tuning seeds).
    tune_seeds = range(TUNE_SEED, TUNE_SEED + args.tune_seeds)
    validation: dict[str, dict[str, list[float]]] = {}  # optimizer -> choice -> accuracies
    for optimizer in (o for o in args.optimizers if o in GRIDS and len(GRIDS[o]) > 1):
        validation[optimizer] = {
            choice: [
                run(spec(optimizer, choice), s, "tune", setting.validation_examples)[
                    "final_test_accuracy"
                ]
                for s in tune_seeds
            ]
            for choice in GRIDS[optimizer]
        }
    choices = {o: choose(validation[o]) if o in validation else GRIDS[o][0] for o in GRIDS}
    choices.update({follower: choices[inner] for follower, (inner, _) in FOLLOWERS.items()})

    # 2. Every optimizer at its radius on the test set, the same seeds for all.
    results = [
        {**run(spec(optimizer, choices[optimizer]), seed, "test"), "name": optimizer}
        for seed in range(args.seeds)
        for optimizer in args.optimizers
    ]

    print(f"\n## {name}: {setting.label}, {epochs} epochs\n")
    if validation:
        print(tuning_table(validation, choices, args.tune_seeds))
        print(f"\nvalidation: the last {setting.validation_examples} training examples.\n")
    print(reproduce.markdown_table(reproduce.summarise(results), args.seeds))
    print()
    print(difference_table(results))
    choices = {o: choices[o] for o in args.optimizers}
    summary = {"setting": name, "epochs": epochs, "choices": choices, "results": results}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def tuning_table(
    validation: dict[str, dict[str, list[float]]], choices: dict[str, str], seeds: int
) -> str:
    """Mean +- std validation accuracy of every grid value, the choice marked."""
    mark = lambda optimizer, choice: "chosen" if choice == choices[optimizer] else ""
    rows = [
        [
            optimizer,
            choice,
            f"{np.mean(values):.4f} ± {np.std(values):.4f}",
            mark(optimizer, choice),
        ]
        for optimizer, grid in validation.items()
        for choice, values in grid.items()
    ]
    header = ["optimizer", "grid value", f"validation acc ({seeds} seeds)", ""]
    return tables.table(header, rows, markdown=True)


def difference_table(results: Sequence[dict[str, Any]]) -> str:
    """Test accuracy and top eigenvalue minus sgd's on the same seed: mean [95% CI]."""
    accuracy = paired_differences(results, "final_test_accuracy")
    eigenvalue = paired_differences(results, "top_eigenvalue")
    rows = []
    for optimizer, values in accuracy.items():
        if optimizer == "sgd":
            continue
        cells = [optimizer]
        for diffs, fmt in ((values, "{:+.4f}"), (eigenvalue[optimizer], "{:+.2f}")):
            low, high = reproduce.interval(diffs)
            cells.append(f"{fmt.format(np.mean(diffs))} [{fmt.format(low)}, {fmt.format(high)}]")
        rows.append(cells)
    header = ["optimizer", "test acc - sgd, 95% CI", "top eig - sgd, 95% CI"]
    return (
        tables.table(header, rows, markdown=True) + "\n\npaired by seed (same data, order, noise)"
    )


def plot(workdir: pathlib.Path) -> pathlib.Path:
    """Final test accuracy (mean +- std over seeds) per optimizer, one group per setting."""
    summaries = [
        json.loads((workdir / name / "summary.json").read_text())
        for name in SETTINGS
        if (workdir / name / "summary.json").exists()
    ]
    if not summaries:
        raise ConfigError(f"no finished setting in {workdir}: run --setting NAME first.")
    names = list(dict.fromkeys(r["name"] for s in summaries for r in s["results"]))
    fig = Figure(figsize=(2.2 + 1.6 * len(summaries), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(names)
    for i, optimizer in enumerate(names):
        means, stds, xs = [], [], []
        for j, summary in enumerate(summaries):
            values = [
                r["final_test_accuracy"] for r in summary["results"] if r["name"] == optimizer
            ]
            if values:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                means.append(np.mean(values))
                stds.append(np.std(values))
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, label=optimizer)
    ax.set_xticks(range(len(summaries)), [SETTINGS[s["setting"]].label for s in summaries])
    ax.set_ylabel("final test accuracy (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = workdir / "headroom.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path("runs/headroom"))
    parser.add_argument("--setting", nargs="*", default=[], choices=list(SETTINGS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--seeds", type=int, default=5, help="test runs per optimizer")
    parser.add_argument("--tune-seeds", type=int, default=2, help="validation runs per grid value")
    parser.add_argument("--epochs", type=int, default=None, help="default: the setting's config")
    parser.add_argument("--rho", type=float, default=0.05, help="radius of R1")
    parser.add_argument("--flatness-examples", type=int, default=512)
    parser.add_argument("--plot", action="store_true", help="plot every finished setting")
    args = parser.parse_args(argv)
    if args.seeds < 2 or args.tune_seeds < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error("--seeds must be >= 2 (for intervals), --tune-seeds and --epochs >= 1")
    if "sgd" not in args.optimizers:
        parser.error("--optimizers must include sgd, the baseline of the paired differences")
    if not args.setting and not args.plot:
        parser.error(f"give --setting ({', '.join(SETTINGS)}) and/or --plot")
    for follower, (inner, _) in FOLLOWERS.items():
        if follower in args.optimizers and inner not in args.optimizers:
            parser.error(f"{follower} takes {inner}'s radius: add {inner} to --optimizers")
    xla_options.cache_compilations(args.workdir / "compilation_cache")
    try:
        summaries = [run_setting(args, name) for name in args.setting]
        if args.plot:
            print(f"\nplot: {plot(args.workdir)}")
    except ConfigError as e:
        sys.exit(f"error: {e}")
    return summaries


if __name__ == "__main__":
    main()
