"""Tests of the Hessian side: finite differences vs exact Hessian-vector products,
gam(hessian=True), and the paper's Algorithm 1 (gam_penalty)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gam_optax

# ----------------------------------------------------------------------------
# Problems: a non-quadratic loss (non-zero third derivative) and a quadratic
# L = 0.5 x^T A x - b^T x, whose every gradient is known in closed form.
# ----------------------------------------------------------------------------

SCALES = np.array([1.0, -0.7, 1.3, 0.4])


def nonquadratic(x):
    return jnp.sum(jnp.cos(SCALES * x)) + 0.1 * jnp.sum(x**4) + x[0] * x[1] ** 2


THETA = np.array([0.3, -0.8, 0.5, 1.1])


@pytest.fixture(scope="module")
def quadratic():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(4, 4))
    a = m @ m.T + 0.5 * np.eye(4)
    b = rng.normal(size=4)
    theta = rng.normal(size=4)
    return a, b, theta


def unit(v, eps=1e-12):
    return v / (np.linalg.norm(v) + eps)


def update(tx, loss_fn, params, **kwargs):
    grads = jax.grad(loss_fn)(params)
    d, _ = tx.update(grads, tx.init(params), params, loss_fn=loss_fn, **kwargs)
    return np.asarray(d)


def test_finite_difference_converges_linearly_to_hessian_vector_product():
    """(g1 - g0) / rho' -> H unit(g0) with error ~ rho'/2 T[u, u]: halving rho' halves it."""
    with jax.enable_x64(True):
        theta = jnp.asarray(THETA)
        g0 = np.asarray(jax.grad(nonquadratic)(theta))
        exact = np.asarray(jax.jit(jax.hessian(nonquadratic))(theta)) @ unit(g0, 0.0)
        errors = []
        for rho_prime in 1e-2 / 2.0 ** np.arange(4):
            g1 = update(gam_optax.sam(rho_prime, eps=0.0), nonquadratic, theta)
            errors.append(np.linalg.norm((g1 - g0) / rho_prime - exact))
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    np.testing.assert_allclose(ratios, 2.0, atol=0.05)
    assert 1e-5 < errors[0] < 1e-1


def np_gam_quadratic(a, b, theta, rho, rho_prime, alpha, beta, gamma, eps=1e-12):
    """GAM's Algorithm 2 on a quadratic, every gradient in closed form."""
    g = lambda x: a @ x - b
    g0 = g(theta)
    g1 = g0 + rho_prime * a @ unit(g0, eps)
    h0 = g1 - g0
    theta2 = theta + rho * unit(h0, eps)
    g2 = g(theta2)
    g3 = g2 + rho_prime * a @ unit(g2, eps)
    h_plus = alpha * g1 + (1 - alpha) * g3
    h_minus = g0 + (1 - beta) * g2
    norm_plus, norm_minus = np.linalg.norm(h_plus), np.linalg.norm(h_minus)
    cos = h_minus @ h_plus / (norm_plus * norm_minus + eps)
    h_perp = h_minus - cos * norm_minus * h_plus / (norm_plus + eps)
    return h_plus - gamma * h_perp


@pytest.mark.parametrize("hessian", [False, True])
def test_gam_on_a_quadratic_is_the_closed_form(quadratic, hessian):
    """On a quadratic g(x + e) = g(x) + A e exactly: finite and exact GAM coincide."""
    a, b, theta = quadratic
    hp = dict(rho=0.3, rho_prime=0.05, alpha=0.6, beta=0.5, gamma=0.2)
    with jax.enable_x64(True):
        loss = lambda x: 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x
        d = update(gam_optax.gam(**hp, hessian=hessian), loss, jnp.asarray(theta))
    np.testing.assert_allclose(d, np_gam_quadratic(a, b, theta, **hp), rtol=1e-11)


