"""Temporary memory of each member's step on a dense model whose parameters set the peak.

A tanh MLP (widths 512-1024-1024-1024-512-10, 3.7 M float32 parameters) on a batch of 8:
the activations are small, so XLA's temporary memory beyond SGD's step, in parameter
copies, is the optimizer's own (``compiled.memory_analysis().temp_size_in_bytes``, compile
only, so the figures do not depend on load). The ResNet-18 table of ``experiments.benchmark
--costs`` is the other end: there the activations set the peak.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import gam_optax

WIDTHS = (512, 1024, 1024, 1024, 512, 10)
ROWS = {
    "sam": lambda: gam_optax.sam(),
    "sam(unroll=False)": lambda: gam_optax.sam(unroll=False),
    "sam(flat=True)": lambda: gam_optax.sam(flat=True),
    "gam": lambda: gam_optax.gam(),
    "gam(flat=False)": lambda: gam_optax.gam(flat=False),
    "gam(unroll=False)": lambda: gam_optax.gam(unroll=False),
    "gam(unroll=False, flat=False)": lambda: gam_optax.gam(unroll=False, flat=False),
}


def loss(params, x, y):
    h = x
    for i in range(len(WIDTHS) - 1):
        h = h @ params[f"w{i}"]
        h = jnp.tanh(h) if i < len(WIDTHS) - 2 else h
    return jnp.mean((h - y) ** 2)


def temp_bytes(tx, params, x, y) -> int:
    def step(p, s, x, y):
        loss_fn = lambda q: loss(q, x, y)
        updates, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
        return optax.apply_updates(p, updates), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), x, y).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.studies.dense_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--rows", nargs="+", choices=list(ROWS), default=list(ROWS), help="default: all"
    )
    return parser


def main(argv=None) -> dict[str, float]:
    args = make_parser().parse_args(argv)
    keys = jax.random.split(jax.random.key(0), len(WIDTHS) - 1)
    params = {
        f"w{i}": 0.01 * jax.random.normal(k, (a, b))
        for i, (k, a, b) in enumerate(zip(keys, WIDTHS[:-1], WIDTHS[1:], strict=True))
    }
    x, y = jnp.ones((8, WIDTHS[0])), jnp.zeros((8, WIDTHS[-1]))
    param_bytes = sum(v.nbytes for v in jax.tree.leaves(params))
    sgd = lambda: optax.sgd(0.1, momentum=0.9)
    base = temp_bytes(sgd(), params, x, y)
    copies = {}
    for row in args.rows:
        tx = optax.chain(ROWS[row](), sgd())
        copies[row] = (temp_bytes(tx, params, x, y) - base) / param_bytes
        print(f"{row:20s} {copies[row]:.2f} extra parameter copies")
    return copies


if __name__ == "__main__":
    main()
