"""gam(): exact to the released algorithm, an Optax citizen, data-parallel, robust.

The reference is an independent NumPy implementation of the spec's steps 1-7 on
softmax regression with a hand-derived gradient.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gam_optax
from gam_optax import _tree_math

HYPER = dict(rho=0.3, rho_prime=0.05, alpha=0.6, beta=0.4, gamma=0.2)


# ---------------------------------------------------------------------------
# Softmax regression with a hand-derived gradient, and GAM in NumPy.
# ---------------------------------------------------------------------------


def make_problem(n=24, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = rng.integers(0, k, size=n)
    params = {"w": rng.normal(size=(d, k)) * 0.5, "b": rng.normal(size=(k,)) * 0.1}
    return x, y, params


def softmax_loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    one_hot = jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype)
    return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1))


def numpy_grad(theta, x, y, d, k):
    """dL/dW = X^T (softmax(XW + b) - onehot(y)) / n, dL/db = column sums of the same."""
    w, b = theta[: d * k].reshape(d, k), theta[d * k :]
    z = x @ w + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return np.concatenate([(x.T @ p).ravel(), p.sum(axis=0)])


def numpy_gam(
    theta, grad, rho, rho_prime, alpha, beta, gamma, xi=1e-12, adaptive=False, paper=False
):
    """The spec's steps 1-7, on a flat parameter vector."""

    def step(v, at, r):
        if adaptive:
            return r * v * at**2 / (np.linalg.norm(v * np.abs(at)) + xi)
        return r * v / (np.linalg.norm(v) + xi)

    g0 = grad(theta)
    g1 = grad(theta + step(g0, theta, rho_prime))
    h0 = g1 - g0
    theta2 = theta + step(h0, theta, rho)
    g2 = grad(theta2)
    g3 = grad(theta2 + step(g2, theta2, rho_prime))
    h_plus = alpha * g1 + (1 - alpha) * g3
    h_minus = (beta if paper else 1.0) * g0 + (1 - beta) * g2
    norm_p, norm_m = np.linalg.norm(h_plus), np.linalg.norm(h_minus)
    cos = h_minus @ h_plus / (norm_p * norm_m + xi)
    h_perp = h_minus - cos * norm_m * h_plus / (norm_p + xi)
    return h_plus - gamma * h_perp


def numpy_gsam(theta, grad, rho, alpha, xi=1e-12):
    g0 = grad(theta)
    g1 = grad(theta + rho * g0 / (np.linalg.norm(g0) + xi))
    cos = g0 @ g1 / (np.linalg.norm(g0) * np.linalg.norm(g1) + xi)
    perp = g0 - cos * np.linalg.norm(g0) * g1 / (np.linalg.norm(g1) + xi)
    return g1 - alpha * perp


def flat(tree):
    return np.concatenate([np.ravel(tree["w"]), np.ravel(tree["b"])])


def gam_direction(tx, params, loss_fn, state=None):
    state = tx.init(params) if state is None else state
    grads = jax.grad(loss_fn)(params)
    return jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(grads, state, params)


