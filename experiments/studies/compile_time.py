"""Where the benchmark's ResNet-18 compile time goes: the step as a user writes it, then
with each piece of the training program's step added, then the benchmark's own step.

A user's SGD step on ResNet-18 (``experiments.models``, CIFAR shapes, batch 128, float32):
float32 images in, cross-entropy, the BatchNorm statistics as aux, ``optax.sgd(0.1,
momentum=0.9)``, ``jax.jit`` with the state donated. The training program's step
(``experiments.step.train_step``, what ``experiments.benchmark --costs`` compiles) adds, in
this order: uint8 images augmented on device (crop, flip, normalise), coupled weight decay
and a cosine schedule, label smoothing, and its metrics (accuracy, the finiteness checks
of every leaf, the skipped flag). Each row adds one piece to the row above; the last
user-written row holds them all, beside the benchmark's own step. ``gam`` and
``gam(unroll=False)`` go through both ends.

For each row, two times, each the median of ``--rounds`` interleaved rounds after a
warm-up round (every row once per round, a fresh function each time, so no cache is hit;
the first compiles of a process are slower, up to 1.5x, as JAX and flax fill their own
caches):

- ``first call``: trace + lower + compile, what a user waits for before the first step
  runs (the step's own run aside);
- ``compile``: ``lowered.compile()`` alone.

Both are also given against the user-written SGD step's. They depend on the machine's
load: the load average is printed before and after (publish only below 1.5 on 2 cores).

    python -m experiments.studies.compile_time              # ResNet-18, 5 rounds (~7 min)
    python -m experiments.studies.compile_time --tiny       # a tiny ResNet (the test's)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gam_optax
from experiments import benchmark, cli, input_pipeline, models, step, tables

# (model kwargs, batch, image shape): ResNet-18 at CIFAR shapes, and a tiny one for tests
SHAPES = {
    "resnet18": ({}, 128, (32, 32, 3)),
    "tiny": ({"stage_sizes": (1,), "num_filters": 4}, 4, (8, 8, 3)),
}
CLASSES, MEAN, STD = 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
PIECES = ("augment", "decay_schedule", "smoothing", "metrics")  # added in this order


def user_step(model, tx, pieces: frozenset[str]) -> Callable[..., Any]:
    """The step a user writes, with the training program's ``pieces`` (of :data:`PIECES`)."""

    def train_step(params, batch_stats, opt_state, images, labels, rng):
        if "augment" in pieces:  # uint8 in, augmented and normalised on device
            images = input_pipeline.augment(rng, images, MEAN, STD)
        smoothing = 0.1 if "smoothing" in pieces else 0.0

        def loss_fn(p):
            variables = {"params": p, "batch_stats": batch_stats}
            logits, new = model.apply(variables, images, train=True, mutable=["batch_stats"])
            loss = step.smoothed_cross_entropy(logits, labels, smoothing).mean()
            return loss, (new["batch_stats"], logits)

        (loss, (new_stats, logits)), g0 = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(g0, opt_state, params, loss_fn=loss_fn)
        params = optax.apply_updates(params, updates)
        if "metrics" not in pieces:
            return params, new_stats, opt_state, loss
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return params, new_stats, opt_state, {"loss": loss, "accuracy": accuracy, "finite": finite}

    return train_step


def user_chain(perturbation: Any, pieces: frozenset[str]) -> optax.GradientTransformation:
    """``perturbation`` (or nothing) before SGD; with weight decay and a schedule if asked."""
    if "decay_schedule" in pieces:
        base = optax.chain(
            optax.add_decayed_weights(5e-4),
            optax.sgd(optax.cosine_decay_schedule(0.1, 200), momentum=0.9),
        )
    else:
        base = optax.sgd(0.1, momentum=0.9)
    chain = base if perturbation is None else optax.chain(perturbation, base)
    return optax.with_extra_args_support(chain)


def user_row(shape: str, perturbation: Callable[[], Any] | None, pieces: frozenset[str]):
    """A factory of (fresh jitted function, its arguments) for a user-written row."""
    model_kwargs, batch, image_shape = SHAPES[shape]
    model = models.create_model("resnet18", CLASSES, **model_kwargs)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
    rng = np.random.default_rng(0)
    if "augment" in pieces:
        images = rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8)
    else:
        images = rng.normal(size=(batch, *image_shape)).astype(np.float32)
    labels = rng.integers(0, CLASSES, batch, dtype=np.int32)

    def make():
        tx = user_chain(None if perturbation is None else perturbation(), pieces)
        params = variables["params"]
        stats, key = variables["batch_stats"], jax.random.key(1)
        args = (params, stats, tx.init(params), images, labels, key)
        return jax.jit(user_step(model, tx, pieces), donate_argnums=(0, 1, 2)), args

    return make


