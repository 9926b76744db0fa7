"""Does flatness buy accuracy? The SAM family against SGD and AdamW where there is headroom.

Settings, each a config of the training program:

- ``mnist1d``, ``mnist1d_noise40``: ``configs/mnist1d.py`` / ``:0.4``, MNIST-1D (4,000
  generated training signals, a 10,000-signal test set generated apart from them) and the
  paper's 1-D CNN, clean or with 40% symmetric label noise on the training split, 40 epochs;
- ``noise20``, ``noise40``: ``configs/digits_noisy.py:0.2`` / ``:0.4``, digits with symmetric
  label noise on the training split (the test labels are clean), 30 epochs;
- ``lowdata``: ``configs/digits_lowdata.py``, 180 of the 898 training examples, 30 epochs.

Every setting runs :data:`DEFAULT_OPTIMIZERS` unless ``--optimizers`` says otherwise; the
digits settings leave out ``gam_penalty`` (:data:`DIGITS`).

The protocol, per setting:

1. **Radius on validation.** Each optimizer's radius (GAM-Hessian's penalty) is chosen from
   a grid of at least 5 values spanning 10x or more (:data:`AXES`) by the mean final
   accuracy on a validation split -- the last ``validation_examples`` training examples held
   out, the test set unused -- over ``--tune-seeds`` seeds. **The choice must be interior**:
   while the best value is at an end of the grid, the grid is extended past that end by the
   ratio of its two outermost values (at most ``--max-extensions`` times; a choice still at
   an end is marked so). ``reuse`` (amortised GAM) takes GAM's choice; ``adamw`` runs at the
   fixed AdamW recipe of :data:`ADAMW`, and ``gam_adamw`` (GAM before AdamW) tunes its own
   radius with it.
2. **Test.** Each optimizer at its chosen radius trains on the whole training split for
   ``--seeds`` seeds: seed ``i`` fixes the initialisation, the data order and the label noise
   for every optimizer, so runs are paired by seed.
3. **Tables.** Mean +- std of the final test accuracy and of the flatness of the final
   training objective (as ``experiments.reproduce``), the paired difference to sgd with its
   95% confidence interval (Student t over seeds), and the paired comparisons of
   :data:`COMPARISONS` (GAM vs SGD, vs SAM, SAM+GAM vs SAM, reuse vs GAM, GAM+AdamW vs
   AdamW, GAM vs GAM-Hessian) with the half-width of each interval.

::

    python -m experiments.headroom --setting mnist1d_noise40 --workdir runs/headroom --seeds 10
    python -m experiments.headroom --setting mnist1d_noise40 mnist1d noise40 --seeds 10 \
        --workdir runs/headroom --jobs 2   # the whole benchmark, two runs at a time
    python -m experiments.headroom --plot --workdir runs/headroom   # every finished setting
    python -m experiments.headroom --setting noise40 --config.num_epochs=10  # fields changed

Each run is the setting's config with the method's overrides (:func:`overrides`, e.g.
``{"optimizer": "sam", "sam.rho": 0.1}``). A finished run is reused when its whole config is
the one asked, so an interrupted benchmark continues, and more seeds extend it. ``--jobs N``
trains N runs at a time, each in its own process (:func:`prefetch`), then prints from the
cache: the same runs and tables as ``--jobs 1``.
``--probe-radius`` is the radius of the flatness probe R1, not a radius of the optimizers.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import multiprocessing
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import ml_collections
import numpy as np
import scipy.stats
from matplotlib.figure import Figure

from experiments import ConfigError, cli, configs, reproduce, step, tables, xla_options

DEFAULT_OPTIMIZERS = ("sgd", "sam", "gam", "sam_gam", "reuse", "gam_penalty", "adamw", "gam_adamw")
# GAM-Hessian's exact Hessian-vector products cost 2x GAM's run on digits' 2-D CNN (205 s
# against 103 s, RESULTS.md): the digits settings leave it out by default, and the
# Algorithm 1 vs 2 claim is answered on MNIST-1D.
DIGITS = tuple(m for m in DEFAULT_OPTIMIZERS if m != "gam_penalty")
# --micro-batches (m-sharpness): SAM and GAM against SGD; sgd's micro-batches change only
# its BatchNorm (statistics over m examples), the control for the others' change.
M_SHARPNESS_OPTIMIZERS = ("sgd", "sam", "gam")


@dataclasses.dataclass(frozen=True)
class Setting:
    config: str  # a file of experiments/configs and its argument, as --config takes them
    validation_examples: int  # held out of the training split to choose the radius
    label: str  # for tables and plots
    optimizers: tuple[str, ...] = DEFAULT_OPTIMIZERS  # run unless --optimizers says otherwise

    @property
    def path(self) -> str:
        """The setting's ``--config=PATH[:ARG]``."""
        return str(pathlib.Path(configs.__file__).parent / self.config)

    def base(self, flags: Sequence[str] = ()) -> ml_collections.ConfigDict:
        """The setting's config, ``--config.FIELD=VALUE`` ``flags`` applied."""
        return configs.from_flags(self.path, flags)


