"""Tests of sam (and ASAM) and gsam: NumPy references, identities with gam and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gam_optax

# ----------------------------------------------------------------------------
# Softmax regression, with gradients derived by hand in NumPy (float64).
# ----------------------------------------------------------------------------

N, D, K = 12, 4, 3


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    y = np.eye(K)[rng.integers(0, K, size=N)]
    params = {"w": rng.normal(size=(D, K)), "b": rng.normal(size=(K,)) * 0.5}
    return x, y, params


def softmax_loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))


def np_grad(params, x, y):
    """d/dW mean CE = X^T (P - Y) / n, d/db = mean(P - Y)."""
    z = x @ params["w"] + params["b"]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return {"w": x.T @ (p - y) / len(x), "b": (p - y).mean(axis=0)}


def np_norm(tree):
    return np.sqrt(sum(np.sum(v**2) for v in tree.values()))


def np_sam(params, x, y, rho, eps, adaptive=False):
    g0 = np_grad(params, x, y)
    if adaptive:  # e = rho g theta^2 / (||g |theta| || + eps)
        norm = np_norm({k: g0[k] * np.abs(params[k]) for k in g0})
        e = {k: rho * g0[k] * params[k] ** 2 / (norm + eps) for k in g0}
    else:
        norm = np_norm(g0)
        e = {k: rho * g0[k] / (norm + eps) for k in g0}
    return np_grad({k: params[k] + e[k] for k in params}, x, y)


def np_gsam(params, x, y, rho, alpha, eps, adaptive=False):
    g0 = np_grad(params, x, y)
    g1 = np_sam(params, x, y, rho, eps, adaptive)
    n0, n1 = np_norm(g0), np_norm(g1)
    cos = sum(np.sum(g0[k] * g1[k]) for k in g0) / (n0 * n1 + eps)
    perp = {k: g0[k] - cos * n0 * g1[k] / (n1 + eps) for k in g0}
    return {k: g1[k] - alpha * perp[k] for k in g0}


def run(tx, params, x, y):
    """One update of tx at params (eagerly: faster than compiling here); the direction as NumPy."""
    loss_fn = lambda p: softmax_loss(p, x, y)
    d, state = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
    return jax.tree.map(np.asarray, d), state


def assert_trees_close(a, b, rtol, atol=0.0):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def as_jax(params):
    return jax.tree.map(jnp.asarray, params)


def test_hand_derived_gradient_is_right(problem):
    """The NumPy reference's gradient equals jax.grad (the reference itself is right)."""
    x, y, params = problem
    with jax.enable_x64(True):
        g = jax.grad(softmax_loss)(as_jax(params), x, y)
        assert_trees_close(jax.tree.map(np.asarray, g), np_grad(params, x, y), rtol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_numpy(problem, adaptive):
    """sam (and ASAM) compute g(theta + e) with the published perturbation."""
    x, y, params = problem
    rho = 0.5 if adaptive else 0.1
    with jax.enable_x64(True):
        d, state = run(gam_optax.sam(rho, adaptive=adaptive), as_jax(params), x, y)
    expected = np_sam(params, x, y, rho, 1e-12, adaptive)
    assert_trees_close(d, expected, rtol=1e-11)
    # A real perturbation: the SAM gradient differs from g0.
    assert np_norm({k: d[k] - np_grad(params, x, y)[k] for k in d}) > 1e-3
    assert int(state.count) == 1


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_matches_numpy(problem, adaptive):
    x, y, params = problem
    rho, alpha = (0.5 if adaptive else 0.1), 0.3
    with jax.enable_x64(True):
        d, _ = run(gam_optax.gsam(rho, alpha, adaptive=adaptive), as_jax(params), x, y)
    assert_trees_close(d, np_gsam(params, x, y, rho, alpha, 1e-12, adaptive), rtol=1e-11)
    sam_d = np_sam(params, x, y, rho, 1e-12, adaptive)
    assert np_norm({k: d[k] - sam_d[k] for k in d}) > 1e-4  # the correction acts


def test_gsam_alpha_zero_is_sam(problem):
    x, y, params = problem
    with jax.enable_x64(True):
        d_gsam, _ = run(gam_optax.gsam(0.2, alpha=0.0), as_jax(params), x, y)
        d_sam, _ = run(gam_optax.sam(0.2), as_jax(params), x, y)
    assert_trees_close(d_gsam, d_sam, rtol=1e-14)


def test_gsam_correction_is_orthogonal_to_sam_gradient(problem):
    """d - g1 = -alpha g_perp is orthogonal to g1: GSAM keeps the SAM loss's first-order change."""
    x, y, params = problem
    with jax.enable_x64(True):
        d, _ = run(gam_optax.gsam(0.2, alpha=0.5, eps=0.0), as_jax(params), x, y)
        g1, _ = run(gam_optax.sam(0.2, eps=0.0), as_jax(params), x, y)
    inner = sum(np.sum((d[k] - g1[k]) * g1[k]) for k in d)
    assert abs(inner) < 1e-14 * np_norm(g1) ** 2
    assert np_norm({k: d[k] - g1[k] for k in d}) > 1e-4


@pytest.mark.parametrize("gamma", [0.0, 0.4])
def test_gam_reduces_to_gsam_and_sam(problem, gamma):
    """gam(alpha=1, beta=1, gamma) == gsam(rho_prime, alpha=gamma); gamma=0 == sam(rho_prime)."""
    x, y, params = problem
    rho_prime = 0.05
    with jax.enable_x64(True):
        tx_gam = gam_optax.gam(rho=0.3, rho_prime=rho_prime, alpha=1.0, beta=1.0, gamma=gamma)
        d_gam, _ = run(tx_gam, as_jax(params), x, y)
        d_gsam, _ = run(gam_optax.gsam(rho_prime, alpha=gamma), as_jax(params), x, y)
        d_sam, _ = run(gam_optax.sam(rho_prime), as_jax(params), x, y)
    assert_trees_close(d_gam, d_gsam, rtol=1e-12)
    if gamma == 0.0:
        assert_trees_close(d_gam, d_sam, rtol=1e-12)


def test_sam_equals_optax_contrib_sam(problem):
    """Opaque optax.contrib.sam with one adversarial step (sync_period=2) and a normalised
    sgd(rho) adversary is sam(rho, eps=0) chained before the same outer optimizer."""
    x, y, params = problem
    rho, steps = 0.1, 5
    with jax.enable_x64(True):
        loss_fn = lambda p: softmax_loss(p, x, y)
        grad_fn = lambda p, i: jax.grad(loss_fn)(p)
        outer = lambda: optax.sgd(0.3, momentum=0.9)
        theirs = optax.contrib.sam(
            outer(),
            optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
            sync_period=2,
            opaque_mode=True,
        )
        ours = optax.chain(gam_optax.sam(rho, eps=0.0), outer())
        trajectories = []
        for tx, extra in ((theirs, {"grad_fn": grad_fn}), (ours, {"loss_fn": loss_fn})):
            p, state = as_jax(params), tx.init(as_jax(params))
            update = jax.jit(lambda g, s, p, tx=tx, extra=extra: tx.update(g, s, p, **extra))
            path = []
            for _ in range(steps):
                updates, state = update(jax.grad(loss_fn)(p), state, p)
                p = optax.apply_updates(p, updates)
                path.append(jax.tree.map(np.asarray, p))
            trajectories.append(path)
    for a, b in zip(*trajectories, strict=True):
        assert_trees_close(a, b, rtol=1e-12, atol=1e-14)
    assert np_norm({k: trajectories[1][-1][k] - params[k] for k in params}) > 0.1


def test_sam_reads_its_rho_schedule_at_the_count(problem):
    """Step t perturbs with rho(t): a schedule read one step late fails at every t > 0."""
    x, y, params = problem
    rho = optax.linear_schedule(0.5, 0.0, transition_steps=4)  # exact in float32
    with jax.enable_x64(True):
        p = as_jax(params)
        loss_fn = lambda q: softmax_loss(q, x, y)
        tx = gam_optax.sam(rho)
        state = tx.init(p)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))
        directions = []
        for _ in range(4):
            d, state = update(jax.grad(loss_fn)(p), state, p)
            directions.append(jax.tree.map(np.asarray, d))
    for t, d in enumerate(directions):
        assert_trees_close(d, np_sam(params, x, y, 0.5 - 0.125 * t, 1e-12), rtol=1e-11)


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_large_eps_enters_every_denominator(problem, adaptive):
    """eps = 0.5 (comparable to the gradient norms) changes the direction well beyond
    round-off: the reference's ``norm + eps`` denominators are the library's."""
    x, y, params = problem
    rho, eps = (0.5 if adaptive else 0.1), 0.5
    with jax.enable_x64(True):
        d_sam, _ = run(gam_optax.sam(rho, eps=eps, adaptive=adaptive), as_jax(params), x, y)
        d_gsam, _ = run(gam_optax.gsam(rho, 0.3, eps=eps, adaptive=adaptive), as_jax(params), x, y)
    assert_trees_close(d_sam, np_sam(params, x, y, rho, eps, adaptive), rtol=1e-11)
    assert_trees_close(d_gsam, np_gsam(params, x, y, rho, 0.3, eps, adaptive), rtol=1e-11)
    tiny = np_sam(params, x, y, rho, 1e-12, adaptive)
    assert np_norm({k: d_sam[k] - tiny[k] for k in tiny}) > 1e-3 * np_norm(tiny)


