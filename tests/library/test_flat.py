"""The flat view (``flat=True``): the arithmetic on one vector (on one device), whatever the
leaves. Sharded parameters: ``test_sharded.py``.

The flat and leaf-by-leaf arithmetic agree to round-off in float64 for every member
(``test_modes.py``); here: the view itself, the dtypes of mixed-precision parameters, and
the number of reductions in the traced step, which must not grow with the leaves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gam_optax
from gam_optax._views import LEAF_BY_LEAF, FlatView, view_of

MIXED = {
    "kernel": jnp.arange(6.0, dtype=jnp.bfloat16).reshape(2, 3),
    "scale": jnp.array(2.5, jnp.float32),
    "bias": jnp.array([-1.0, 0.5], jnp.bfloat16),
}


def test_a_tree_goes_flat_in_float32_and_comes_back_in_its_own_dtypes():
    view = FlatView(MIXED)
    (v,) = view.flat(MIXED)  # one device: one group, one vector
    assert v.dtype == jnp.float32 and v.shape == (9,)
    # jax.tree.leaves' order (sorted keys): bias, kernel, scale.
    np.testing.assert_array_equal(v, [-1.0, 0.5, 0, 1, 2, 3, 4, 5, 2.5])
    back = view.tree((v,), MIXED)
    assert jax.tree.structure(back) == jax.tree.structure(MIXED)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(MIXED), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


def test_a_mask_goes_flat_as_constant_bools():
    (mask,) = FlatView(MIXED).mask({"kernel": True, "scale": False, "bias": False})
    assert isinstance(mask, np.ndarray) and mask.dtype == bool
    np.testing.assert_array_equal(mask, [False] * 2 + [True] * 6 + [False])
    assert FlatView(MIXED).mask(None) is None


def test_no_leaves_or_flat_false_stay_leaf_by_leaf():
    assert view_of({}, flat=True) is LEAF_BY_LEAF
    assert view_of(MIXED, flat=False) is LEAF_BY_LEAF
    assert isinstance(view_of(MIXED, flat=True), FlatView)


@pytest.mark.parametrize("name", ["sam", "gam"])
def test_mixed_precision_keeps_each_leafs_dtype_and_agrees_within_bfloat16(name):
    """bfloat16 and float32 leaves: the direction comes back in each leaf's dtype, and flat
    (sums in float32) and leaf by leaf (GAM's sums rounded to the leaf's dtype before the
    direction) differ by bfloat16 rounding only: a few units of 2^-8 of the scale."""
    params = jax.tree.map(lambda x: x / 4, MIXED)
    loss = lambda p: sum(jnp.sum(jnp.sin(x.astype(jnp.float32)) ** 2) for x in jax.tree.leaves(p))
    g0 = jax.grad(loss)(params)
    out = {}
    for flat in (True, False):
        tx = getattr(gam_optax, name)(flat=flat)
        d, _ = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p, loss_fn=loss))(
            g0, tx.init(params), params
        )
        assert jax.tree.map(lambda x: x.dtype, d) == jax.tree.map(lambda x: x.dtype, params)
        out[flat] = d
    scale = max(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) for x in jax.tree.leaves(out[0]))
    for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False]), strict=True):
        difference = jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
        assert float(difference) <= 8 * 2.0**-8 * scale


def reductions(tx, leaves: int) -> int:
    """The reduce_sum operations in the traced update of ``tx`` on ``leaves`` leaves."""
    params = {f"w{k:02d}": jnp.full((3,), 0.1 * (k + 1)) for k in range(leaves)}
    grad_fn = lambda q, i: jax.tree.map(jnp.cos, q)
    g0 = jax.tree.map(jnp.sin, params)
    jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
        g0, tx.init(params), params
    )

    def count(j):  # a jaxpr, with those nested in its equations' parameters (jit, scan...)
        n = 0
        for eqn in j.eqns:
            n += eqn.primitive.name == "reduce_sum"
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
                    n += count(sub) if hasattr(sub, "eqns") else 0
        return n

    return count(jaxpr.jaxpr)


@pytest.mark.parametrize("name", ["sam", "gsam", "gam", "gam_penalty"])
def test_flat_reductions_do_not_grow_with_the_leaves(name):
    make = {"gam_penalty": lambda **k: gam_optax.gam_penalty(0.1, 0.5, hvp_step=0.05, **k)}.get(
        name, getattr(gam_optax, name)
    )
    flat = [reductions(make(flat=True), n) for n in (2, 8)]
    leafwise = [reductions(make(flat=False), n) for n in (2, 8)]
    assert flat[0] == flat[1] > 0
    assert leafwise[1] > leafwise[0]  # the leaf-by-leaf count is per leaf: the test can see it


def test_flat_is_the_default_where_the_arithmetic_is_large():
    assert gam_optax.gam().options.flat and gam_optax.gam_penalty(0.1, 0.5).options.flat
    assert gam_optax.sam_gam(0.1, 0.5, sam_rho=0.05).options.flat
    assert not gam_optax.sam().options.flat and not gam_optax.gsam().options.flat