# Adding a setting is one line here (and a config file, if none of them has it yet).
SETTINGS = {
    "mnist1d": Setting("mnist1d.py:0.0", 1000, "MNIST-1D"),
    "mnist1d_noise40": Setting("mnist1d.py:0.4", 1000, "MNIST-1D, 40% label noise"),
    "noise20": Setting("digits_noisy.py:0.2", 200, "digits, 20% label noise", DIGITS),
    "noise40": Setting("digits_noisy.py:0.4", 200, "digits, 40% label noise", DIGITS),
    "lowdata": Setting("digits_lowdata.py", 60, "digits, 180 training examples", DIGITS),
}


@dataclasses.dataclass(frozen=True)
class Axis:
    """One hyperparameter tried on validation: each value sets ``fields`` of the optimizer's
    config section (``("sam_rho", "hvp_step")`` sets two fields to one value)."""

    fields: tuple[str, ...]
    values: tuple[float, ...]  # increasing, positive

    def choice(self, value: float) -> str:
        """The value as the tables show it: ``rho=0.1``."""
        return ",".join(f"{field}={value}" for field in self.fields)

    def overrides(self, section: str, value: float) -> dict[str, float]:
        """``{"sam.rho": 0.1}``: the value as config overrides of ``config.<section>``."""
        return {f"{section}.{field}": value for field in self.fields}


# optimizer -> its axis; >= 5 values spanning >= 10x, extended until the choice is interior.
# Adding an optimizer to the benchmark is one line here.
RADII = (0.02, 0.05, 0.1, 0.2, 0.5)
AXES = {
    "sam": Axis(("rho",), RADII),
    "gsam": Axis(("rho",), RADII),
    "gam": Axis(("rho_prime",), (0.01, 0.02, 0.05, 0.1, 0.2)),  # rho (0.2) fixed
    "sam_gam": Axis(("sam_rho", "hvp_step"), RADII),  # rho 0.1, penalty 0.3 fixed
    "gam_penalty": Axis(("penalty",), (0.03, 0.1, 0.3, 1.0, 3.0)),  # rho 0.1 fixed
    "gam_adamw": Axis(("rho_prime",), (0.01, 0.02, 0.05, 0.1, 0.2)),
}
# Amortised GAM: the reuse rule chosen on validation (RESULTS.md, "Amortised GAM"), around
# GAM's choice: follower -> (the method whose choice it takes, its config section's rule).
FOLLOWERS = {"reuse": ("gam", {"every": 5, "alpha": 1.0, "rescale": False})}
# The AdamW recipe (decoupled weight decay; the cosine schedule and label smoothing of the
# setting), chosen on MNIST-1D's validation split (RESULTS.md), and the methods that use it:
# config overrides of the setting's config.
ADAMW = {"learning_rate": 0.01, "weight_decay": 0.01}
BASES = {"adamw": ADAMW, "gam_adamw": {**ADAMW, "base_optimizer": "adamw"}}
ALIASES = {"gam_adamw": "gam"}  # method -> its name in experiments/optimizers.py
OPTIMIZERS = ("sgd", *AXES, "adamw", *FOLLOWERS)
# (method, baseline): the paired comparisons the benchmark answers.
COMPARISONS = (
    ("gam", "sgd"),
    ("gam", "sam"),
    ("sam_gam", "sam"),
    ("reuse", "gam"),
    ("gam_adamw", "adamw"),
    ("gam", "gam_penalty"),
)
CACHE = "compilation_cache"  # under the workdir, shared by the runs of every setting
TUNE_SEED = 100  # tuning seeds are 100, 101, ...: never a test run's
# The seed's five claims (the GAM paper's README): (claim, comparison, measure, kind).
CLAIMS = (
    ("GAM improves SGD", "gam - sgd", "final_test_accuracy", "improves"),
    ("GAM improves AdamW", "gam_adamw - adamw", "final_test_accuracy", "improves"),
    ("GAM improves SAM", "sam_gam - sam", "final_test_accuracy", "improves"),
    ("GAM helps SAM find flatter minima", "sam_gam - sam", "top_eigenvalue", "lowers"),
    (
        "Algorithm 2 (gam) comparable to Algorithm 1 (gam_penalty)",
        "gam - gam_penalty",
        "final_test_accuracy",
        "comparable",
    ),
)
# An accuracy gain whose 95% interval lies below this is "not confirmed" (too small to
# matter here: the precision target); "comparable" means within +-EQUIVALENCE.
MARGIN = 0.003
EQUIVALENCE = 0.005


