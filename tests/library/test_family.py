"""What every transformation of the family must do, in one parametrised table.

Each row builds a transformation with the keyword arguments every one of them takes
(``has_aux``, ``axis_name``, ``average``); each test is one property, checked for every row
(as optax's ``contrib/_common_test.py``). The files of the single transformations keep what
is specific to each: its NumPy reference, its identities, its errors.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from perturbations import FAMILY

import gam_optax


def _reuse_gam(every=2, **kwargs):
    inner = gam_optax.gam(rho=0.3, rho_prime=0.05, **kwargs)
    parallel = {k: v for k, v in kwargs.items() if k in ("axis_name", "average")}
    return gam_optax.reuse(inner, every=every, alpha=0.5, **parallel)


TRANSFORMATIONS = {
    **{name: row.factory for name, row in FAMILY.items()},
    # Variants: the other modes of the rows, and the amortised ones.
    "gam_exact_hvp": functools.partial(gam_optax.gam, rho=0.3, rho_prime=0.05, hessian=True),
    "gam_adaptive": functools.partial(gam_optax.gam, rho=0.3, rho_prime=0.05, adaptive=True),
    "sam_gam_exact_hvp": functools.partial(gam_optax.sam_gam, 0.1, 0.5, sam_rho=0.05),
    "asam": functools.partial(gam_optax.sam, 0.5, adaptive=True),
    "looksam": functools.partial(gam_optax.looksam, 0.1, every=2, alpha=0.5),
    "reuse_gam": _reuse_gam,
}
STEPS = 3  # covers the refresh and the reuse steps of the amortised ones (every=2)
every_transformation = pytest.mark.parametrize("name", list(TRANSFORMATIONS))


def make_problem(n=16, d=4, k=3, dtype=jnp.float64):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, d)), dtype)
    y = jnp.asarray(np.eye(k)[rng.integers(0, k, size=n)], dtype)
    params = {"w": jnp.asarray(rng.normal(size=(d, k)), dtype), "b": jnp.zeros(k, dtype)}
    return x, y, params


def softmax_loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))


def directions(tx, params, loss, steps=STEPS, **extra):
    """The directions of ``steps`` updates at fixed params (state carried over)."""
    state, out = tx.init(params), []
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
    for _ in range(steps):
        d, state = step(jax.grad(loss)(params), state, params)
        out.append(d)
    return out, state


def assert_close(a, b, rtol=1e-12, atol=1e-14):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@every_transformation
def test_at_a_stationary_point_the_direction_is_zero(name):
    """g0 = 0 (and every perturbation is then zero): d = 0 exactly, never NaN."""
    tx = TRANSFORMATIONS[name]()
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)
    for d in directions(tx, params, loss, loss_fn=loss)[0]:
        assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(d))


@every_transformation
def test_loss_fn_with_aux_and_grad_fn_give_the_same_direction(name, x64):
    x, y, params = make_problem()
    loss = lambda p: softmax_loss(p, x, y)
    plain = directions(TRANSFORMATIONS[name](), params, loss, loss_fn=loss)[0]
    with_aux = directions(
        TRANSFORMATIONS[name](has_aux=True), params, loss, loss_fn=lambda p: (loss(p), {"a": 1.0})
    )[0]
    grad_fn = directions(
        TRANSFORMATIONS[name](), params, loss, grad_fn=lambda p, i: jax.grad(loss)(p)
    )[0]
    assert_close(with_aux, plain)
    assert_close(grad_fn, plain)
    g0 = jax.grad(loss)(params)
    gap = max(float(jnp.max(jnp.abs(d["w"] - g0["w"]))) for d in plain)
    assert gap > 1e-6  # the transformation did change the gradient


@every_transformation
def test_a_chain_hands_the_direction_to_the_base_optimizer(name, x64):
    x, y, params = make_problem()
    loss = lambda p: softmax_loss(p, x, y)
    chained = optax.chain(TRANSFORMATIONS[name](), optax.sgd(0.1))
    got = directions(chained, params, loss, loss_fn=loss)[0]
    expected = directions(TRANSFORMATIONS[name](), params, loss, loss_fn=loss)[0]
    for u, d in zip(got, expected, strict=True):
        assert_close(u, jax.tree.map(lambda v: -0.1 * v, d))


@every_transformation
def test_bfloat16_parameters_keep_their_dtype_in_the_direction_and_the_state(name):
    x, y, params = make_problem(dtype=jnp.bfloat16)
    loss = lambda p: softmax_loss(p, x, y)
    tx = TRANSFORMATIONS[name]()
    initial = jax.tree.map(lambda v: v.dtype, tx.init(params))
    ds, state = directions(tx, params, loss, loss_fn=loss)
    for d in ds:
        assert {leaf.dtype for leaf in jax.tree.leaves(d)} == {jnp.dtype(jnp.bfloat16)}
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(d))
    assert jax.tree.map(lambda v: v.dtype, state) == initial


@every_transformation
@pytest.mark.parametrize(
    "params_dtype, grads_dtype", [("bfloat16", "float32"), ("float32", "bfloat16")]
)
def test_the_direction_has_the_incoming_updates_dtype_and_the_state_keeps_its_own(
    name, params_dtype, grads_dtype
):
    """Mixed precision: parameters in one dtype, the incoming gradient in another (e.g. a
    float32 master gradient of bfloat16 parameters). The direction is cast back to the
    incoming dtype, whatever dtype the evaluated gradients had; the state keeps its dtypes."""
    x, y, params = make_problem(dtype=jnp.dtype(params_dtype))
    loss = lambda p: softmax_loss(p, x, y)
    tx = TRANSFORMATIONS[name]()
    state = tx.init(params)
    initial = jax.tree.map(lambda v: v.dtype, state)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss))
    g0 = jax.tree.map(lambda v: v.astype(grads_dtype), jax.grad(loss)(params))
    for _ in range(STEPS):
        d, state = step(g0, state, params)
        assert {leaf.dtype for leaf in jax.tree.leaves(d)} == {jnp.dtype(grads_dtype)}
        assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(d))
    assert jax.tree.map(lambda v: v.dtype, state) == initial


@every_transformation
def test_the_step_compiles_once(name):
    x, y, params = make_problem(dtype=jnp.float32)
    tx, traces = TRANSFORMATIONS[name](), []

    @jax.jit
    def step(params, state, x, y):
        traces.append(None)
        loss = lambda p: softmax_loss(p, x, y)
        updates, state = tx.update(jax.grad(loss)(params), state, params, loss_fn=loss)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for i in range(4):  # new data every step
        params, state = step(params, state, x + i, y)
    assert len(traces) == 1


@every_transformation
def test_pmap_averaging_every_gradient_is_the_full_batch_step(name, x64):
    """average='gradients' on 4 devices, each with a quarter of the batch, gives every device
    the one-device direction on the whole batch (float64: the same computation, split)."""
    assert jax.device_count() == 4, "the root conftest sets 4 fake CPU devices"
    x, y, params = make_problem(n=16)
    full = directions(
        TRANSFORMATIONS[name](),
        params,
        lambda p: softmax_loss(p, x, y),
        loss_fn=(lambda p: softmax_loss(p, x, y)),
    )[0]
    tx = TRANSFORMATIONS[name](axis_name="batch", average="gradients")

    def per_device(params, x, y):
        loss = lambda p: softmax_loss(p, x, y)
        state, out = tx.init(params), []
        for _ in range(STEPS):
            d, state = tx.update(jax.grad(loss)(params), state, params, loss_fn=loss)
            out.append(d)
        return out

    shard = lambda a: a.reshape(4, -1, *a.shape[1:])
    split = jax.pmap(per_device, "batch", in_axes=(None, 0, 0))(params, shard(x), shard(y))
    for got, want in zip(split, full, strict=True):
        for device in range(4):
            assert_close(jax.tree.map(lambda v, i=device: v[i], got), want, rtol=1e-10, atol=1e-12)