def relative_error(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


# ---------------------------------------------------------------------------
# Exactness against the NumPy reference, float64.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("weighting", ["released", "paper"])
def test_direction_matches_numpy_reference(x64, adaptive, weighting):
    x, y, params = make_problem()
    d, k = params["w"].shape
    loss_fn = lambda p: softmax_loss(p, x, y)
    np.testing.assert_allclose(  # the hand-derived gradient is right
        flat(jax.grad(loss_fn)(params)), numpy_grad(flat(params), x, y, d, k), rtol=1e-12
    )
    tx = gam_optax.gam(**HYPER, adaptive=adaptive, h_minus_weighting=weighting)
    direction, state = gam_direction(tx, params, loss_fn)
    expected = numpy_gam(
        flat(params),
        lambda t: numpy_grad(t, x, y, d, k),
        **HYPER,
        adaptive=adaptive,
        paper=weighting == "paper",
    )
    assert direction["w"].dtype == jnp.float64
    assert relative_error(flat(direction), expected) < 1e-10
    assert int(state.count) == 1
    # The weightings really differ (so the test above could tell them apart).
    other = numpy_gam(
        flat(params),
        lambda t: numpy_grad(t, x, y, d, k),
        **HYPER,
        adaptive=adaptive,
        paper=weighting != "paper",
    )
    assert relative_error(other, expected) > 1e-3


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_large_eps_enters_every_denominator(x64, adaptive):
    """xi = 0.5, comparable to the norms: the reference's ``norm + xi`` in the two ascent
    steps, the cosine and the unit vector of h+ are the library's, far beyond round-off."""
    x, y, params = make_problem()
    d, k = params["w"].shape
    loss_fn = lambda p: softmax_loss(p, x, y)
    grad = lambda t: numpy_grad(t, x, y, d, k)
    direction, _ = gam_direction(
        gam_optax.gam(**HYPER, eps=0.5, adaptive=adaptive), params, loss_fn
    )
    expected = numpy_gam(flat(params), grad, **HYPER, xi=0.5, adaptive=adaptive)
    assert relative_error(flat(direction), expected) < 1e-10
    tiny = numpy_gam(flat(params), grad, **HYPER, adaptive=adaptive)
    assert relative_error(tiny, expected) > 1e-3


def test_gsam_and_sam_reductions(x64):
    x, y, params = make_problem(seed=1)
    d, k = params["w"].shape
    loss_fn = lambda p: softmax_loss(p, x, y)
    grad = lambda t: numpy_grad(t, x, y, d, k)
    rho_prime, gamma = 0.07, 0.3
    gsam_like = gam_optax.gam(rho=0.5, rho_prime=rho_prime, alpha=1.0, beta=1.0, gamma=gamma)
    direction, _ = gam_direction(gsam_like, params, loss_fn)
    assert relative_error(flat(direction), numpy_gsam(flat(params), grad, rho_prime, gamma)) < 1e-10
    sam_like = gam_optax.gam(rho=0.5, rho_prime=rho_prime, alpha=1.0, beta=1.0, gamma=0.0)
    direction, _ = gam_direction(sam_like, params, loss_fn)
    theta = flat(params)
    g0 = grad(theta)
    sam = grad(theta + rho_prime * g0 / np.linalg.norm(g0))
    assert relative_error(flat(direction), sam) < 1e-10


def test_correction_is_orthogonal_to_h_plus(x64):
    """d(gamma) - d(0) = -gamma h_perp, and d(0) = h_plus: the two are orthogonal."""
    x, y, params = make_problem(seed=2)
    loss_fn = lambda p: softmax_loss(p, x, y)
    hyper = dict(HYPER, gamma=0.0)
    h_plus = flat(gam_direction(gam_optax.gam(**hyper), params, loss_fn)[0])
    with_gamma = flat(gam_direction(gam_optax.gam(**dict(hyper, gamma=1.0)), params, loss_fn)[0])
    h_perp = h_plus - with_gamma
    assert np.linalg.norm(h_perp) > 1e-3 * np.linalg.norm(h_plus)  # not trivially zero
    cos = h_perp @ h_plus / (np.linalg.norm(h_perp) * np.linalg.norm(h_plus))
    assert abs(cos) < 1e-8  # exactly 0 but for xi and rounding


def test_orthogonal_part_decomposes_any_tree(x64):
    keys = jax.random.split(jax.random.key(0), 4)
    v = {"a": jax.random.normal(keys[0], (3, 4)), "b": jax.random.normal(keys[1], (5,))}
    u = {"a": jax.random.normal(keys[2], (3, 4)), "b": jax.random.normal(keys[3], (5,))}
    perp = _tree_math.orthogonal_part(v, u, 1e-12)
    norms = _tree_math.global_norm(perp) * _tree_math.global_norm(u)
    assert abs(_tree_math.vdot(perp, u)) < 1e-12 * norms
    parallel = flat({"w": v["a"] - perp["a"], "b": v["b"] - perp["b"]})
    u_flat = flat({"w": u["a"], "b": u["b"]})
    assert abs(abs(parallel @ u_flat) - np.linalg.norm(parallel) * np.linalg.norm(u_flat)) < 1e-10


def test_params_are_not_modified_and_has_aux_and_grad_fn_agree(x64):
    x, y, params = make_problem(seed=3)
    loss_fn = lambda p: softmax_loss(p, x, y)
    before = jax.tree.map(np.array, params)
    plain, _ = gam_direction(gam_optax.gam(**HYPER), params, loss_fn)
    jax.tree.map(np.testing.assert_array_equal, params, before)

    aux_loss = lambda p: (loss_fn(p), {"logits": x @ p["w"], "stats": jnp.ones(3)})
    tx = gam_optax.gam(**HYPER, has_aux=True)
    grads = jax.grad(loss_fn)(params)
    with_aux, _ = tx.update(grads, tx.init(params), params, loss_fn=aux_loss)

    seen = []

    def grad_fn(p, i):
        seen.append(i)
        return jax.grad(loss_fn)(p)

    tx = gam_optax.gam(**HYPER)
    with_grad_fn, _ = tx.update(grads, tx.init(params), params, grad_fn=grad_fn)
    assert seen == [1, 2, 3]
    for other in (with_aux, with_grad_fn):
        assert relative_error(flat(other), flat(plain)) < 1e-13


# ---------------------------------------------------------------------------
# Schedules and presets.
# ---------------------------------------------------------------------------


def test_scheduled_radii_equal_constants_at_each_step():
    x, y, params = make_problem(seed=4)
    params = jax.tree.map(jnp.float32, params)
    loss_fn = lambda p: softmax_loss(p, x, y)
    rho = optax.linear_schedule(0.5, 0.1, transition_steps=3)
    rho_prime = lambda count: 0.01 * (jnp.minimum(count, 9) + 1)  # radii stay <= 100
    scheduled = gam_optax.gam(rho=rho, rho_prime=rho_prime, alpha=0.5, beta=0.5, gamma=0.1)
    injected = optax.inject_hyperparams(gam_optax.gam)(
        rho=rho, rho_prime=rho_prime, alpha=0.5, beta=0.5, gamma=0.1
    )
    states = [scheduled.init(params), injected.init(params)]
    grads = jax.grad(loss_fn)(params)
    update = jax.jit(lambda tx, g, s, p: tx.update(g, s, p, loss_fn=loss_fn), static_argnums=0)
    for t in range(4):
        constant = gam_optax.gam(rho=rho(t), rho_prime=rho_prime(t), alpha=0.5, beta=0.5, gamma=0.1)
        expected, _ = update(constant, grads, constant.init(params), params)
        for i, tx in enumerate((scheduled, injected)):
            got, states[i] = update(tx, grads, states[i], params)
            assert relative_error(flat(got), flat(expected)) < 1e-6, (t, i)
    assert int(states[0].count) == 4 and int(states[1].count) == 4


def test_proportional_schedule_formula():
    lr = optax.cosine_decay_schedule(0.1, decay_steps=10)
    rho = gam_optax.proportional_schedule(lr, lr_max=0.1, lr_min=0.0, max_value=0.2, min_value=0.05)
    for t in (0, 3, 7, 10):
        expected = 0.05 + 0.15 * (float(lr(t)) - 0.0) / 0.1
        assert math.isclose(float(rho(t)), expected, rel_tol=1e-6)
    constant = gam_optax.proportional_schedule(lr, 0.1, 0.1, max_value=0.3, min_value=0.1)
    assert float(constant(5)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="lr_max"):
        gam_optax.proportional_schedule(lr, 0.0, 0.1, 0.2, 0.1)


def test_presets_match_the_released_settings():
    expected = {  # (rho, rho', alpha, beta, gamma) from the released main_cifar.py
        "cifar100_resnet": (0.2, 0.02, 0.6, 0.5, 0.03),
        "cifar100_pyramidnet": (0.2, 0.04, 0.5, 0.3, 0.05),
        "cifar10_resnet": (0.2, 0.03, 0.1, 0.1, 0.05),
        "cifar10_pyramidnet": (0.2, 0.03, 0.1, 0.1, 0.03),
    }
    for name, values in expected.items():
        preset = gam_optax.gam_preset(name)
        assert tuple(preset[k] for k in ("rho", "rho_prime", "alpha", "beta", "gamma")) == values
        gam_optax.gam(**preset)
    with pytest.raises(ValueError, match="cifar100_resnet"):
        gam_optax.gam_preset("imagenet")
    released = gam_optax.from_released_names(
        grad_rho=0.02, grad_norm_rho=0.2, grad_beta_1=0.6, grad_beta_0=0.5, grad_gamma=0.03
    )
    assert released == gam_optax.gam_preset("cifar100_resnet")
    with pytest.raises(ValueError, match="grad_rho"):
        gam_optax.from_released_names(rho=0.1)


# ---------------------------------------------------------------------------
# An Optax citizen: chains, MultiSteps, dtypes, compilation, extra arguments.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base",
    [
        lambda: optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9)),
        lambda: optax.adamw(1e-2, weight_decay=1e-2),
    ],
    ids=["sgd_momentum_wd", "adamw"],
)
def test_chain_feeds_the_direction_to_the_base_optimizer(f32_problem, base):
    x, y, params = f32_problem
    loss_fn = lambda p: softmax_loss(p, x, y)
    gam = gam_optax.gam(**HYPER)
    chained, reference = optax.chain(gam, base()), base()
    chained_state, reference_state = chained.init(params), reference.init(params)
    p_chained = p_reference = params
    for _ in range(3):
        grads = jax.grad(loss_fn)(p_chained)
        updates, chained_state = chained.update(grads, chained_state, p_chained, loss_fn=loss_fn)
        p_chained = optax.apply_updates(p_chained, updates)
        direction, _ = gam.update(
            jax.grad(loss_fn)(p_reference), gam.init(params), p_reference, loss_fn=loss_fn
        )
        updates, reference_state = reference.update(direction, reference_state, p_reference)
        p_reference = optax.apply_updates(p_reference, updates)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_chained, p_reference
    )
    assert relative_error(flat(p_chained), flat(params)) > 1e-3  # it moved


