"""The floor study's hand-written GAM is the library's GAM: the same update in float64, so
its counts are those of the same computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gam_optax
from experiments.studies import arithmetic_floor


@pytest.mark.parametrize("theta3_from_theta", [False, True])
def test_the_hand_written_update_is_the_librarys(theta3_from_theta, x64):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4))), "b": jnp.asarray(rng.normal(size=4))}
    momentum = jax.tree.map(lambda x: 0.1 * jnp.cos(x), params)
    tx = optax.chain(gam_optax.gam(), optax.sgd(0.1, momentum=0.9))  # released defaults
    state = tx.init(params)
    state = (state[0], (optax.TraceState(trace=momentum), *state[1][1:]))
    grad_fn = lambda q, i: jax.tree.map(jnp.cos, q)
    updates, _ = tx.update(jax.tree.map(jnp.sin, params), state, params, grad_fn=grad_fn)
    want = optax.apply_updates(params, updates)
    got, _ = arithmetic_floor.gam_by_hand(params, momentum, theta3_from_theta=theta3_from_theta)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert not np.allclose(
        want["w"], params["w"] - 0.1 * (np.sin(params["w"]) + 0.9 * momentum["w"])
    )
