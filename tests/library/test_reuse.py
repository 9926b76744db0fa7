"""reuse() and looksam(): the LookSAM formula, exact refreshes, skipped gradients, data parallel.

The reference is a NumPy implementation of the formula on a separable quartic whose gradient
is written by hand, with NumPy SAM and GSAM as the inner directions.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gam_optax

GAM = dict(rho=0.3, rho_prime=0.05, alpha=0.6, beta=0.4, gamma=0.2)


# ---------------------------------------------------------------------------
# A quartic with a hand-derived gradient, and the formula in NumPy.
# ---------------------------------------------------------------------------


def make_quartic(seed=0):
    """L(theta) = sum a (theta - c)^2 + theta^4 / 4, over a two-leaf pytree."""
    rng = np.random.default_rng(seed)
    shapes = {"b": (2,), "w": (3, 2)}  # sorted: the flattening order of the dict
    a = {k: rng.uniform(0.5, 2.0, s) for k, s in shapes.items()}
    c = {k: rng.normal(size=s) for k, s in shapes.items()}
    params = {k: rng.normal(size=s) for k, s in shapes.items()}

    def loss(p):
        return sum(jnp.sum(a[k] * (p[k] - c[k]) ** 2 + p[k] ** 4 / 4) for k in shapes)

    flat_a, flat_c = flat(a), flat(c)
    numpy_grad = lambda t: 2 * flat_a * (t - flat_c) + t**3
    return loss, numpy_grad, params


def flat(tree):
    return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in sorted(tree)])


def numpy_orthogonal(v, u, xi=1e-12):
    cos = v @ u / (np.linalg.norm(u) * np.linalg.norm(v) + xi)
    return v - cos * np.linalg.norm(v) * u / (np.linalg.norm(u) + xi)


def numpy_sam(grad, theta, rho, xi=1e-12):
    g0 = grad(theta)
    return grad(theta + rho * g0 / (np.linalg.norm(g0) + xi))


def numpy_gsam(grad, theta, rho, alpha, xi=1e-12):
    g0, g1 = grad(theta), numpy_sam(grad, theta, rho, xi)
    return g1 - alpha * numpy_orthogonal(g0, g1, xi)


def numpy_reuse(inner, grad, theta, steps, every, alpha, lr, rescale=True, xi=1e-12):
    """The directions of ``steps`` SGD steps: refresh when t % every == 0, reuse otherwise."""
    directions, v = [], np.zeros_like(theta)
    for t in range(steps):
        g0 = grad(theta)
        if t % every == 0:
            d = inner(theta)
            v = numpy_orthogonal(d, g0, xi)
        else:
            c = alpha(t) * np.linalg.norm(g0) / (np.linalg.norm(v) + xi) if rescale else alpha(t)
            d = g0 + c * v
        directions.append(d)
        theta = theta - lr * d
    return directions


def run(tx, loss, params, steps, lr=0.05):
    """The directions of ``steps`` SGD steps driven by ``tx``, one jitted update per step."""
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss))
    directions = []
    for _ in range(steps):
        d, state = update(jax.grad(loss)(params), state, params)
        directions.append(d)
        params = jax.tree.map(lambda p, x: p - lr * x, params, d)
    return directions, state


# ---------------------------------------------------------------------------
# The formula, float64.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("inner_name", ["sam", "gsam"])
def test_directions_match_numpy_reference(x64, rescale, inner_name):
    loss, grad, params = make_quartic()
    np.testing.assert_allclose(flat(jax.grad(loss)(params)), grad(flat(params)), rtol=1e-13)
    alpha = lambda t: 0.3 + 0.1 * t  # a schedule of the step count
    if inner_name == "sam":
        inner, numpy_inner = gam_optax.sam(0.2), lambda t: numpy_sam(grad, t, 0.2)
    else:
        inner, numpy_inner = gam_optax.gsam(0.2, 0.5), lambda t: numpy_gsam(grad, t, 0.2, 0.5)
    tx = gam_optax.reuse(inner, every=3, alpha=alpha, rescale=rescale)
    got, state = run(tx, loss, params, steps=8)
    expected = numpy_reuse(numpy_inner, grad, flat(params), 8, 3, alpha, 0.05, rescale)
    for t, (d, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(flat(d), e, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")
    assert int(state.count) == 8
    # The reused component really changes the skip steps: they are not plain g0.
    assert np.linalg.norm(expected[1] - grad(flat(params) - 0.05 * expected[0])) > 1e-3


def test_refresh_steps_equal_the_inner_transformation_exactly(x64):
    loss, _, params = make_quartic(seed=1)
    rho = lambda count: 0.4 / (1.0 + count)  # a schedule: it must see the true step count
    inner = gam_optax.gam(**{**GAM, "rho": rho})
    got, _ = run(gam_optax.reuse(inner, every=3, alpha=0.7), loss, params, steps=7)
    # Replay the same parameters through the inner transformation at the same counts.
    p = params
    for t, d in enumerate(got):
        if t % 3 == 0:
            state = gam_optax.GAMState(count=jnp.asarray(t, jnp.int32))
            expected, _ = inner.update(jax.grad(loss)(p), state, p, loss_fn=loss)
            np.testing.assert_allclose(flat(d), flat(expected), rtol=1e-12, err_msg=f"step {t}")
        p = jax.tree.map(lambda q, x: q - 0.05 * x, p, d)
    # every=1 is the inner transformation.
    every_step, _ = run(gam_optax.reuse(inner, every=1, alpha=0.7), loss, params, steps=3)
    plain, _ = run(inner, loss, params, steps=3)
    for d, e in zip(every_step, plain, strict=True):
        np.testing.assert_allclose(flat(d), flat(e), rtol=1e-12)


def test_looksam_is_reuse_of_sam(x64):
    loss, _, params = make_quartic(seed=2)
    looksam, _ = run(gam_optax.looksam(0.1, every=2, alpha=0.5), loss, params, steps=5)
    wrapped, _ = run(gam_optax.reuse(gam_optax.sam(0.1), 2, 0.5), loss, params, steps=5)
    for d, e in zip(looksam, wrapped, strict=True):
        np.testing.assert_array_equal(flat(d), flat(e))


# ---------------------------------------------------------------------------
# The skipped gradient evaluations do not run.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("every", "refreshes"), [(1, 10), (4, 3), (10, 1)])
def test_skip_steps_evaluate_no_gradient(every, refreshes):
    loss, _, params = make_quartic(seed=3)
    params = jax.tree.map(jnp.float32, params)
    calls = []

    def counted_loss(p):  # the host callback runs once per forward pass that executes
        jax.debug.callback(lambda: calls.append(1))
        return loss(p)

    tx = optax.chain(gam_optax.reuse(gam_optax.gam(**GAM), every=every), optax.sgd(0.01))

    @jax.jit
    def ten_steps(params, state):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(loss)(params)  # the caller's g0: not counted
            updates, state = tx.update(grads, state, params, loss_fn=counted_loss)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), length=10)[0]

    jax.block_until_ready(ten_steps(params, tx.init(params)))
    jax.effects_barrier()
    assert len(calls) == 3 * refreshes  # GAM's 3 extra gradients, on refresh steps only


def test_refresh_chosen_by_the_caller_equals_the_conditional_and_skips_without_it(x64):
    """refresh=True/False (static, no lax.cond) gives the directions of the conditional form
    when chosen on the same schedule; a False step evaluates no gradient at all."""
    loss, _, params = make_quartic(seed=4)
    tx = gam_optax.reuse(gam_optax.gam(**GAM), every=3, alpha=0.5)
    calls = []

    def counted_loss(p):
        jax.debug.callback(lambda: calls.append(1))
        return loss(p)

    @functools.partial(jax.jit, static_argnames="refresh")
    def step(params, state, refresh=None):
        return tx.update(
            jax.grad(loss)(params), state, params, loss_fn=counted_loss, refresh=refresh
        )

    by_cond, by_caller = tx.init(params), tx.init(params)
    for t in range(7):
        d_cond, by_cond = step(params, by_cond)
        calls.clear()
        d_caller, by_caller = step(params, by_caller, refresh=t % 3 == 0)
        jax.effects_barrier()
        assert len(calls) == (3 if t % 3 == 0 else 0)
        np.testing.assert_allclose(flat(d_caller), flat(d_cond), rtol=1e-12)
        params = jax.tree.map(lambda q, x: q - 0.05 * x, params, d_cond)
    assert int(by_caller.count) == int(by_cond.count) == 7
    with pytest.raises(TypeError, match="refresh must be a Python bool"):
        tx.update(jax.grad(loss)(params), by_caller, params, loss_fn=loss, refresh=1)


# ---------------------------------------------------------------------------
# State, dtypes, hyperparameters.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_is_count_buffer_and_inner_state_in_the_params_dtype(dtype):
    loss, _, params = make_quartic(seed=4)
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
    tx = gam_optax.reuse(gam_optax.gam(**GAM), every=2)
    directions, state = run(tx, lambda p: loss(jax.tree.map(jnp.float32, p)), params, steps=3)
    assert state.count.dtype == jnp.int32 and int(state.count) == 3
    assert jax.tree.structure(state.v) == jax.tree.structure(params)
    leaves = [jax.tree.leaves(t) for t in (state.v, directions[-1], params)]
    for v, d, p in zip(*leaves, strict=True):
        assert v.dtype == d.dtype == dtype and v.shape == p.shape
    assert float(gam_optax._tree_math.global_norm(state.v)) > 0  # the refresh of step 2 stored it


def test_inject_hyperparams_equals_constant_arguments():
    loss, _, params = make_quartic(seed=5)
    params = jax.tree.map(jnp.float32, params)
    inner = gam_optax.sam(0.1)
    injected = optax.inject_hyperparams(gam_optax.reuse)(inner, every=3, alpha=0.4)
    static = optax.inject_hyperparams(gam_optax.reuse, static_args=("every",))
    plain, _ = run(gam_optax.reuse(inner, every=3, alpha=0.4), loss, params, steps=5)
    for tx in (injected, static(inner, every=3, alpha=0.4)):
        got, state = run(tx, loss, params, steps=5)
        assert int(state.inner_state.count) == 5
        for d, e in zip(got, plain, strict=True):
            # The same float32 operations; only the hyperparameters' dtypes differ.
            np.testing.assert_allclose(flat(d), flat(e), rtol=1e-6)


def test_has_aux_passes_through_to_the_inner_transformation(x64):
    loss, _, params = make_quartic(seed=6)
    with_aux = lambda p: (loss(p), {"anything": 1.0})
    tx = gam_optax.looksam(0.1, every=2, has_aux=True)
    state = tx.init(params)
    d, _ = tx.update(jax.grad(loss)(params), state, params, loss_fn=with_aux)
    e, _ = gam_optax.sam(0.1).update(
        jax.grad(loss)(params), gam_optax.sam(0.1).init(params), params, loss_fn=loss
    )
    np.testing.assert_allclose(flat(d), flat(e), rtol=1e-12)  # the aux is dropped, not summed


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(every=0), ValueError, "every must be a positive integer"),
        (dict(every=-2), ValueError, "every must be a positive integer"),
        (dict(every=2.5), ValueError, "every must be a positive integer"),
        (dict(every=True), ValueError, "every must be a positive integer"),
        (dict(every="5"), ValueError, "every must be a positive integer"),
        (dict(alpha=-0.1), ValueError, "alpha must be a finite number >= 0"),
        (dict(alpha=float("nan")), ValueError, "alpha must be a finite number >= 0"),
        (dict(alpha=lambda t: -1.0 + 0 * t), ValueError, "alpha schedule at step 0"),
        (dict(eps=-1.0), ValueError, "eps must be a finite number >= 0"),
        (dict(average="all"), ValueError, "'direction'"),
        (dict(inner=optax.sgd), TypeError, "inner must be an optax GradientTransformation"),
        (dict(rescale="yes"), TypeError, "reuse: rescale must be a Python bool.*got str 'yes'"),
        (dict(axis_name=0), TypeError, "reuse: axis_name must be a string"),
        (dict(every=np.array([5, 6])), ValueError, "every must be a positive integer"),
    ],
)
def test_invalid_arguments_fail_at_construction(kwargs, error, message):
    arguments = dict(inner=gam_optax.sam(0.1), every=5, alpha=0.7) | kwargs
    with pytest.raises(error, match=message):
        gam_optax.reuse(**arguments)


def test_update_without_params_fails_clearly():
    loss, _, params = make_quartic()
    tx = gam_optax.looksam()
    with pytest.raises(ValueError, match="needs params"):
        tx.update(jax.grad(loss)(params), tx.init(params), None, loss_fn=loss)


# ---------------------------------------------------------------------------
# Data parallel, on 4 fake CPU devices: a least-squares problem split in 4 shards.
# ---------------------------------------------------------------------------


@pytest.fixture
def sharded_problem(x64):
    """Float64: the reductions' reordering is far below the tolerance. Directions are of
    order 0.1-1 and v is a difference of such vectors, so small elements are compared with an
    absolute tolerance of 1e-10 (the reordering gives ~1e-11)."""
    assert jax.device_count() == 4, "the root conftest.py sets 4 fake CPU devices"
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(32, 5)), rng.normal(size=(32, 3))
    params = {"w": rng.normal(size=(5, 3)) * 0.5, "b": np.zeros(3)}
    loss = lambda p, bx, by: jnp.mean((jnp.tanh(bx @ p["w"] + p["b"]) - by) ** 2)
    return [jax.tree.map(jnp.asarray, t) for t in (x, y, params)] + [loss]


def _two_steps_pmap(x, y, params, loss, average):
    """The directions of a refresh step and a skip step, at the same params, per device."""
    kwargs = dict(axis_name="batch", average=average)
    tx = gam_optax.looksam(0.1, every=2, alpha=0.7, **kwargs)

    def per_device(params, bx, by):
        loss_fn = lambda p: loss(p, bx, by)
        grads = jax.grad(loss_fn)(params)
        d0, state = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
        d1, _ = tx.update(grads, state, params, loss_fn=loss_fn)
        return d0, d1

    shards = lambda a: a.reshape(4, -1, *a.shape[1:])
    d0, d1 = jax.pmap(per_device, axis_name="batch", in_axes=(None, 0, 0))(
        params, shards(x), shards(y)
    )
    return [jax.tree.map(lambda d: d[0], t) for t in (d0, d1)]


def test_pmap_direction_mode_averages_per_shard_directions(sharded_problem):
    x, y, params, loss = sharded_problem
    got = _two_steps_pmap(x, y, params, loss, "direction")
    shards = [slice(8 * i, 8 * i + 8) for i in range(4)]
    grad = lambda s: flat(jax.grad(lambda p: loss(p, x[s], y[s]))(params))
    sam = gam_optax.sam(0.1)
    sam_d = lambda s: flat(
        sam.update(
            jax.grad(lambda p: loss(p, x[s], y[s]))(params),
            sam.init(params),
            params,
            loss_fn=lambda p: loss(p, x[s], y[s]),
        )[0]
    )
    g0s = [grad(s) for s in shards]
    refresh = np.mean([sam_d(s) for s in shards], axis=0)  # per-device SAM, averaged
    v = numpy_orthogonal(refresh, np.mean(g0s, axis=0))  # against the averaged g0
    skip = np.mean([g + 0.7 * np.linalg.norm(g) / np.linalg.norm(v) * v for g in g0s], axis=0)
    np.testing.assert_allclose(flat(got[0]), refresh, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(flat(got[1]), skip, rtol=1e-10, atol=1e-10)


def test_shard_map_gradients_mode_equals_one_device(sharded_problem):
    x, y, params, loss = sharded_problem
    mesh = jax.make_mesh((4,), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
    inner = gam_optax.gam(**GAM, axis_name="data", average="gradients")
    tx = gam_optax.reuse(inner, every=2, axis_name="data", average="gradients")

    def body(params, bx, by):
        loss_fn = lambda p: loss(p, bx, by)
        grads = jax.grad(loss_fn)(jax.lax.pcast(params, "data", to="varying"))
        d0, state = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
        d1, state = tx.update(grads, state, params, loss_fn=loss_fn)
        return d0, d1, state

    sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
    d0, d1, state = jax.jit(sharded)(params, xs, ys)
    full_loss = lambda p: loss(p, x, y)
    one = gam_optax.reuse(gam_optax.gam(**GAM), every=2)
    grads = jax.grad(full_loss)(params)
    e0, one_state = one.update(grads, one.init(params), params, loss_fn=full_loss)
    e1, one_state = one.update(grads, one_state, params, loss_fn=full_loss)
    for g, e in ((d0, e0), (d1, e1), (state.v, one_state.v)):
        np.testing.assert_allclose(flat(g), flat(e), rtol=1e-10, atol=1e-10)