def test_multisteps_both_ways(f32_problem):
    """Inside MultiSteps, GAM runs once on the accumulated g0 (with the last micro-batch's
    loss_fn); before MultiSteps (the recommended form), the per-micro-batch directions are
    averaged, as in the per-device data-parallel mode."""
    x, y, params = f32_problem
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    gam = gam_optax.gam(**HYPER)
    inside = optax.MultiSteps(optax.chain(gam, optax.sgd(0.5)), every_k_schedule=2)
    before = optax.chain(gam, optax.MultiSteps(optax.sgd(0.5), every_k_schedule=2))
    states = [inside.init(params), before.init(params)]
    grads, directions = [], []
    for bx, by in batches:
        loss_fn = lambda p, bx=bx, by=by: softmax_loss(p, bx, by)
        grads.append(jax.grad(loss_fn)(params))
        directions.append(gam.update(grads[-1], gam.init(params), params, loss_fn=loss_fn)[0])
        updates = []
        for i, tx in enumerate((inside, before)):
            update, states[i] = tx.update(grads[-1], states[i], params, loss_fn=loss_fn)
            updates.append(update)
    mean = lambda trees: jax.tree.map(lambda a, b: (a + b) / 2, *trees)
    on_mean_g0, _ = gam.update(mean(grads), gam.init(params), params, loss_fn=loss_fn)
    for update, direction in zip(updates, (on_mean_g0, mean(directions)), strict=True):
        expected = jax.tree.map(lambda d: -0.5 * d, direction)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), update, expected
        )
    assert relative_error(flat(updates[0]), flat(updates[1])) > 1e-3


