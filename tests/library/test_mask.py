"""``mask=``: only the selected parameters are perturbed; gradients and directions cover all.

References in NumPy (float64) for SAM and GAM on softmax regression with a weight matrix and
a bias, perturbing the weights only; identities for every transformation; the errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_family import TRANSFORMATIONS

import gam_optax

MASK = {"w": True, "b": False}  # perturb the weights, not the bias


@pytest.fixture
def problem(x64):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 4))
    y = np.eye(3)[rng.integers(0, 3, size=20)]
    params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    return x, y, params


def np_grad(params, x, y):
    """d/dW mean CE = X^T (P - Y) / n, d/db = mean(P - Y)."""
    z = x @ params["w"] + params["b"]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return {"w": x.T @ (p - y) / len(x), "b": (p - y).mean(axis=0)}


def np_masked_step(v, radius, eps=1e-12):
    """r * v_m / (||v_m|| + eps), v_m: v with the bias zeroed."""
    vm = {"w": v["w"], "b": np.zeros_like(v["b"])}
    norm = np.sqrt(np.sum(vm["w"] ** 2))
    return {k: radius * vm[k] / (norm + eps) for k in vm}


def add(a, b, scale=1.0):
    return {k: a[k] + scale * b[k] for k in a}


def loss(params, x, y):
    logits = x @ params["w"] + params["b"]
    return -jnp.mean(jnp.sum(y * jax.nn.log_softmax(logits), axis=-1))


def direction(tx, params, x, y):
    params = jax.tree.map(jnp.asarray, params)
    loss_fn = lambda p: loss(p, x, y)
    d, _ = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
    return jax.tree.map(np.asarray, d)


def assert_close(a, b, rtol=1e-10):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=1e-13, err_msg=k)


def test_masked_sam_equals_numpy(problem):
    x, y, params = problem
    rho = 0.3
    g0 = np_grad(params, x, y)
    expected = np_grad(add(params, np_masked_step(g0, rho)), x, y)
    assert_close(direction(gam_optax.sam(rho, mask=MASK), params, x, y), expected)
    # ... which is not the unmasked SAM gradient.
    full = direction(gam_optax.sam(rho), params, x, y)
    assert not np.allclose(full["w"], expected["w"])


def test_masked_gam_equals_numpy(problem):
    """Algorithm 2 (released weighting) with every ascent step restricted to the weights."""
    x, y, params = problem
    rho, rho_p, alpha, beta, gamma = 0.4, 0.05, 0.6, 0.5, 0.2
    g = lambda p: np_grad(p, x, y)
    g0 = g(params)
    g1 = g(add(params, np_masked_step(g0, rho_p)))
    h0 = add(g1, g0, -1.0)
    theta2 = add(params, np_masked_step(h0, rho))
    g2 = g(theta2)
    g3 = g(add(theta2, np_masked_step(g2, rho_p)))
    h_plus = {k: alpha * g1[k] + (1 - alpha) * g3[k] for k in g0}
    h_minus = {k: g0[k] + abs(1 - beta) * g2[k] for k in g0}
    dot = sum(np.sum(h_minus[k] * h_plus[k]) for k in g0)
    n_plus = np.sqrt(sum(np.sum(v**2) for v in h_plus.values()))
    n_minus = np.sqrt(sum(np.sum(v**2) for v in h_minus.values()))
    cos = dot / (n_plus * n_minus + 1e-12)
    h_perp = {k: h_minus[k] - cos * n_minus * h_plus[k] / (n_plus + 1e-12) for k in g0}
    expected = {k: h_plus[k] - gamma * h_perp[k] for k in g0}
    tx = gam_optax.gam(rho, rho_p, alpha, beta, gamma, mask=MASK)
    assert_close(direction(tx, params, x, y), expected)


# Every transformation of the family that takes mask= (reuse's inner one takes it).
MASKED = {name: tx for name, tx in TRANSFORMATIONS.items() if name != "reuse_gam"}


@pytest.mark.parametrize("name", list(MASKED))
def test_all_true_is_no_mask_and_a_function_or_prefix_is_the_same_mask(name, problem):
    x, y, params = problem
    plain = direction(MASKED[name](), params, x, y)
    assert_close(direction(MASKED[name](mask={"w": True, "b": True}), params, x, y), plain)
    assert_close(direction(MASKED[name](mask=True), params, x, y), plain)  # a prefix
    by_rank = lambda p: jax.tree.map(lambda v: v.ndim > 1, p)  # the weights, not the bias
    assert_close(
        direction(MASKED[name](mask=by_rank), params, x, y),
        direction(MASKED[name](mask=MASK), params, x, y),
    )


@pytest.mark.parametrize(
    "name", [n for n in MASKED if not n.startswith(("gam_penalty", "sam_gam"))]
)
def test_nothing_selected_gives_the_plain_gradient(name, problem):
    """No perturbation at all: every extra gradient is g0, and so is the direction."""
    x, y, params = problem
    g0 = np_grad(params, x, y)
    assert_close(direction(MASKED[name](mask={"w": False, "b": False}), params, x, y), g0)


def test_under_optax_masked_the_error_points_to_mask(problem):
    x, y, params = problem
    tx = optax.masked(gam_optax.sam(0.1), MASK)
    params = jax.tree.map(jnp.asarray, params)
    loss_fn = lambda p: loss(p, x, y)
    with pytest.raises(TypeError, match=r"optax.MaskedNode.*sam\(\.\.\., mask=\.\.\.\)"):
        tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)


@pytest.mark.parametrize(
    "mask, error, message",
    [
        ({"w": True}, ValueError, "mask must have the tree structure of params"),
        ({"w": 1, "b": 0}, TypeError, "mask must hold Python bools"),
        (lambda p: {"w": "yes", "b": True}, TypeError, "mask must hold Python bools"),
    ],
)
def test_bad_masks_are_named(problem, mask, error, message):
    x, y, params = problem
    with pytest.raises(error, match=message):
        direction(gam_optax.gam(mask=mask), params, x, y)


def test_sam_on_perturbs_only_batchnorm_parameters_of_a_linen_model():
    """The README's SAM-ON mask on a Linen model: the ascent step is zero outside BatchNorm."""
    import flax.linen as nn
    from flax import traverse_util

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
            return nn.Dense(2)(nn.relu(x))

    x = jnp.ones((3, 5))
    params = Net().init(jax.random.key(0), x)["params"]
    mask = lambda p: traverse_util.path_aware_map(lambda path, _: "BatchNorm" in path[-2], p)
    flags = gam_optax._validation.resolve_mask(mask, params, "sam")
    g0 = jax.tree.map(jnp.ones_like, params)
    step = gam_optax._tree_math.ascent_step(g0, params, 0.1, eps=0.0, mask=flags)
    for path, leaf in traverse_util.flatten_dict(step).items():
        assert bool(jnp.any(leaf != 0)) == ("BatchNorm" in path[-2]), path