def overrides(method: str, value: float | None = None) -> dict[str, Any]:
    """The config overrides of ``method`` at its axis value (None: untuned, or no axis).

    ``reuse`` wraps GAM at GAM's value; ``gam_adamw`` is ``gam`` (its base optimizer is set
    by :data:`BASES`).

    >>> overrides("gam_adamw", 0.05)
    {'optimizer': 'gam', 'gam.rho_prime': 0.05}
    >>> overrides("reuse", 0.05)  # doctest: +NORMALIZE_WHITESPACE
    {'optimizer': 'reuse', 'reuse.every': 5, 'reuse.alpha': 1.0, 'reuse.rescale': False,
     'gam.rho_prime': 0.05}
    """
    if method in FOLLOWERS:
        inner, rule = FOLLOWERS[method]
        inner_fields = {k: v for k, v in overrides(inner, value).items() if k != "optimizer"}
        return {
            "optimizer": method,
            **{f"{method}.{k}": v for k, v in rule.items()},
            **inner_fields,
        }
    name = ALIASES.get(method, method)
    if value is None:
        return {"optimizer": name}
    return {"optimizer": name, **AXES[method].overrides(name, value)}


def choice(method: str, value: float | None) -> str:
    """The axis value of ``method`` as the tables show it (``rho=0.1``; ``""`` untuned)."""
    return "" if value is None else AXES[FOLLOWERS.get(method, (method,))[0]].choice(value)


def choose(accuracies: dict[str, list[float]]) -> str:
    """The grid value with the best mean validation accuracy (the first one on a tie)."""
    return max(accuracies, key=lambda choice: np.mean(accuracies[choice]))


def bracketed(means: Sequence[float]) -> tuple[int, int | None]:
    """Where the best mean lies in a grid ordered by value: ``(index, None)`` when a best
    value is interior (the first such), else ``(index, end)`` with ``end`` 0 (low) or -1
    (high), the end to extend (the high one when both ends tie for best)."""
    best = max(means)
    interior = [i for i in range(1, len(means) - 1) if means[i] == best]
    if interior:
        return interior[0], None
    if means[-1] == best:
        return len(means) - 1, -1
    return 0, 0


def beyond(values: Sequence[float], end: int) -> float:
    """The next value past ``end`` of a geometric-ish grid: the outermost value times the
    ratio of the two outermost ones (0.2 after 0.1, 0.2 -> 0.4; 0.02 before 0.05 -> 0.008),
    to two significant digits."""
    outer, inner = (values[0], values[1]) if end == 0 else (values[-1], values[-2])
    return float(f"{outer * outer / inner:.2g}")