def test_zero_radii_reduce_to_the_plain_gradient(f32_problem):
    x, y, params = f32_problem
    loss_fn = lambda p: softmax_loss(p, x, y)
    direction, _ = gam_direction(gam_optax.gam(rho=0.0, rho_prime=0.0), params, loss_fn)
    assert relative_error(flat(direction), flat(jax.grad(loss_fn)(params))) < 1e-6


def test_compiles_once_and_ignores_unknown_extra_args(f32_problem):
    x, y, params = f32_problem
    tx = optax.chain(gam_optax.gam(**HYPER), optax.sgd(0.1))
    traces = []

    @jax.jit
    def train_step(params, state, bx, by):
        traces.append(1)
        loss_fn = lambda p: softmax_loss(p, bx, by)
        grads = jax.grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, loss_fn=loss_fn, unknown="ignored")
        return optax.apply_updates(params, updates), state, loss_fn(params)

    state = tx.init(params)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(5):
        index = rng.permutation(len(y))[:16]
        params, state, loss = train_step(params, state, x[index], y[index])
        losses.append(float(loss))
    assert len(traces) == 1
    assert len(set(losses)) == 5  # the data really changed


def test_state_keeps_structure_dtype_and_works_under_cond(f32_problem):
    x, y, params = f32_problem
    loss_fn = lambda p: softmax_loss(p, x, y)
    tx = gam_optax.gam(**HYPER)
    state = tx.init(params)
    grads = jax.grad(loss_fn)(params)
    _, new_state = tx.update(grads, state, params, loss_fn=loss_fn)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state
    )

    @jax.jit
    def maybe_update(flag):
        return jax.lax.cond(
            flag,
            lambda: tx.update(grads, state, params, loss_fn=loss_fn),
            lambda: (grads, state),
        )

    direction, counted = maybe_update(True)
    _, skipped = maybe_update(False)
    assert int(counted.count) == 1 and int(skipped.count) == 0
    assert relative_error(flat(direction), flat(grads)) > 1e-4