def test_exact_gam_approaches_finite_gam_as_rho_prime_shrinks():
    """On a non-quadratic the modes differ by O(rho'): halving rho' halves the gap."""
    with jax.enable_x64(True):
        theta = jnp.asarray(THETA)
        gaps = []
        for rho_prime in 2e-3 / 2.0 ** np.arange(4):
            hp = dict(rho=0.2, rho_prime=rho_prime, alpha=0.6, beta=0.5, gamma=0.1)
            exact = update(gam_optax.gam(**hp, hessian=True), nonquadratic, theta)
            finite = update(gam_optax.gam(**hp, hessian=False), nonquadratic, theta)
            gaps.append(np.linalg.norm(exact - finite))
    ratios = np.array(gaps[:-1]) / np.array(gaps[1:])
    np.testing.assert_allclose(ratios, 2.0, atol=0.1)
    assert gaps[-1] < 2e-5 and gaps[0] > 1e-6


# ----------------------------------------------------------------------------
# Algorithm 1.
# ----------------------------------------------------------------------------


def test_gam_penalty_on_a_quadratic_is_the_closed_form(quadratic):
    """d = g0 + penalty rho A unit(A theta_adv - b), theta_adv = theta + rho unit(A unit(g0))."""
    a, b, theta = quadratic
    rho, penalty = 0.3, 0.7
    with jax.enable_x64(True):
        loss = lambda x: 0.5 * x @ jnp.asarray(a) @ x - jnp.asarray(b) @ x
        d = update(gam_optax.gam_penalty(rho, penalty), loss, jnp.asarray(theta))
    g0 = a @ theta - b
    theta_adv = theta + rho * unit(a @ unit(g0))
    expected = g0 + penalty * rho * a @ unit(a @ theta_adv - b)
    np.testing.assert_allclose(d, expected, rtol=1e-12)
    assert np.linalg.norm(d - g0) > 0.1


def test_gam_penalty_is_the_gradient_of_the_first_order_flatness_surrogate():
    """On a non-quadratic: theta_adv from the dense Hessian, and the penalty gradient as
    rho * grad_theta ||grad L(theta + delta*)|| (reverse-over-reverse, delta* held fixed)."""
    rho, penalty = 0.2, 0.5
    with jax.enable_x64(True):
        theta = jnp.asarray(THETA)
        d = update(gam_optax.gam_penalty(rho, penalty), nonquadratic, theta)
        g0 = np.asarray(jax.grad(nonquadratic)(theta))
        f = np.asarray(jax.jit(jax.hessian(nonquadratic))(theta)) @ unit(g0)
        delta = rho * unit(f)
        grad_norm = lambda t: jnp.linalg.norm(jax.grad(nonquadratic)(t + delta))
        penalty_gradient = rho * np.asarray(jax.grad(grad_norm)(theta))
        # The step ascends the gradient norm: ||g(theta + delta)|| > ||g(theta)||.
        assert float(grad_norm(theta)) > np.linalg.norm(g0)
    np.testing.assert_allclose(d, g0 + penalty * penalty_gradient, rtol=1e-10)


def test_gam_penalty_grad_fn_equals_loss_fn_and_penalty_zero_is_plain_gradient():
    with jax.enable_x64(True):
        theta = jnp.asarray(THETA)
        g0 = jax.grad(nonquadratic)(theta)
        tx = gam_optax.gam_penalty(0.2, 0.5)
        d_loss, _ = tx.update(g0, tx.init(theta), theta, loss_fn=nonquadratic)
        d_grad, _ = tx.update(
            g0, tx.init(theta), theta, grad_fn=lambda p, i: jax.grad(nonquadratic)(p)
        )
        zero = gam_optax.gam_penalty(0.2, 0.0)
        d_zero, _ = zero.update(g0, zero.init(theta), theta, loss_fn=nonquadratic)
    np.testing.assert_allclose(d_loss, d_grad, rtol=1e-14)
    np.testing.assert_array_equal(d_zero, g0)