def test_rho_schedule_is_evaluated_at_the_count(problem):
    """rho follows the learning rate through proportional_schedule, at state.count."""
    x, y, params = problem
    lr = optax.linear_schedule(0.1, 0.0, transition_steps=4)
    rho = gam_optax.proportional_schedule(lr, 0.1, 0.0, max_value=0.2, min_value=0.02)
    with jax.enable_x64(True):
        p = as_jax(params)
        loss_fn = lambda q: softmax_loss(q, x, y)
        g = jax.grad(loss_fn)(p)
        tx = gam_optax.gsam(rho, alpha=0.3)
        state = tx.init(p)
        update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))
        directions = []
        for _ in range(4):
            d, state = update(g, state, p)
            directions.append(jax.tree.map(np.asarray, d))
        assert int(state.count) == 4
    for t, d in enumerate(directions):
        rho_t = float(rho(t))  # the schedule computes in float32
        np.testing.assert_allclose(rho_t, 0.02 + 0.18 * (0.1 - 0.025 * t) / 0.1, rtol=1e-6)
        assert_trees_close(d, np_gsam(params, x, y, rho_t, 0.3, 1e-12), rtol=1e-11)


def test_errors_are_early_and_clear(problem):
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        gam_optax.sam(-0.1)
    with pytest.raises(ValueError, match="rho schedule at step 0 must be a finite number >= 0"):
        gam_optax.gsam(rho=lambda t: -0.1 + 0 * t)
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        gam_optax.gsam(0.1, alpha=float("nan"))
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        gam_optax.gsam(0.1, alpha=float("inf"))
    with pytest.raises(ValueError, match="eps"):
        gam_optax.sam(0.1, eps=-1.0)
    with pytest.raises(ValueError, match="average must be one of"):
        gam_optax.gsam(0.1, average="mean")
    x, y, params = problem
    p = as_jax(params)
    g = jax.grad(softmax_loss)(p, x, y)
    tx = gam_optax.sam(0.1)
    with pytest.raises(ValueError, match="exactly one of loss_fn or grad_fn; neither"):
        tx.update(g, tx.init(p), p)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(g, tx.init(p), None, loss_fn=lambda q: softmax_loss(q, x, y))
    with pytest.raises(ValueError, match="scalar loss"):
        tx.update(g, tx.init(p), p, loss_fn=lambda q: q["b"])
    # Options, states and gradients of the wrong kind (tables of these in test_validation.py).
    with pytest.raises(TypeError, match="sam: adaptive must be a Python bool"):
        gam_optax.sam(2.0, adaptive="yes")
    with pytest.raises(TypeError, match="gsam: alpha must be a number, not a schedule"):
        gam_optax.gsam(0.1, alpha=lambda t: 0.1)
    with pytest.raises(TypeError, match=r"sam\.update: state must be the PerturbationState.*got"):
        tx.update(g, optax.adam(0.1).init(p), p, loss_fn=lambda q: softmax_loss(q, x, y))
    with pytest.raises(TypeError, match=r"sam: grad_fn\(params, 1\) has dtype int32"):
        asam = gam_optax.sam(2.0, adaptive=True)
        asam.update(g, asam.init(p), p, grad_fn=lambda q, i: jax.tree.map(jnp.int32, q))