# ---------------------------------------------------------------------------
# Data parallel, on 4 fake CPU devices.
# ---------------------------------------------------------------------------


def _pmap_directions(x, y, params, **kwargs):
    tx = gam_optax.gam(**HYPER, axis_name="batch", **kwargs)

    def per_device(params, bx, by):
        loss_fn = lambda p: softmax_loss(p, bx, by)
        grads = jax.grad(loss_fn)(params)
        return tx.update(grads, tx.init(params), params, loss_fn=loss_fn)[0]

    shards = lambda a: a.reshape(4, -1, *a.shape[1:])
    return jax.pmap(per_device, axis_name="batch", in_axes=(None, 0, 0))(
        params, shards(x), shards(y)
    )


def test_pmap_per_device_mode_averages_per_shard_directions(sharded_problem):
    x, y, params = sharded_problem
    directions = _pmap_directions(x, y, params)  # average="direction", the default
    per_shard = [
        gam_direction(gam_optax.gam(**HYPER), params, lambda p, s=s: softmax_loss(p, x[s], y[s]))[0]
        for s in (slice(8 * i, 8 * i + 8) for i in range(4))
    ]
    mean = jax.tree.map(lambda *d: sum(d) / 4, *per_shard)
    full, _ = gam_direction(gam_optax.gam(**HYPER), params, lambda p: softmax_loss(p, x, y))
    got = jax.tree.map(lambda d: d[0], directions)
    assert relative_error(flat(got), flat(mean)) < 1e-10
    assert relative_error(flat(mean), flat(full)) > 1e-3  # the two modes really differ


def _on_mesh(x, y, params):
    """A mesh of the 4 devices, with the batch split over it and the params replicated."""
    mesh = jax.make_mesh((4,), ("data",))
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return mesh, (
        jax.device_put(x, split),
        jax.device_put(y, split),
        jax.device_put(params, replicated),
    )


def test_jit_with_sharded_batch_equals_single_device(sharded_problem):
    x, y, params = sharded_problem
    _, (xs, ys, ps) = _on_mesh(x, y, params)
    tx = gam_optax.gam(**HYPER)

    @jax.jit
    def direction(params, bx, by):
        loss_fn = lambda p: softmax_loss(p, bx, by)
        return tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)[0]

    got = direction(ps, xs, ys)
    full, _ = gam_direction(tx, params, lambda p: softmax_loss(p, x, y))
    assert relative_error(flat(got), flat(full)) < 1e-10


def test_shard_map_per_device_gradients_and_the_summed_gradient_guard(sharded_problem):
    x, y, params = sharded_problem
    mesh, (xs, ys, ps) = _on_mesh(x, y, params)
    tx = gam_optax.gam(**HYPER, axis_name="data", average="gradients")

    def run(local_params):
        def body(params, bx, by):
            loss_fn = lambda p: softmax_loss(p, bx, by)
            grads = jax.grad(loss_fn)(local_params(params))
            return tx.update(grads, tx.init(params), params, loss_fn=loss_fn)[0]

        sharded = jax.shard_map(
            body, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
        )
        return jax.jit(sharded)(ps, xs, ys)

    got = run(lambda p: jax.lax.pcast(p, "data", to="varying"))
    full, _ = gam_direction(gam_optax.gam(**HYPER), params, lambda p: softmax_loss(p, x, y))
    assert relative_error(flat(got), flat(full)) < 1e-10
    with pytest.raises(ValueError, match="ALREADY SUMMED"):
        run(lambda p: p)