def tune(
    axis: Axis, evaluate: Callable[[float], list[float]], max_extensions: int
) -> tuple[dict[float, list[float]], float, bool]:
    """Validation accuracies of every value of ``axis`` (extended while the best is at an
    end), the chosen value, and whether it is interior.

    ``evaluate(value)`` returns the validation accuracies of one grid value (one per
    tuning seed). The returned dict is ordered by value.
    """
    values = list(axis.values)
    scores = {v: evaluate(v) for v in values}
    for extension in range(max_extensions + 1):
        index, end = bracketed([float(np.mean(scores[v])) for v in values])
        if end is None or extension == max_extensions:
            break
        new = beyond(values, end)
        values.insert(len(values) if end == -1 else 0, new)
        scores[new] = evaluate(new)
    return {v: scores[v] for v in values}, values[index], end is None


def paired_differences(
    results: Sequence[dict[str, Any]], key: str, baseline: str = "sgd"
) -> dict[str, list[float]]:
    """method -> per-seed ``key`` minus ``baseline``'s on the same seed."""
    base = {r["seed"]: r[key] for r in results if r["name"] == baseline}
    differences: dict[str, list[float]] = {}
    for r in results:
        if r["seed"] in base:
            differences.setdefault(r["name"], []).append(r[key] - base[r["seed"]])
    return differences