def test_chain_with_sgd_converges_and_ignores_unknown_extra_args():
    loss_fn = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
    for sharp in (
        gam_optax.sam(0.05),
        gam_optax.gsam(0.05, 0.3),
        gam_optax.sam(0.2, adaptive=True),
    ):
        tx = optax.chain(sharp, optax.sgd(0.05))
        params = jnp.array([2.0, -1.0])
        state = tx.init(params)

        @jax.jit
        def step(params, state, tx=tx):
            grads = jax.grad(loss_fn)(params)
            updates, state = tx.update(grads, state, params, loss_fn=loss_fn, unused=1.0)
            return optax.apply_updates(params, updates), state

        for _ in range(150):
            params, state = step(params, state)
        # The minimum of (p-1)^2 + p^4 is 0.28929 at p = 0.5898, per coordinate;
        # SAM's fixed point is about rho from it.
        assert float(loss_fn(params)) < 2 * 0.28929 + 2e-3


def test_multisteps_and_state_structure():
    """Inside optax.MultiSteps (which forwards loss_fn) the update is the mean of the
    accumulated directions; the state keeps its structure and dtypes across updates."""
    loss_fn = lambda p: jnp.sum(jnp.cos(p) + p**2)
    params = jnp.array([0.3, -1.2, 2.0])
    inner = gam_optax.gsam(0.1, 0.3)
    tx = optax.MultiSteps(inner, every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))
    g = jax.grad(loss_fn)(params)
    updates1, state1 = update(g, state, params)
    updates2, state2 = update(g, state1, params)
    np.testing.assert_array_equal(updates1, np.zeros(3))
    expected, _ = inner.update(g, inner.init(params), params, loss_fn=loss_fn)
    np.testing.assert_allclose(updates2, expected, rtol=1e-6)
    for s in (state1, state2):
        assert jax.tree.structure(s) == jax.tree.structure(state)
        assert [x.dtype for x in jax.tree.leaves(s)] == [x.dtype for x in jax.tree.leaves(state)]