SPLIT_INSIDE_SHARD_MAP = {
    "sam": lambda: gam_optax.sam(0.05),
    "gsam": lambda: gam_optax.gsam(0.05),
    "gam": lambda: gam_optax.gam(**HYPER),
    "gam_penalty": lambda: gam_optax.gam_penalty(0.1, 0.5),
    "sam_gam": lambda: gam_optax.sam_gam(0.1, 0.5, sam_rho=0.05),
    "reuse(gam)": lambda: gam_optax.reuse(gam_optax.gam(**HYPER), every=2),
    "transparent(gam)": lambda: gam_optax.transparent(gam_optax.gam(**HYPER), optax.sgd(0.1)),
    "gam(axis_name='data')": lambda: gam_optax.gam(**HYPER, axis_name="data"),
}


@pytest.mark.parametrize("name", list(SPLIT_INSIDE_SHARD_MAP))
def test_params_split_inside_shard_map_are_refused_with_the_leaf_and_the_axis(
    sharded_problem, name
):
    """Inside shard_map a device's shard of a parameter would give the norms of its part
    alone: every member refuses it at trace time, naming the leaf, the axis and the fix.
    The mesh is 2 x 2 ('data', 'model'): the batch split over 'data', the kernel's columns
    over 'model' (gathered in the loss); axis_name='data' does not excuse the 'model' split."""
    x, y, params = sharded_problem
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    specs = {key: P(None, "model") if leaf.ndim == 2 else P() for key, leaf in params.items()}
    ps = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in specs.items()})
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    whole = lambda p: {
        k: jax.lax.all_gather(v, "model", axis=1, tiled=True) if v.ndim == 2 else v
        for k, v in p.items()
    }
    tx = SPLIT_INSIDE_SHARD_MAP[name]()

    def body(params, bx, by):
        loss_fn = lambda p: softmax_loss(whole(p), bx, by)
        extra = {} if name.startswith("transparent") else {"loss_fn": loss_fn}
        grads = jax.grad(loss_fn)(jax.lax.pcast(params, "data", to="varying"))
        return tx.update(grads, tx.init(params), params, **extra)[0]

    sharded = jax.shard_map(
        body, mesh=mesh, in_specs=(specs, P("data"), P("data")), out_specs=specs
    )
    split = next(k for k, v in params.items() if v.ndim == 2)
    with pytest.raises(ValueError, match=rf"params\['{split}'\] varies over the mesh axis 'model'"):
        jax.jit(sharded)(ps, xs, ys)


# ---------------------------------------------------------------------------
# It trains.
# ---------------------------------------------------------------------------


def test_gam_sgd_trains_an_mlp_as_well_as_sgd():
    key = jax.random.key(0)
    kx, kw1, kw2, kt = jax.random.split(key, 4)
    x = jax.random.normal(kx, (128, 4))
    y = jnp.sin(x @ jax.random.normal(kt, (4,)))[:, None]  # a non-convex target
    params = {
        "w1": jax.random.normal(kw1, (4, 32)) * 0.5,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(kw2, (32, 1)) * 0.2,
        "b2": jnp.zeros(1),
    }

    def loss_fn(p):
        hidden = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((hidden @ p["w2"] + p["b2"] - y) ** 2)

    def train(tx, steps=300):
        @jax.jit
        def step(p, s):
            updates, s = tx.update(jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn)
            return optax.apply_updates(p, updates), s

        p, s = params, tx.init(params)
        for _ in range(steps):
            p, s = step(p, s)
        return float(loss_fn(p))

    initial = float(loss_fn(params))
    sgd = train(optax.sgd(0.1, momentum=0.9))
    gam = train(optax.chain(gam_optax.gam(rho=0.02, rho_prime=0.005), optax.sgd(0.1, momentum=0.9)))
    assert sgd < 0.01 * initial
    assert gam < 0.02 * initial
    assert gam < 2.5 * sgd  # measured: 1.6x (GAM's direction is not the plain gradient)


# ---------------------------------------------------------------------------
# Bad input: clear, early errors; degenerate gradients stay finite.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rho=-0.1), "rho must be a finite number >= 0"),
        (dict(rho_prime=-1e-3), "rho_prime must be a finite number >= 0"),
        (dict(eps=-1.0), "eps must be a finite number >= 0"),
        (dict(rho=lambda t: -0.1 + 0 * t), "the rho schedule at step 0 must be"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(beta=float("inf")), "beta must be a finite number"),
        (dict(gamma=float("-inf")), "gamma must be a finite number"),
        (dict(h_minus_weighting="algorithm2"), "'released'"),
        (dict(average="all"), "'direction'"),
    ],
)
def test_invalid_hyperparameters_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gam_optax.gam(**kwargs)


