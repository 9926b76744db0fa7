"""Misuse around the members and their wrappers is loud: one clear error that names the
argument and the fix, for every member of the family (``perturbations.FAMILY``).

The flax module's misuse table is in ``test_flax_usage.py``; bad hyperparameters and
gradients in ``test_validation.py``; the transparent mode's refusals in ``test_modes.py``.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from perturbations import FAMILY

import gam_optax

PARAMS = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
LOSS = lambda p: jnp.sum(jnp.sin(p["w"])) + jnp.sum(p["b"] ** 2)
G0 = jax.grad(LOSS)(PARAMS)


def update(tx, **extra):
    return lambda: tx.update(G0, tx.init(PARAMS), PARAMS, **extra)


def branches_on_i(p, i):
    """A grad_fn that chooses in Python by i: fine inline, not with a traced i."""
    return jax.grad(LOSS)(p) if i == 1 else jax.tree.map(jnp.zeros_like, p)


def family_cases():
    """(misuse, exception, a substring naming the argument, one naming the fix), by member."""
    for name, row in FAMILY.items():
        yield (
            f"{name}-one-argument-grad_fn",
            (
                update(row.factory(), grad_fn=lambda p: G0),
                TypeError,
                f"{name}: grad_fn must take the params and i alone",
                "grad_fn=lambda p, i:",
            ),
        )
        yield (
            f"{name}-loss_fn-of-params-and-batch",
            (
                update(row.factory(), loss_fn=lambda p, batch: LOSS(p)),
                TypeError,
                f"{name}: loss_fn must take the params alone",
                "close over the rest, e.g. loss_fn=lambda p: loss(p, batch)",
            ),
        )
        yield (
            f"{name}-python-branch-on-traced-i",
            (
                update(row.factory(unroll=False), grad_fn=branches_on_i),
                TypeError,
                "with unroll=False i is a traced int32",
                "jnp.where / jax.lax.switch on i",
            ),
        )
        yield (
            f"{name}-reuse-of-a-chain",
            (
                lambda row=row: gam_optax.reuse(optax.chain(row.factory(), optax.sgd(0.1))).init(
                    PARAMS
                ),
                TypeError,
                "reuse: inner must be a sharpness-aware member",
                "optax.chain(gam_optax.reuse(gam_optax.gam()), optax.sgd(0.1))",
            ),
        )


MISUSE = {
    **dict(family_cases()),
    "reuse-of-transparent": (
        lambda: gam_optax.reuse(gam_optax.transparent(gam_optax.sam(), optax.sgd(0.1))).init(
            PARAMS
        ),
        TypeError,
        "its init gave TransparentState",
        "Put the base optimizer after reuse",
    ),
    "transparent_gam-given-gam": (
        lambda: gam_optax.transparent_gam(gam_optax.gam()),
        TypeError,
        "transparent_gam: optimizer is gam_optax.gam(...)",
        "gam_optax.transparent(gam_optax.gam(...), optax.sgd(0.1, momentum=0.9))",
    ),
    "transparent_gam-given-loss_fn": (
        update(gam_optax.transparent_gam(optax.sgd(0.1)), loss_fn=LOSS),
        TypeError,
        "transparent_gam: update takes one gradient per call and no loss_fn",
        "use optax.chain(gam_optax.gam(...), optimizer)",
    ),
    "transparent-given-grad_fn": (
        update(gam_optax.transparent(gam_optax.gsam(), optax.sgd(0.1)), grad_fn=lambda p, i: p),
        TypeError,
        "no grad_fn; it would be ignored, and a call is 1/2 of a step",
        "optax.chain(gam_optax.gsam(...), optimizer)",
    ),
    "transparent-of-inject_hyperparams": (
        lambda: gam_optax.transparent(
            optax.inject_hyperparams(gam_optax.sam)(rho=0.1), optax.sgd(0.1)
        ),
        TypeError,
        "perturbation must be a member of the family",
        "not wrapped in optax.chain, optax.inject_hyperparams or reuse",
    ),
    "every_gradient-loss_fn-of-params-and-batch": (
        update(
            gam_optax.every_gradient(optax.clip_by_global_norm(1.0), gam_optax.sam()),
            loss_fn=lambda p, batch: LOSS(p),
        ),
        TypeError,
        "every_gradient: loss_fn must take the params alone",
        "close over the rest",
    ),
    "update-without-params": (
        lambda: gam_optax.sam().update(G0, gam_optax.sam().init(PARAMS), loss_fn=LOSS),
        ValueError,
        "sam: update needs params",
        "tx.update(grads, state, params, ...)",
    ),
}


def assert_names_the_argument_and_the_fix(misuse, error, argument, fix):
    """``misuse()`` raises ``error`` in one line holding ``argument`` and ``fix``."""
    with pytest.raises(error) as raised:
        misuse()
    message = str(raised.value)
    assert argument in message
    assert fix in message
    assert "\n" not in message  # one line


@pytest.mark.parametrize(("misuse", "error", "argument", "fix"), MISUSE.values(), ids=MISUSE)
def test_misuse_names_the_argument_and_the_fix(misuse, error, argument, fix):
    assert_names_the_argument_and_the_fix(misuse, error, argument, fix)


@pytest.mark.parametrize("name", list(FAMILY))
def test_the_same_grad_fn_is_fine_where_i_is_a_python_int(name):
    """The traced-i error is about unroll=False: inline, i is 1, 2, 3... and the branch runs."""
    tx = FAMILY[name].factory()
    d, _ = tx.update(G0, tx.init(PARAMS), PARAMS, grad_fn=branches_on_i)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(d))
