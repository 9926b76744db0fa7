"""What the benchmark's arithmetic-only program can reach: GAM written by hand, flat.

``python -m experiments.benchmark --costs --arithmetic-only`` compiles one update of each
transformation, chained with SGD momentum, on ResNet-18's 62 parameter leaves with a
stand-in gradient (``g = sin(p)``, ``grad_fn = cos``). This study compiles the same program
with GAM's arithmetic written by hand on one flat vector (no checks, masks, schedules or
dtype handling; SGD momentum by hand), twice: with GAM's points as the algorithm composes
them (``theta3 = theta2 + e3``) and with ``theta3 = theta + (e2 + e3)``, so that ``theta2``
has one use. It prints their fusions and HLO lines next to the library's ``gam`` and SGD's,
counted as the benchmark counts them (compile only: the counts do not depend on load).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments import benchmark


def unit(v: jax.Array) -> jax.Array:
    return v / (jnp.linalg.norm(v) + 1e-12)


def gam_by_hand(params, momentum, *, theta3_from_theta: bool):
    """One GAM + SGD-momentum update on flat vectors (released defaults, stand-in gradient)."""
    leaves, treedef = jax.tree.flatten(params)
    splits = np.cumsum([x.size for x in leaves])[:-1]
    flat = lambda xs: jnp.concatenate([x.ravel() for x in xs])
    split = lambda v: [
        p.reshape(x.shape) for p, x in zip(jnp.split(v, splits), leaves, strict=True)
    ]
    moved = lambda xs, e: [x + s for x, s in zip(xs, split(e), strict=True)]

    g0 = flat([jnp.sin(x) for x in leaves])
    g1 = flat([jnp.cos(x) for x in moved(leaves, 0.02 * unit(g0))])
    e2 = 0.2 * unit(g1 - g0)
    theta2 = moved(leaves, e2)
    g2 = flat([jnp.cos(x) for x in theta2])
    e3 = 0.02 * unit(g2)
    theta3 = moved(leaves, e2 + e3) if theta3_from_theta else moved(theta2, e3)
    g3 = flat([jnp.cos(x) for x in theta3])
    h_plus, h_minus = 0.6 * g1 + 0.4 * g3, g0 + 0.5 * g2
    cos = jnp.vdot(h_minus, h_plus) / (jnp.linalg.norm(h_minus) * jnp.linalg.norm(h_plus) + 1e-12)
    d = h_plus - 0.03 * (h_minus - cos * jnp.linalg.norm(h_minus) * unit(h_plus))
    trace = [0.9 * m + s for m, s in zip(jax.tree.leaves(momentum), split(d), strict=True)]
    new = [x - 0.1 * t for x, t in zip(leaves, trace, strict=True)]
    return jax.tree.unflatten(treedef, new), jax.tree.unflatten(treedef, trace)


def counts_by_hand(params, theta3_from_theta: bool) -> dict:
    step = lambda p, m: gam_by_hand(p, m, theta3_from_theta=theta3_from_theta)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, params).compile()
    return benchmark.compiled_counts(compiled)


def make_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m experiments.studies.arithmetic_floor",
        description=__doc__.split("\n\n")[0],
    )


def main(argv=None) -> dict[str, dict]:
    make_parser().parse_args(argv)
    params = benchmark.model_parameters(benchmark.SETTINGS["resnet18"])
    rows = {
        row: benchmark.compiled_counts(benchmark.compile_arithmetic(row, params)[0])
        for row in ("sgd", "gam")
    }
    rows["gam by hand, theta3 = theta2 + e3"] = counts_by_hand(params, False)
    rows["gam by hand, theta3 = theta + (e2 + e3)"] = counts_by_hand(params, True)
    sgd = rows["sgd"]
    print(
        f"{'program (ResNet-18, 62 leaves)':42s} {'fusions':>8s} {'x sgd':>6s} {'HLO lines':>10s}"
    )
    for row, c in rows.items():
        ratio = c["fusions"] / sgd["fusions"]
        print(f"{row:42s} {c['fusions']:8,d} {ratio:6.2f} {c['hlo_lines']:10,d}")
    return rows


if __name__ == "__main__":
    main()