def run_method(
    args: argparse.Namespace,
    name: str,
    method: str,
    value: float | None,
    seed: int,
    folder: str,
    validation: int | None = None,
) -> dict[str, Any]:
    """One run of ``method`` at its axis value in setting ``name``: the setting's config with
    the method's :data:`BASES` and :func:`overrides` (``reproduce.run_one`` reuses a finished
    run of the same config). ``validation``: examples held out to choose the value."""
    start = time.perf_counter()
    base = SETTINGS[name].base(args.config_flags)
    method_overrides = overrides(method, value)
    described = reproduce.describe(method_overrides)
    label = described.translate(str.maketrans(":,", "--", "="))
    if method_overrides["optimizer"] != method and method not in FOLLOWERS:
        label = f"{method}-{label}"  # gam_adamw's runs apart from gam's
    result = reproduce.run_one(
        method_overrides,
        seed,
        args.epochs or base.num_epochs,
        args.workdir / name / folder / f"{label}-seed{seed}",
        args.probe_radius,
        flatness_examples=args.flatness_examples,
        validation_examples=validation,
        base=configs.override(base, BASES.get(method, {})),
        measure=validation is None,  # choosing a radius needs the accuracy alone
    )
    seconds = time.perf_counter() - start  # ~0: a finished run, reused
    print(f"done {name}/{folder}/{label}-seed{seed} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    # The method's name in the tables (gam_adamw's overrides name gam).
    shown = method + described[len(method_overrides["optimizer"]) :]
    return {**result, "optimizer": shown, "name": method}


def choose_value(
    args: argparse.Namespace, name: str, method: str
) -> tuple[dict[float, list[float]], float, bool]:
    """``method``'s validation accuracies over its grid (tuning seeds, never a test run's),
    its chosen value, and whether the choice is interior (:func:`tune`)."""
    seeds = range(TUNE_SEED, TUNE_SEED + args.tune_seeds)
    held_out = SETTINGS[name].validation_examples
    evaluate = lambda value: [
        run_method(args, name, method, value, s, "tune", held_out)["final_test_accuracy"]
        for s in seeds
    ]
    return tune(AXES[method], evaluate, args.max_extensions)


def choose_values(
    args: argparse.Namespace, name: str
) -> tuple[dict[str, float | None], dict[str, dict[float, list[float]]], dict[str, bool]]:
    """Each optimizer's value chosen on the validation split (:func:`choose_value`); the
    validation accuracies of every value tried; whether each choice is interior. Untuned
    optimizers get None, followers their leader's value."""
    values: dict[str, float | None] = dict.fromkeys(OPTIMIZERS)
    validation: dict[str, dict[float, list[float]]] = {}
    interior: dict[str, bool] = {}
    for method in (o for o in args.optimizers if o in AXES):
        validation[method], values[method], interior[method] = choose_value(args, name, method)
    values.update({follower: values[leader] for follower, (leader, _) in FOLLOWERS.items()})
    return values, validation, interior


def prefetch(args: argparse.Namespace, name: str, executor: futures.Executor) -> None:
    """Runs every run of setting ``name`` on ``executor``'s workers, so that the sequential
    pass (:func:`run_setting`) finds each one in the run cache and only prints.

    Independent work goes out at once: each tuned optimizer's grid search (one task: its
    extensions depend on its scores) and the untuned optimizers' test runs; an optimizer's
    test runs (and its followers') go out as soon as its choice is known. The runs and
    their results are those of ``--jobs 1``: each run is its config, wherever it runs.
    """
    seeds = range(args.seeds)
    tests = lambda method, value: [
        executor.submit(run_method, args, name, method, value, seed, "test") for seed in seeds
    ]
    pending = [
        future
        for method in args.optimizers
        if method not in AXES and method not in FOLLOWERS
        for future in tests(method, None)
    ]
    tuning = {executor.submit(choose_value, args, name, m): m for m in args.optimizers if m in AXES}
    for done in futures.as_completed(tuning):
        _, value, _ = done.result()
        leader = tuning[done]
        for method in (leader, *(f for f, (m, _) in FOLLOWERS.items() if m == leader)):
            if method in args.optimizers:
                pending += tests(method, value)
    for future in pending:
        future.result()


def run_setting(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Chooses each optimizer's radius on validation, then runs the test seeds (the same
    seeds for all); prints the tables and writes ``WORKDIR/NAME/summary.json``."""
    setting, workdir = SETTINGS[name], args.workdir / name
    args = copy.copy(args)
    args.optimizers = args.optimizers or list(setting.optimizers)
    epochs = args.epochs or setting.base(args.config_flags).num_epochs
    if args.jobs > 1:
        context = multiprocessing.get_context("spawn")  # a fork would copy JAX's threads
        with futures.ProcessPoolExecutor(
            args.jobs, context, xla_options.cache_compilations, (args.workdir / CACHE,)
        ) as executor:
            try:
                prefetch(args, name, executor)
            except BaseException:
                executor.shutdown(cancel_futures=True)
                raise
    values, validation, interior = choose_values(args, name)
    results = [
        run_method(args, name, method, values[method], seed, "test")
        for seed in range(args.seeds)
        for method in args.optimizers
    ]
    choices = {method: choice(method, values[method]) for method in args.optimizers}
    shown = {m: {AXES[m].choice(v): a for v, a in grid.items()} for m, grid in validation.items()}
    print(f"\n## {name}: {setting.label}, {epochs} epochs\n")
    if validation:
        print(tuning_table(shown, choices, args.tune_seeds, interior))
        print(f"\nvalidation: the last {setting.validation_examples} training examples.\n")
    print(reproduce.markdown_table(reproduce.summarise(results), args.seeds))
    print()
    print(difference_table(results))
    comparisons = compare(results)
    if comparisons:
        print()
        print(comparison_table(comparisons))
        print()
        print(claims_table({name: comparisons}))
    summary = {
        "setting": name,
        "epochs": epochs,
        "choices": choices,
        "interior": interior,
        "validation": shown,
        "comparisons": comparisons,
        "results": results,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def compare(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The paired comparisons of :data:`COMPARISONS` whose two methods both ran: per key
    (test accuracy, top eigenvalue, trace, R1) the mean difference, its 95% interval and
    the number of seeds."""
    names = {r["name"] for r in results}
    out: dict[str, dict[str, Any]] = {}
    for method, baseline in COMPARISONS:
        if method not in names or baseline not in names:
            continue
        row: dict[str, Any] = {}
        for key in ("final_test_accuracy", "top_eigenvalue", "trace", "first_order_flatness"):
            if not all(key in r for r in results if r["name"] in (method, baseline)):
                continue
            diffs = paired_differences(results, key, baseline)[method]
            low, high = reproduce.interval(diffs)
            row[key] = {"mean": float(np.mean(diffs)), "low": low, "high": high, "n": len(diffs)}
        out[f"{method} - {baseline}"] = row
    return out


def verdict(interval: dict[str, float], kind: str) -> str:
    """A claim's verdict from the 95% interval of its paired difference.

    ``improves`` (accuracy): confirmed if the interval is above 0, not confirmed if it is
    below :data:`MARGIN`, else inconclusive. ``lowers`` (top eigenvalue): confirmed if below
    0, not confirmed if at or above 0, else inconclusive. ``comparable`` (accuracy):
    confirmed inside +-:data:`EQUIVALENCE`, not confirmed entirely outside it, else
    inconclusive.
    """
    low, high = interval["low"], interval["high"]
    if kind == "improves":
        return "confirmed" if low > 0 else "not confirmed" if high < MARGIN else "inconclusive"
    if kind == "lowers":
        return "confirmed" if high < 0 else "not confirmed" if low >= 0 else "inconclusive"
    if kind == "comparable":
        if -EQUIVALENCE <= low and high <= EQUIVALENCE:
            return "confirmed"
        return "not confirmed" if low > EQUIVALENCE or high < -EQUIVALENCE else "inconclusive"
    raise ValueError(f"unknown kind of claim {kind!r}")


def claims_table(comparisons_by_setting: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One row per claim of :data:`CLAIMS` and setting whose comparison ran: its interval
    and :func:`verdict` (accuracy in points)."""
    rows = []
    for claim, comparison, key, kind in CLAIMS:
        for setting, comparisons in comparisons_by_setting.items():
            interval = comparisons.get(comparison, {}).get(key)
            if interval is None:
                continue
            scale, f = (100, "{:+.2f}") if key == "final_test_accuracy" else (1, "{:+.2f}")
            cells = [scale * interval[k] for k in ("mean", "low", "high")]
            text = f"{f.format(cells[0])} [{f.format(cells[1])}, {f.format(cells[2])}]"
            measure = "test acc, points" if scale == 100 else "top eig"
            rows.append(
                [
                    claim,
                    setting,
                    comparison,
                    measure,
                    text,
                    str(interval["n"]),
                    verdict(interval, kind) + " here",
                ]
            )
    header = ["claim", "setting", "comparison", "measure", "mean [95% CI]", "seeds", "verdict"]
    return tables.table(header, rows, markdown=True)


def comparison_table(comparisons: dict[str, dict[str, Any]]) -> str:
    """Test accuracy (in points) and flatness differences of each comparison, with 95% CIs."""
    fmt = lambda d, f, scale=1.0: (
        f"{f.format(scale * d['mean'])} [{f.format(scale * d['low'])}, "
        f"{f.format(scale * d['high'])}]"
    )
    rows = []
    for label, row in comparisons.items():
        accuracy = row["final_test_accuracy"]
        half, n = (accuracy["high"] - accuracy["low"]) / 2, accuracy["n"]
        std = half * np.sqrt(n) / scipy.stats.t.ppf(0.975, max(n - 1, 1))  # the seeds' spread
        cells = [label, str(n), fmt(accuracy, "{:+.2f}", 100), f"{100 * half:.2f}"]
        cells.append(str(reproduce.seeds_needed(std, MARGIN)) if n > 1 else "-")
        for key, f in (("top_eigenvalue", "{:+.2f}"), ("trace", "{:+.1f}")):
            cells.append(fmt(row[key], f) if key in row else "-")
        rows.append(cells)
    header = ["comparison", "seeds", "test acc, points, 95% CI", "half-width"]
    header += [f"seeds for +-{100 * MARGIN:.1f}", "top eig", "trace"]
    return (
        tables.table(header, rows, markdown=True) + "\n\npaired by seed (same data, order, noise)"
    )


def tuning_table(
    validation: dict[str, dict[str, list[float]]],
    choices: dict[str, str],
    seeds: int,
    interior: dict[str, bool] | None = None,
) -> str:
    """Mean +- std validation accuracy of every grid value, the choice marked (and marked as
    at the grid's end when extending did not make it interior)."""

    def mark(optimizer, choice):
        if choice != choices[optimizer]:
            return ""
        return "chosen" if (interior or {}).get(optimizer, True) else "chosen (grid end)"

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


def check_micro_batch(config: ml_collections.ConfigDict, m: int, optimizers: Sequence[str]):
    """Raises ``ConfigError`` unless every optimizer of ``optimizers`` can take micro-batches
    of ``m`` examples in ``config``'s setting."""
    for method in optimizers:
        run_config = configs.override(config, {**BASES.get(method, {}), **overrides(method)})
        run_config.micro_batch = m
        step.check_micro_batches(run_config, 1)


def run_micro_batches(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--micro-batches``: the whole protocol (tuning included) once per m, each in
    ``WORKDIR/m<M>`` with ``config.micro_batch = m``; then :func:`micro_batch_table`."""
    summaries: dict[int, list[dict[str, Any]]] = {}
    for m in args.micro_batches:
        at_m = copy.copy(args)
        at_m.workdir = args.workdir / f"m{m}"
        at_m.config_flags = [*args.config_flags, f"--config.micro_batch={m}"]
        print(f"\n# micro-batches: {f'{m} examples' if m else 'the whole batch'}")
        summaries[m] = [run_setting(at_m, name) for name in args.setting]
    for i, name in enumerate(args.setting):
        print(f"\n## {name}: m-sharpness\n")
        print(micro_batch_table({m: s[i]["results"] for m, s in summaries.items()}))
    return [s for at_m in summaries.values() for s in at_m]


def micro_batch_table(results_by_m: dict[int, Sequence[dict[str, Any]]]) -> str:
    """Per optimizer and m: test accuracy and top eigenvalue (mean +- std over seeds), and paired
    differences in test accuracy (points) with 95% intervals: against the same optimizer at
    the first m given, and against sgd at the same m."""
    first, *_ = results_by_m
    rows = []
    methods = dict.fromkeys(r["name"] for r in results_by_m[first])
    for method in methods:
        for m, results in results_by_m.items():
            own = [r for r in results if r["name"] == method]
            cells = [method, str(m) if m else "whole batch", str(len(own))]
            for key, digits in (("final_test_accuracy", 4), ("top_eigenvalue", 2)):
                values = np.array([r[key] for r in own])  # mean ± std as the other tables
                cells.append(f"{values.mean():.{digits}f} ± {values.std():.{digits}f}")
            for baseline, wanted in (
                ((results_by_m[first], method), m != first),
                ((results, "sgd"), method != "sgd"),
            ):
                if not wanted:
                    cells.append("")
                    continue
                diffs = 100 * np.array(_paired(own, *baseline, "final_test_accuracy"))
                low, high = reproduce.interval(diffs)
                cells.append(f"{diffs.mean():+.2f} [{low:+.2f}, {high:+.2f}]")
            rows.append(cells)
    header = [
        "optimizer",
        "m",
        "seeds",
        "test acc",
        "top eig",
        f"acc - same optimizer at m={first or 'whole'}, points",
        "acc - sgd at this m, points",
    ]
    return (
        tables.table(header, rows, markdown=True)
        + "\n\npaired by seed (same initialisation, data order and label noise at every m); "
        "95% Student-t intervals; each m's radii chosen on validation at that m"
    )


def _paired(runs, baseline_results, baseline: str, key: str) -> list[float]:
    """Per seed, ``key`` of each run minus ``baseline``'s run of the same seed."""
    base = {r["seed"]: r[key] for r in baseline_results if r["name"] == baseline}
    return [r[key] - base[r["seed"]] for r in runs if r["seed"] in base]


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


HOW_LONG = (
    'How long, on 2 CPU cores with --jobs 2 --seeds 10 (experiments/RESULTS.md, "The whole '
    'benchmark, timed"): mnist1d_noise40 20.5 min (136 runs), mnist1d 19 min, noise40 57 '
    "min (digits' flatness measures are slow), the three 1 h 37 min. --seeds 5, the "
    "default, runs about 70% as many; --jobs 1, the default, may take up to twice as long "
    "(an estimate: that run kept both cores 95% busy). --micro-batches 0 32 8 "
    "--config.batch_size=96 --seeds 10 --jobs 2 on mnist1d_noise40 (sgd, sam, gam): 25 min "
    "(152 runs, measured). Each "
    "finished run prints a line with "
    "its seconds; finished runs in --workdir are reused, so a killed command continues."
)


MICRO_HELP = (
    "m-sharpness: the whole protocol once per M (config.micro_batch; 0: the whole batch), "
    "each in WORKDIR/mM, then each optimizer against itself at the first M and against sgd "
    f"at the same M; default optimizers {' '.join(M_SHARPNESS_OPTIMIZERS)}"
)


def make_parser() -> argparse.ArgumentParser:
    """The benchmark's options; ``--config.FIELD=VALUE`` flags pass through to the configs."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.headroom",
        description=__doc__.split("\n\n")[0],
        epilog="--config.FIELD=VALUE changes a field of every setting's config (e.g. "
        "--config.num_epochs=10). The settings and the protocol: experiments/headroom.py. "
        f"{HOW_LONG}",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "--workdir",
        type=pathlib.Path,
        default=pathlib.Path("runs/headroom"),
        help="where the runs, their cache and the tables go (default: runs/headroom)",
    )
    parser.add_argument(
        "--setting",
        nargs="*",
        default=[],
        choices=list(SETTINGS),
        metavar="SETTING",
        help=f"the settings to run, of {', '.join(SETTINGS)}: MNIST-1D clean or with 40%% "
        f"label noise, digits with 20%% or 40%% label noise, or digits with 180 training "
        f"examples",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        metavar="NAME",
        help=f"of {', '.join(OPTIMIZERS)}; default: the setting's (the digits settings leave "
        f"out gam_penalty)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="test runs per optimizer")
    parser.add_argument("--tune-seeds", type=int, default=2, help="validation runs per grid value")
    parser.add_argument("--epochs", type=int, default=None, help="default: the setting's config")
    parser.add_argument(
        "--max-extensions", type=int, default=3, help="grid extensions while the best is an end"
    )
    parser.add_argument(
        "--probe-radius", type=float, default=0.05, help="the radius of the flatness probe R1"
    )
    parser.add_argument("--rho", type=float, help=argparse.SUPPRESS)  # renamed --probe-radius
    parser.add_argument(
        "--flatness-examples",
        type=int,
        default=512,
        help="measure flatness on the first N training examples",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each in its own process"
    )
    parser.add_argument("--micro-batches", nargs="+", type=int, metavar="M", help=MICRO_HELP)
    parser.add_argument("--plot", action="store_true", help="plot every finished setting")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = make_parser()
    args, config_flags = configs.parse_with_config(parser, argv)
    args.config_flags = config_flags  # --config.FIELD=VALUE: every setting's config changed
    if args.rho is not None:
        parser.error(reproduce.RENAMED_RHO)
    if args.seeds < 2 or args.tune_seeds < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error("--seeds must be >= 2 (for intervals), --tune-seeds and --epochs >= 1")
    if args.max_extensions < 0:
        parser.error("--max-extensions must be >= 0")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1 (runs at a time), got {args.jobs}")
    if args.optimizers is not None and "sgd" not in args.optimizers:
        parser.error("--optimizers must include sgd, the baseline of the paired differences")
    if not args.setting and not args.plot:
        parser.error(f"give --setting ({', '.join(SETTINGS)}) and/or --plot")
    for name in args.setting:
        try:
            SETTINGS[name].base(config_flags)
        except ConfigError as e:
            parser.error(
                f"setting {name}: {cli.config_error(SETTINGS[name].path, config_flags, e)}"
            )
    for follower, (inner, _) in FOLLOWERS.items():
        if follower in (args.optimizers or ()) and inner not in args.optimizers:
            parser.error(f"{follower} takes {inner}'s radius: add {inner} to --optimizers")
    if args.micro_batches is not None:
        args.optimizers = args.optimizers or list(M_SHARPNESS_OPTIMIZERS)
        for m in args.micro_batches:
            for name in args.setting:
                try:
                    check_micro_batch(SETTINGS[name].base(config_flags), m, args.optimizers)
                except ConfigError as e:
                    parser.error(f"--micro-batches {m}, setting {name}: {e}")
    xla_options.cache_compilations(args.workdir / CACHE)
    try:
        if args.micro_batches is not None:
            return run_micro_batches(args)
        summaries = [run_setting(args, name) for name in args.setting]
        if args.plot:
            print(f"\nplot: {plot(args.workdir)}")
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except BrokenProcessPool:
        sys.exit(
            "error: a --jobs worker process died (killed, or out of memory): run the same "
            "command again to continue (finished runs are kept), with fewer --jobs if memory"
            " ran out."
        )
    return summaries


if __name__ == "__main__":
    main()