def test_inject_hyperparams(problem):
    """rho and alpha become state entries; changing them gives gsam(new values)."""
    x, y, params = problem
    loss_fn = lambda q: softmax_loss(q, x, y)
    p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
    g = jax.grad(loss_fn)(p)
    tx = optax.inject_hyperparams(gam_optax.gsam)(rho=0.1, alpha=0.2)
    state = tx.init(p)
    state.hyperparams["rho"] = jnp.asarray(0.3)
    d, state = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss_fn))(g, state, p)
    ref = gam_optax.gsam(0.3, 0.2)
    expected, _ = ref.update(g, ref.init(p), p, loss_fn=loss_fn)
    assert_trees_close(d, expected, rtol=1e-5, atol=1e-7)
    tx_sam = optax.inject_hyperparams(gam_optax.sam)(rho=0.1, adaptive=True)
    d_sam, _ = tx_sam.update(g, tx_sam.init(p), p, loss_fn=loss_fn)
    ref = gam_optax.sam(0.1, adaptive=True)
    assert_trees_close(d_sam, ref.update(g, ref.init(p), p, loss_fn=loss_fn)[0], rtol=1e-6)


@pytest.mark.parametrize("name", ["sam", "gsam"])
def test_pmap_modes(problem, name):
    """'gradients' equals one device on the full batch; 'direction' equals the mean of
    per-shard results (each device perturbed by its own shard: m-sharpness)."""
    x, y, params = problem
    n_dev = 4
    assert jax.local_device_count() >= n_dev
    xs, ys = x.reshape(n_dev, N // n_dev, D), y.reshape(n_dev, N // n_dev, K)
    rho, alpha = 0.1, 0.4
    make = {
        "sam": lambda **k: gam_optax.sam(rho, **k),
        "gsam": lambda **k: gam_optax.gsam(rho, alpha, **k),
    }[name]
    reference = {
        "sam": lambda x, y: np_sam(params, x, y, rho, 1e-12),
        "gsam": lambda x, y: np_gsam(params, x, y, rho, alpha, 1e-12),
    }[name]
    with jax.enable_x64(True):

        def per_device(tx):
            def f(p, xb, yb):
                loss_fn = lambda q: softmax_loss(q, xb, yb)
                d, _ = tx.update(jax.grad(loss_fn)(p), tx.init(p), p, loss_fn=loss_fn)
                return d

            return jax.pmap(f, axis_name="batch", in_axes=(None, 0, 0))(as_jax(params), xs, ys)

        d_grad = per_device(make(axis_name="batch", average="gradients"))
        d_dir = per_device(make(axis_name="batch", average="direction"))
    full = reference(x, y)
    shards = [reference(xs[i], ys[i]) for i in range(n_dev)]
    for k in full:
        mean_of_shards = np.mean([s[k] for s in shards], axis=0)
        for i in range(n_dev):  # replicated
            np.testing.assert_allclose(d_grad[k][i], full[k], rtol=1e-11)
            np.testing.assert_allclose(d_dir[k][i], mean_of_shards, rtol=1e-11)
    assert np_norm({k: full[k] - mean_of_shards for k in full}) > 1e-4  # the modes differ


def test_presets():
    assert gam_optax.sam_preset("sam_cifar10") == {"rho": 0.05}
    assert gam_optax.sam_preset("sam_cifar100") == {"rho": 0.1}
    assert gam_optax.sam_preset("asam_cifar10") == {"rho": 2.0, "adaptive": True}
    assert gam_optax.gsam_preset("gsam_cifar10") == {"rho": 2.0, "alpha": 0.4, "adaptive": True}
    lr = optax.linear_schedule(3e-3, 3e-5, transition_steps=10)
    kwargs = gam_optax.gsam_preset("gsam_imagenet_vit", lr, lr_max=3e-3, lr_min=3e-5)
    np.testing.assert_allclose(
        [kwargs["rho"](0), kwargs["rho"](5), kwargs["rho"](10)], [0.6, 0.35, 0.1], rtol=1e-5
    )
    assert kwargs["alpha"] == 0.6
    gam_optax.gsam(**kwargs)
    with pytest.raises(ValueError, match="pass lr_schedule, lr_max and lr_min"):
        gam_optax.gsam_preset("gsam_imagenet_vit")
    with pytest.raises(ValueError, match="unknown SAM preset"):
        gam_optax.sam_preset("sam_imagenet")
    with pytest.raises(ValueError, match="unknown GSAM preset"):
        gam_optax.gsam_preset("gsam")