def benchmark_row(shape: str, optimizer: str, sections: dict | None = None):
    """A factory of (fresh jitted function, its arguments) for the benchmark's own step."""
    model_kwargs, batch, image_shape = SHAPES[shape]
    values = ("resnet18", model_kwargs, batch, image_shape, CLASSES)

    def make():
        fresh = {k: dict(v) for k, v in (sections or {}).items()}
        return benchmark.build_step(optimizer, "resnet18", True, None, fresh, values)

    return make


def rows(shape: str) -> dict[str, Callable[[], tuple[Any, tuple]]]:
    """Every row of the study, SGD's user-written step first."""
    out, added = {}, frozenset()
    out["sgd, as a user writes it"] = user_row(shape, None, added)
    for piece in PIECES:
        added = added | {piece}
        out[f"sgd + {piece.replace('_', ' & ')}"] = user_row(shape, None, added)
    out["sgd, the benchmark's step"] = benchmark_row(shape, "sgd")
    for name, kwargs, section in (
        ("gam", {}, None),
        ("gam(unroll=False)", {"unroll": False}, {"gam": {"unroll": False}}),
    ):
        preset = {**gam_optax.gam_preset("cifar100_resnet"), "adaptive": False, **kwargs}
        member = lambda preset=preset: gam_optax.gam(**preset, has_aux=True)
        out[f"{name}, as a user writes it"] = user_row(shape, member, frozenset())
        out[f"{name} + all four pieces"] = user_row(shape, member, frozenset(PIECES))
        out[f"{name}, the benchmark's step"] = benchmark_row(shape, "gam", section)
    return out


def measure(makers: dict[str, Callable[[], tuple[Any, tuple]]], rounds: int) -> list[dict]:
    """First-call (trace + lower + compile) and compile-alone seconds of each row: medians
    of ``rounds`` interleaved rounds, and their ratios to the first row's."""
    first, alone = {name: [] for name in makers}, {name: [] for name in makers}
    for round_ in range(rounds + 1):  # round 0: a warm-up (JAX's and flax's first traces)
        for name, make in makers.items():
            jitted, args = make()
            start = time.perf_counter()
            lowered = jitted.lower(*args)
            lowered_at = time.perf_counter()
            lowered.compile()
            done = time.perf_counter()
            if round_:
                first[name].append(done - start)
                alone[name].append(done - lowered_at)
            which = f"round {round_} of {rounds}" if round_ else "warm-up"
            benchmark.progress(f"{name}: {done - start:.2f} s ({which})")
    base = next(iter(makers))
    med = lambda d, n: statistics.median(d[n])
    return [
        {
            "row": name,
            "first_s": med(first, name),
            "first_x": med(first, name) / med(first, base),
            "compile_s": med(alone, name),
            "compile_x": med(alone, name) / med(alone, base),
        }
        for name in makers
    ]


COLUMNS = (
    ("step", "{row}"),
    ("first call s", "{first_s:.2f}"),
    ("x user sgd", "{first_x:.2f}"),
    ("compile alone s", "{compile_s:.2f}"),
    ("x user sgd", "{compile_x:.2f}"),
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.studies.compile_time",
        description=__doc__.split("\n\n")[0],
        epilog="How long, on 2 CPU cores: about 7 min (ResNet-18, measured at load 0.9-1.8); "
        "--tiny about 25 s.",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds (median), after a warm-up"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny ResNet (seconds)")
    return parser


def main(argv: list[str] | None = None) -> list[dict]:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds}: compile each row at least once (--rounds 1)")
    before = benchmark.load_average("before")
    results = measure(rows("tiny" if args.tiny else "resnet18"), args.rounds)
    header = [heading for heading, _ in COLUMNS]
    cells = [[cell.format(**r) for _, cell in COLUMNS] for r in results]
    print(tables.table(header, cells, markdown=True))
    after = benchmark.load_average("after")
    warning = benchmark.load_warning(before, after)
    if warning:
        print(warning)
    return results


if __name__ == "__main__":
    main()
