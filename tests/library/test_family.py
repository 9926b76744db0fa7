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


# ---------------------------------------------------------------------------
# bfloat16 values: the direction is the float32 one, within bfloat16 rounding.
# ---------------------------------------------------------------------------

# Every transformation as built above (sam, gsam, asam, looksam leaf by leaf; gam, gam_penalty,
# sam_gam on a flat vector), and the five members with the other arithmetic.
BFLOAT16_CASES = {
    **{name: (name, {}) for name in TRANSFORMATIONS},
    **{
        f"{name}_flat={not TRANSFORMATIONS[name]().options.flat}": (
            name,
            {"flat": not TRANSFORMATIONS[name]().options.flat},
        )
        for name in FAMILY
    },
}
# One rounding to bfloat16 costs at most u = 2**-8 relative. The bfloat16 run rounds g0, each
# gradient it evaluates, each point theta + e, the direction, and leaf by leaf its running
# sums once more: five roundings. On the problem below (|g0| < rho' |H|: theta is near the
# minimum, its entries ~0.01) the finite difference g1 - g0 at most doubles those of g0 and
# g1, and a point's rounding moves its gradient by at most |H| |point| u ~ |gradient| u. So
# at most ~6u in the worst case (each rounding at its bound and all of one sign), 8u allowed,
# relative to the direction's largest entry. The float32 reference's own error, ~1e-7, is
# negligible. An f32 leaf whose gradient nothing bfloat16 touches is held to 8 float32 units
# doubled (16 * 2**-24): both runs do the same float32 arithmetic on the same values, in an
# order XLA may change.
BFLOAT16_TOLERANCE = 8 * 2.0**-8
FLOAT32_TOLERANCE = 16 * 2.0**-24


def scale_relative(a, b):
    """max |a - b| over the tree, relative to the largest entry of ``b`` (upcast)."""
    a, b = (jax.tree.leaves(jax.tree.map(lambda v: v.astype(jnp.float32), t)) for t in (a, b))
    scale = max(float(jnp.max(jnp.abs(v))) for v in b)
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(a, b, strict=True)) / scale