def test_invalid_update_arguments_fail_clearly(f32_problem):
    x, y, params = f32_problem
    loss_fn = lambda p: softmax_loss(p, x, y)
    tx = gam_optax.gam(**HYPER)
    state, grads = tx.init(params), jax.grad(loss_fn)(params)
    with pytest.raises(ValueError, match="loss_fn=lambda p: loss"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match="both were given"):
        tx.update(grads, state, params, loss_fn=loss_fn, grad_fn=lambda p, i: grads)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(grads, state, None, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="must return a scalar"):
        tx.update(grads, state, params, loss_fn=lambda p: x @ p["w"])
    with pytest.raises(TypeError, match="has_aux=True"):
        tx.update(grads, state, params, loss_fn=lambda p: (loss_fn(p), None))
    with pytest.raises(TypeError, match=r"must return a tuple \(loss, aux\)"):
        gam_optax.gam(has_aux=True).update(grads, state, params, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="same tree structure"):
        tx.update({"w": grads["w"]}, state, params, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="same tree structure"):
        tx.update(grads, state, params, grad_fn=lambda p, i: {"w": p["w"]})


def test_released_weighting_uses_the_absolute_value_of_one_minus_beta(x64):
    """The released code weights g2 by abs(1 - beta): beta = 1.5 and 0.5 give the same d,
    and the paper's weighting (1 - beta, and beta on g0) does not."""
    x, y, params = make_problem()
    loss_fn = lambda p: softmax_loss(p, x, y)
    kw = dict(rho=0.3, rho_prime=0.05, alpha=0.6, gamma=0.2)
    high, _ = gam_direction(gam_optax.gam(beta=1.5, **kw), params, loss_fn)
    low, _ = gam_direction(gam_optax.gam(beta=0.5, **kw), params, loss_fn)
    np.testing.assert_allclose(flat(high), flat(low), rtol=1e-12)
    paper, _ = gam_direction(
        gam_optax.gam(beta=1.5, h_minus_weighting="paper", **kw), params, loss_fn
    )
    assert relative_error(flat(paper), flat(high)) > 1e-3


def test_unbound_axis_name_says_how_to_fix(sharded_problem):
    x, y, params = sharded_problem
    tx = gam_optax.gam(axis_name="batch")
    loss_fn = lambda p: softmax_loss(p, x, y)
    step = lambda p: tx.update(jax.grad(loss_fn)(p), tx.init(p), p, loss_fn=loss_fn)[0]
    message = "gam: axis_name='batch' is not bound here.*jax.pmap.*axis_name=None"
    with pytest.raises(ValueError, match=message):
        jax.jit(step)(params)  # outside pmap
    with pytest.raises(ValueError, match=message):
        jax.pmap(lambda _, p: step(p), axis_name="devices", in_axes=(0, None))(jnp.ones(4), params)
    got = jax.pmap(lambda _, p: step(p), axis_name="batch", in_axes=(0, None))(jnp.ones(4), params)
    expected, _ = gam_direction(gam_optax.gam(), params, loss_fn)  # equal data on every device
    assert relative_error(flat(jax.tree.map(lambda d: d[0], got)), flat(expected)) < 1e-5


@pytest.mark.parametrize("eps", [1e-12, 0.0])
def test_zero_and_constant_gradients_give_finite_directions(eps):
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    tx = gam_optax.gam(**HYPER, eps=eps, adaptive=False)
    at_minimum = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"] ** 2)  # g0 = 0
    direction, _ = gam_direction(tx, params, at_minimum)
    assert all(bool(jnp.all(d == 0)) for d in jax.tree.leaves(direction))
    linear = lambda p: jnp.sum(p["w"]) + 2 * jnp.sum(p["b"])  # g1 = g0: h0 = 0
    direction, _ = gam_direction(tx, params, linear)
    expected = jax.grad(linear)(params)  # every g is the same constant, and so is d
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), direction, expected)
    adaptive = gam_optax.gam(**HYPER, eps=eps, adaptive=True)  # theta = 0: zero adaptive norm
    direction, _ = gam_direction(adaptive, params, linear)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), direction, expected)