def test_zero_gradient_and_zero_hessian_give_finite_results():
    # At a minimum: g0 = 0, so f = 0, theta_adv = theta and d = 0.
    at_min = lambda x: jnp.sum((x - 1.0) ** 2) + jnp.sum((x - 1.0) ** 4)
    ones = jnp.ones(3)
    for tx in (
        gam_optax.gam_penalty(0.2, 0.5, eps=0.0),
        gam_optax.gam(hessian=True, eps=0.0),
        gam_optax.gam(hessian=False, eps=0.0),
    ):
        d, _ = tx.update(jnp.zeros(3), tx.init(ones), ones, loss_fn=at_min)
        np.testing.assert_array_equal(d, np.zeros(3))
    # A linear loss: every Hessian-vector product is 0, so d = g0.
    linear = lambda x: jnp.sum(jnp.array([1.0, -2.0, 0.5]) * x)
    for tx in (gam_optax.gam_penalty(0.2, 0.5, eps=0.0), gam_optax.gam(hessian=True, eps=0.0)):
        d, _ = tx.update(jax.grad(linear)(ones), tx.init(ones), ones, loss_fn=linear)
        np.testing.assert_allclose(d, [1.0, -2.0, 0.5], rtol=1e-6)


def test_gam_penalty_errors():
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        gam_optax.gam_penalty(-0.1, 0.5)
    with pytest.raises(ValueError, match="penalty must be a finite number >= 0"):
        gam_optax.gam_penalty(0.1, float("nan"))
    with pytest.raises(ValueError, match="penalty must be a finite number >= 0"):
        gam_optax.gam_penalty(0.1, -1.0)
    with pytest.raises(ValueError, match="average must be one of"):
        gam_optax.gam_penalty(0.1, 0.5, average="all")
    tx = gam_optax.gam_penalty(0.1, 0.5)
    params = jnp.ones(2)
    with pytest.raises(ValueError, match="exactly one of loss_fn or grad_fn"):
        tx.update(params, tx.init(params), params)
    # Exact mode differentiates grad_fn once more: its output is checked inside jax.jvp.
    for exact in (tx, gam_optax.gam(hessian=True)):
        with pytest.raises(TypeError, match=r"grad_fn\(params, 1\) has dtype int32"):
            exact.update(params, exact.init(params), params, grad_fn=lambda p, i: p.astype(int))
    with pytest.raises(TypeError, match="gam: hessian must be a Python bool"):
        gam_optax.gam(hessian="exact")
    with pytest.raises(TypeError, match="gam_penalty: penalty must be a real number, got str"):
        gam_optax.gam_penalty(0.1, "0.5")
    with pytest.raises(TypeError, match=r"gam_penalty\.update: state must be the Perturbation"):
        tx.update(params, optax.adam(0.1).init(params), params, loss_fn=jnp.sum)


def test_gam_penalty_dtype_chain_and_inject_hyperparams():
    params = {"a": jnp.array([1.0, -2.0], jnp.bfloat16), "b": jnp.array([0.5], jnp.float32)}
    loss_fn = lambda p: jnp.sum(p["a"].astype(jnp.float32) ** 4) + jnp.sum(jnp.cos(p["b"]))
    tx = optax.chain(
        optax.inject_hyperparams(gam_optax.gam_penalty)(rho=0.1, penalty=0.5), optax.sgd(0.1)
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss_fn)(params), state, params, loss_fn=loss_fn)
        return optax.apply_updates(params, updates), updates, state

    new_params, updates, state = step(params, state)
    assert updates["a"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32
    assert new_params["a"].dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(updates["a"].astype(jnp.float32))))
    # Same numbers as the plain transformation, in float32.
    p32 = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
    tx32 = optax.inject_hyperparams(gam_optax.gam_penalty)(rho=0.1, penalty=0.5)
    plain = gam_optax.gam_penalty(0.1, 0.5)
    g = jax.grad(loss_fn)(p32)
    d1, _ = tx32.update(g, tx32.init(p32), p32, loss_fn=loss_fn)
    d2, _ = plain.update(g, plain.init(p32), p32, loss_fn=loss_fn)
    for k in d1:
        np.testing.assert_allclose(d1[k], d2[k], rtol=1e-6)