def near_minimum_loss(n, seed):
    """theta -> 1/2 theta'A theta + 1/4 sum theta^4 in float32 (A = I + a symmetric part, its
    eigenvalues within [0.7, 1.3]), and a theta near its minimum 0 (entries ~0.01): its
    gradient A theta is small next to rho' |H|, so the finite differences stay well
    conditioned in bfloat16."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, n))
    a = jnp.asarray(np.eye(n) + 0.1 * (s + s.T) / np.sqrt(n), jnp.float32)
    loss = lambda t: 0.5 * t @ a @ t + 0.25 * jnp.sum(t**4)
    return loss, 0.01 * rng.normal(size=n)


def bfloat16_problem(dtypes):
    """Params {"b": (3,), "w": (4, 3)} in ``dtypes``, and a loss computed in float32 from
    them (the model's arithmetic is not under test: its gradient is rounded once, to the
    leaf's dtype, by jax.grad)."""
    loss, theta = near_minimum_loss(15, seed=11)
    params = {"b": theta[:3], "w": theta[3:].reshape(4, 3)}
    params = {k: jnp.asarray(v, dtypes[k]) for k, v in params.items()}
    flat = lambda p: jnp.concatenate(
        [p["b"].astype(jnp.float32), p["w"].astype(jnp.float32).ravel()]
    )
    return params, lambda p: loss(flat(p))


def upcast_tree(params):
    return jax.tree.map(lambda v: v.astype(jnp.float32), params)


@pytest.mark.parametrize(
    "dtypes",
    [{"b": jnp.bfloat16, "w": jnp.bfloat16}, {"b": jnp.bfloat16, "w": jnp.float32}],
    ids=["bfloat16", "mixed"],
)
@pytest.mark.parametrize("case", list(BFLOAT16_CASES))
def test_bfloat16_direction_is_the_float32_one_within_bfloat16_rounding(case, dtypes):
    """All-bfloat16 params, and a mixed tree (a bfloat16 leaf and a float32 one, coupled by
    the loss): each step's direction equals the float32 run's from the same values upcast,
    to bfloat16 rounding (the flat vector, the sums and every norm in float32)."""
    name, options = BFLOAT16_CASES[case]
    params, loss = bfloat16_problem(dtypes)
    got = directions(TRANSFORMATIONS[name](**options), params, loss, loss_fn=loss)[0]
    want = directions(TRANSFORMATIONS[name](**options), upcast_tree(params), loss, loss_fn=loss)[0]
    for t, (d, reference) in enumerate(zip(got, want, strict=True)):
        assert {k: v.dtype for k, v in d.items()} == {k: jnp.dtype(v) for k, v in dtypes.items()}
        assert scale_relative(d, reference) < BFLOAT16_TOLERANCE, t
    # The problem is not trivial: the direction is not the incoming gradient.
    g0 = jax.grad(loss)(upcast_tree(params))
    assert scale_relative(want[0], g0) > 0.05


@pytest.mark.parametrize("case", list(BFLOAT16_CASES))
def test_a_float32_leaf_beside_a_bfloat16_one_keeps_float32_precision(case):
    """A mixed tree whose bfloat16 leaf has a zero gradient (the loss does not use it): no
    bfloat16 rounding reaches the float32 leaf, whose direction must then be the float32
    run's to float32 rounding. A flat vector or a norm held in bfloat16 would round it."""
    name, options = BFLOAT16_CASES[case]
    loss_of, theta = near_minimum_loss(12, seed=12)
    params = {
        "a": jnp.full(3, 0.5, jnp.bfloat16),
        "w": jnp.asarray(theta.reshape(4, 3), jnp.float32),
    }
    loss = lambda p: loss_of(p["w"].ravel())
    got = directions(TRANSFORMATIONS[name](**options), params, loss, loss_fn=loss)[0]
    want = directions(TRANSFORMATIONS[name](**options), upcast_tree(params), loss, loss_fn=loss)[0]
    for t, (d, reference) in enumerate(zip(got, want, strict=True)):
        assert d["a"].dtype == jnp.bfloat16 and not bool(jnp.any(d["a"]))
        assert scale_relative(d["w"], reference["w"]) < FLOAT32_TOLERANCE, t


# ---------------------------------------------------------------------------
# every_gradient: grad_fn= hands the transform each point, as loss_fn= does.
# ---------------------------------------------------------------------------


@every_transformation
def test_every_gradient_grad_fn_path_hands_the_transform_each_point(name, x64):
    """add_decayed_weights(w) at every point is the member on L + w/2 |theta|^2 (its
    gradient g + w theta): the loss_fn= and grad_fn= paths must both be it, to 1e-12. A
    grad_fn depending on i, (1 + i / 10) g: every_gradient must pass i on."""
    x, y, params = make_problem()
    loss = lambda p: softmax_loss(p, x, y)
    w = 0.3
    decay = lambda p: w * 0.5 * sum(jnp.sum(v**2) for v in jax.tree.leaves(p))
    decayed = lambda p: loss(p) + decay(p)
    tx = lambda: gam_optax.every_gradient(optax.add_decayed_weights(w), TRANSFORMATIONS[name]())
    want = directions(TRANSFORMATIONS[name](), params, decayed, loss_fn=decayed)[0]
    by_loss = directions(tx(), params, loss, loss_fn=loss)[0]
    by_grad = directions(tx(), params, loss, grad_fn=lambda p, i: jax.grad(loss)(p))[0]
    for d, e, reference in zip(by_loss, by_grad, want, strict=True):
        assert_close(d, reference)
        assert_close(e, reference)
    # Decay at theta only (the transform given the params, not the point) is another step.
    at_theta = lambda p, i: jax.tree.map(lambda g, v: g + w * v, jax.grad(loss)(p), params)
    other = directions(TRANSFORMATIONS[name](), params, decayed, grad_fn=at_theta)[0]
    assert max(scale_relative(a, b) for a, b in zip(other, want, strict=True)) > 1e-4
    # i is passed on: (1 + i / 10) g + w p by hand, and through every_gradient.
    scaled = lambda p, i: jax.tree.map(lambda g: g * (1 + 0.1 * i), jax.grad(loss)(p))
    by_hand = lambda p, i: jax.tree.map(lambda g, v: g + w * v, scaled(p, i), p)
    want = directions(TRANSFORMATIONS[name](), params, decayed, grad_fn=by_hand)[0]
    got = directions(tx(), params, loss, grad_fn=scaled)[0]
    for d, reference in zip(got, want, strict=True):
        assert_close(d, reference)
