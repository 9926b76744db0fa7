"""Count bad inputs and classify the library's reaction: clear / obscure / silent.

The bad inputs are the tables of the test files named on the command line; each table is
looked up by its name in whichever of the files defines it. Run from the repository root
(it uses 4 fake CPU devices):
  python -m experiments.studies.count_bad_inputs tests/library/test_validation.py \
      tests/library/perturbations.py tests/library/test_gam.py tests/library/test_flatness.py
Name those test files of a newer checkout in an older one to count before a change.
clear: TypeError or ValueError raised at construction (or when update is traced) whose
message names the function and the argument; obscure: any other exception, or a message
that lacks either name; silent: no error (the call ran).
"""

import argparse
import importlib.util
import pathlib
import re
import sys
import types
from collections import Counter

import jax
import jax.numpy as jnp
import optax


def load_tables(paths: list[str]) -> types.SimpleNamespace:
    """The names the study reads, each from whichever of the files at ``paths`` defines it.

    The files are data here, loaded by path; while they load, their folders are on
    ``sys.path`` (as pytest puts them) for the helpers they import from each other."""
    modules = []
    folders = sorted({str(pathlib.Path(p).resolve().parent) for p in paths})
    sys.path[:0] = folders
    try:
        for path in map(pathlib.Path, paths):
            modules.append(_load(path))
    finally:
        del sys.path[: len(folders)]
    names = {}
    for name in TABLES:
        owner = next((m for m in modules if hasattr(m, name)), None)
        if owner is None:
            sys.exit(f"error: no file of {paths} defines {name}; name the files that hold it.")
        names[name] = getattr(owner, name)
    return types.SimpleNamespace(**names)


def _load(path: pathlib.Path) -> types.ModuleType:
    """The module of the file at ``path``."""
    spec = importlib.util.spec_from_file_location(f"_tables_{path.stem}", path)
    if spec is None or spec.loader is None or not path.is_file():
        sys.exit(f"error: {path} is not a Python file; name the test files that hold the tables.")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = (
    "tests/library/test_validation.py tests/library/perturbations.py "
    "tests/library/test_gam.py tests/library/test_flatness.py"
)
# What the study reads from the test files.
TABLES = (
    "_hyperparameter_cases",
    "_option_cases",
    "test_bad_schedule_and_preset_arguments",
    "make_problem",
    "softmax_loss",
    "FAMILY",
    "UPDATE_CASES",
    "BAD_FLATNESS_CALLS",
)


def _cases(t: types.SimpleNamespace):
    """(category, function, argument, call) for every bad input of the test tables."""
    cases = _construction_cases(t) + _update_cases(t)
    for measure, call, _, message in t.BAD_FLATNESS_CALLS:
        cases.append(("flatness", measure, re.match(r"[a-z_]+", message).group(0), call))
    return cases


def _construction_cases(t: types.SimpleNamespace):
    """The bad hyperparameters, options, schedules and presets: errors at construction."""
    cases = []
    for p in t._hyperparameter_cases():
        factory, kwargs, _, message = p.values
        fn = message.split(":")[0]
        cases.append(("hyperparameter", fn, next(iter(kwargs)), lambda f=factory, k=kwargs: f(**k)))
    for p in t._option_cases():
        factory, kwargs, _, message = p.values
        fn = message.split(":")[0]
        cases.append(("option", fn, next(iter(kwargs)), lambda f=factory, k=kwargs: f(**k)))
    mark = [
        m for m in t.test_bad_schedule_and_preset_arguments.pytestmark if m.name == "parametrize"
    ]
    for call, _, message in mark[0].args[1]:
        fn, rest = message.split(":", 1) if ":" in message else ("proportional_schedule", message)
        word = re.match(r"\s*(?:the |unknown )?([a-z_]+)", rest).group(1)
        arg = {"rho": "rho", "gam": "name", "sam": "name", "gsam": "name"}.get(word, word)
        cases.append(("schedule/preset", fn, arg, call))
    return cases


def _update_cases(t: types.SimpleNamespace):
    """The bad calls of ``update`` (arguments, state, device axis) of every factory."""
    cases = []
    x, y, params = t.make_problem(n=32, d=6, k=4, seed=6)
    params = jax.tree.map(jnp.float32, params)
    loss_fn = lambda p: t.softmax_loss(p, x, y)
    grads = jax.grad(loss_fn)(params)
    for name, factory in ((name, row.factory) for name, row in t.FAMILY.items()):
        for case, change, _, _ in t.UPDATE_CASES:
            arg = {
                "grad_fn": "grad_fn",
                "updates": "updates",
                "params": "params",
                "optax": "state",
            }[case.split()[0]]

            def run(factory=factory, change=change):
                tx = factory()
                a = dict(updates=grads, state=tx.init(params), params=params, loss_fn=loss_fn)
                a.update(change(grads, params))
                if "grad_fn" in a:
                    del a["loss_fn"]
                fns = {k: v for k, v in a.items() if k.endswith("_fn")}
                out = jax.jit(lambda u, s, p: tx.update(u, s, p, **fns))(
                    a["updates"], a["state"], a["params"]
                )
                jax.block_until_ready(out)

            cases.append(("update", name, arg, run))

        def foreign_state(factory=factory):  # every perturbation shares its count state
            tx = factory()
            tx.update(grads, optax.adam(0.1).init(params), params, loss_fn=loss_fn)

        cases.append(("state", name, "state", foreign_state))

        def unbound(factory=factory):
            tx = factory(axis_name="batch")
            jax.jit(lambda p: tx.update(grads, tx.init(p), p, loss_fn=loss_fn))(params)

        def other_axis(factory=factory):
            tx = factory(axis_name="batch")
            step = lambda _, p: tx.update(grads, tx.init(p), p, loss_fn=loss_fn)[0]
            jax.pmap(step, axis_name="devices", in_axes=(0, None))(jnp.ones(4), params)

        cases += [("axis", name, "axis_name", unbound), ("axis", name, "axis_name", other_axis)]
    return cases


def make_parser() -> argparse.ArgumentParser:
    """The study's command line: the test files that hold the tables."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.studies.count_bad_inputs",
        description=__doc__.split("\n\n")[0],
        epilog=f"e.g. python -m experiments.studies.count_bad_inputs {EXAMPLE}",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="TEST_FILE",
        help="test files that define the tables of bad inputs (each table is read from "
        "whichever file defines it)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    paths = make_parser().parse_args(argv).paths
    cases = _cases(load_tables(paths))
    tally = Counter()
    per_category = Counter()
    examples = {}
    for category, fn, arg, call in cases:
        try:
            call()
            kind = "silent"
        except (TypeError, ValueError) as error:
            text = str(error).split("\n")[0]
            kind = "clear" if (fn in text and arg in text) else "obscure"
            examples.setdefault(
                (category, kind), f"{fn}/{arg}: {type(error).__name__}: {text[:150]}"
            )
        except Exception as error:
            kind = "obscure"
            examples.setdefault(
                (category, kind), f"{fn}/{arg}: {type(error).__name__}: {str(error)[:150]}"
            )
        tally[kind] += 1
        per_category[category, kind] += 1
    print(
        f"bad inputs tried: {len(cases)}; "
        + ", ".join(f"{k}: {v}" for k, v in sorted(tally.items()))
    )
    for (category, kind), n in sorted(per_category.items()):
        print(f"  {category:16s} {kind:8s} {n}")
    for key, text in sorted(examples.items()):
        if key[1] != "clear":
            print("  e.g.", key, text)


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 4)
    main()
