"""SAM + GAM (``sam_gam``) and finite-difference Hessian-vector products (``hvp_step=`` of
``gam_penalty`` and ``sam_gam``): a NumPy reference, the identities, the gradient count.

The loss is a quartic plus a quadratic in five parameters (two leaves: the norms are global),
with its gradient and Hessian written out in NumPy.
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gam_optax


def penalty_tx(rho, penalty, sam_rho=None, **kwargs):
    """``gam_penalty``, or ``sam_gam`` when ``sam_rho`` is given: one name per algorithm."""
    if sam_rho is None:
        return gam_optax.gam_penalty(rho, penalty, **kwargs)
    return gam_optax.sam_gam(rho, penalty, sam_rho=sam_rho, **kwargs)


RNG = np.random.default_rng(7)
M = RNG.normal(size=(5, 5))
A = M @ M.T / 5 + 0.2 * np.eye(5)
B = RNG.normal(size=5)
C = np.array([0.5, 1.0, 0.3, 0.8, 0.6])
THETA = np.array([0.4, -1.2, 0.7, 1.5, -0.3])


def np_grad(x):
    """L(x) = x^T A x / 2 - b^T x + sum(c x^4) / 4."""
    return A @ x - B + C * x**3


def np_hessian(x):
    return A + np.diag(3 * C * x**2)


def loss(p):
    x = jnp.concatenate([p["w"], p["b"]])
    return 0.5 * x @ jnp.asarray(A) @ x - jnp.asarray(B) @ x + 0.25 * jnp.sum(jnp.asarray(C) * x**4)


def tree(x):
    return {"w": jnp.asarray(x[:3]), "b": jnp.asarray(x[3:])}


def flat(d):
    return np.concatenate([np.asarray(d["w"]), np.asarray(d["b"])])


def unit(v, eps=1e-12):
    return v / (np.linalg.norm(v) + eps)


def np_sam_gam(theta, rho, penalty, sam_rho=None, hvp_step=None, mask=None):
    """d = g_s + penalty h_norm (mask: a 0/1 vector for the ascent steps on ||g|| and SAM)."""
    m = np.ones_like(theta) if mask is None else mask
    g = np_grad
    g0 = g(theta)
    if hvp_step is None:  # exact H v
        f = np_hessian(theta) @ unit(g0)
    else:  # finite differences, every parameter moved
        f = g(theta + hvp_step * unit(g0)) - g0
    theta_adv = theta + rho * unit(m * f)
    g_adv = g(theta_adv)
    if hvp_step is None:
        h_norm = rho * np_hessian(theta_adv) @ unit(g_adv)
    else:
        h_norm = rho * (g(theta_adv + hvp_step * unit(g_adv)) - g_adv) / hvp_step
    g_s = g0 if sam_rho is None else g(theta + sam_rho * unit(m * g0))
    return g_s + penalty * h_norm


def direction(tx, x=THETA, steps=1, **extra):
    """The last of ``steps`` directions at fixed params."""
    params = tree(x)
    state = tx.init(params)
    for _ in range(steps):
        d, state = tx.update(jax.grad(loss)(params), state, params, **(extra or {"loss_fn": loss}))
    return d


RHO, PENALTY = 0.3, 0.7


# ----------------------------------------------------------------------------
# The NumPy reference.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("sam_rho", [None, 0.07])
def test_exact_mode_equals_numpy(x64, sam_rho):
    got = flat(direction(penalty_tx(RHO, PENALTY, sam_rho=sam_rho)))
    expected = np_sam_gam(THETA, RHO, PENALTY, sam_rho)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    if sam_rho is not None:  # SAM's gradient did change the direction
        assert np.linalg.norm(expected - np_sam_gam(THETA, RHO, PENALTY)) > 1e-2


@pytest.mark.parametrize("sam_rho", [None, 0.05, 0.07])  # 0.05: the shared point
def test_finite_difference_mode_equals_numpy(x64, sam_rho):
    tx = penalty_tx(RHO, PENALTY, sam_rho=sam_rho, hvp_step=0.05)
    expected = np_sam_gam(THETA, RHO, PENALTY, sam_rho, hvp_step=0.05)
    np.testing.assert_allclose(flat(direction(tx)), expected, rtol=1e-10)
    exact = np_sam_gam(THETA, RHO, PENALTY, sam_rho)
    assert 1e-4 < np.linalg.norm(expected - exact) < 0.1 * np.linalg.norm(exact)


@pytest.mark.parametrize("hvp_step", [None, 0.05])
def test_mask_moves_the_ascent_and_sam_steps_only(x64, hvp_step):
    """mask: the steps on ||g|| and SAM's move the selected leaves; H v (or its finite
    difference) is still taken along the whole unit vector."""
    tx = penalty_tx(RHO, PENALTY, sam_rho=0.05, hvp_step=hvp_step, mask={"w": True, "b": False})
    m = np.array([1.0, 1.0, 1.0, 0.0, 0.0])
    expected = np_sam_gam(THETA, RHO, PENALTY, 0.05, hvp_step, mask=m)
    np.testing.assert_allclose(flat(direction(tx)), expected, rtol=1e-10)
    assert not np.allclose(expected, np_sam_gam(THETA, RHO, PENALTY, 0.05, hvp_step))


# ----------------------------------------------------------------------------
# Identities.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("hvp_step", [None, 0.05, 0.02])
def test_penalty_zero_is_sam(x64, hvp_step):
    tx = penalty_tx(RHO, 0.0, sam_rho=0.05, hvp_step=hvp_step)
    expected = direction(gam_optax.sam(0.05))
    np.testing.assert_array_equal(flat(direction(tx)), flat(expected))


def test_the_defaults_are_algorithm_1_unchanged(x64):
    plain = direction(penalty_tx(RHO, PENALTY))
    explicit = direction(penalty_tx(RHO, PENALTY, sam_rho=None, hvp_step=None))
    np.testing.assert_array_equal(flat(plain), flat(explicit))
    np.testing.assert_allclose(flat(plain), np_sam_gam(THETA, RHO, PENALTY), rtol=1e-10)


def test_finite_differences_converge_linearly_to_the_exact_direction(x64):
    """The error is O(hvp_step): halving the step halves it."""
    exact = flat(direction(penalty_tx(RHO, PENALTY, sam_rho=0.05)))
    errors = [
        np.linalg.norm(flat(direction(penalty_tx(RHO, PENALTY, sam_rho=0.05, hvp_step=r))) - exact)
        for r in (2e-3, 1e-3)
    ]
    assert errors[0] / errors[1] == pytest.approx(2.0, abs=0.1)
    assert 1e-6 < errors[1] < 1e-2


# ----------------------------------------------------------------------------
# The shared point: 3 gradients beyond g0 when sam_rho is hvp_step, 4 otherwise.
# ----------------------------------------------------------------------------


def grad_fn_indices(tx):
    """The ``i`` of every ``grad_fn`` call of one update (each traced once)."""
    seen = []

    def grad_fn(p, i):
        seen.append(i)
        return jax.grad(loss)(p)

    direction(tx, grad_fn=grad_fn)
    return seen


def traced_gradients(tx):
    """How many times ``jax.grad(loss_fn)`` is traced in one jitted update."""
    calls = []

    def counted(p):
        calls.append(None)
        return loss(p)

    params = tree(THETA)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=counted)[0])
    step(jax.grad(loss)(params), tx.init(params), params)
    return len(calls)


SCHEDULE = optax.linear_schedule(0.05, 0.01, 10)


@pytest.mark.parametrize(
    ("kwargs", "indices"),
    [
        (dict(sam_rho=0.05, hvp_step=0.05), [1, 2, 3]),
        (dict(sam_rho=0.25, hvp_step=np.float32(0.25)), [1, 2, 3]),  # equal numbers
        (dict(sam_rho=SCHEDULE, hvp_step=SCHEDULE), [1, 2, 3]),  # the same schedule
        (dict(sam_rho=0.05, hvp_step=0.05, mask={"w": True, "b": True}), [1, 2, 3]),
        (dict(sam_rho=0.05, hvp_step=0.02), [1, 2, 3, 4]),
        (dict(sam_rho=SCHEDULE, hvp_step=optax.linear_schedule(0.05, 0.01, 10)), [1, 2, 3, 4]),
        (dict(sam_rho=0.05, hvp_step=0.05, mask={"w": True, "b": False}), [1, 2, 3, 4]),
        (dict(sam_rho=0.05), [1, 2, 3, 4]),  # exact: the H v products differentiate grad_fn
        (dict(hvp_step=0.05), [1, 2, 3]),
    ],
)
def test_gradient_evaluations(kwargs, indices):
    tx = penalty_tx(RHO, PENALTY, **kwargs)
    assert grad_fn_indices(tx) == indices
    assert traced_gradients(tx) == len(indices)


def test_the_shared_point_gives_the_unshared_numbers(x64):
    """inject_hyperparams passes two arrays: not shared, one more gradient, the same d."""
    shared = penalty_tx(RHO, PENALTY, sam_rho=0.05, hvp_step=0.05)
    injected = optax.inject_hyperparams(gam_optax.sam_gam)(
        rho=RHO, penalty=PENALTY, sam_rho=0.05, hvp_step=0.05
    )
    assert traced_gradients(shared) == 3 and traced_gradients(injected) == 4
    np.testing.assert_allclose(flat(direction(injected)), flat(direction(shared)), rtol=1e-13)


# ----------------------------------------------------------------------------
# Schedules, dtypes, errors.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("hvp_step", [None, 0.05, "schedule"])
def test_schedules_are_evaluated_at_the_step_count(x64, hvp_step):
    sam_rho = lambda count: 0.1 / (1 + count)  # float64 arithmetic under x64
    hvp = (lambda count: 0.05 / (1 + count)) if hvp_step == "schedule" else hvp_step
    for steps in (1, 3):
        tx = penalty_tx(RHO, PENALTY, sam_rho=sam_rho, hvp_step=hvp)
        got = direction(tx, steps=steps)
        at = lambda v, k=steps - 1: v(k) if callable(v) else v
        expected = np_sam_gam(THETA, RHO, PENALTY, float(at(sam_rho)), at(hvp) and float(at(hvp)))
        np.testing.assert_allclose(flat(got), expected, rtol=1e-10)


@pytest.mark.parametrize("kwargs", [dict(sam_rho=0.05, hvp_step=0.05), dict(sam_rho=0.05)])
def test_float32_params_give_float32_updates(kwargs):
    tx = optax.chain(penalty_tx(RHO, PENALTY, **kwargs), optax.sgd(0.1))
    params = jax.tree.map(lambda v: v.astype(jnp.float32), tree(THETA))
    updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)
    assert {v.dtype for v in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
    expected = -0.1 * np_sam_gam(THETA, RHO, PENALTY, **kwargs)
    np.testing.assert_allclose(flat(updates), expected, rtol=2e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(sam_rho=-0.05), ValueError, "sam_gam: sam_rho must be a finite number >= 0"),
        (dict(sam_rho="0.05"), TypeError, "sam_gam: sam_rho must be a real number"),
        (dict(hvp_step=0.0), ValueError, r"gam_penalty: hvp_step must be a finite number > 0"),
        (dict(hvp_step=-1e-3), ValueError, r"gam_penalty: hvp_step must be a finite number > 0"),
        (dict(hvp_step=float("nan")), ValueError, "gam_penalty: hvp_step must be a finite"),
        (
            dict(hvp_step=optax.linear_schedule(0.05, 0.0, 100)),
            ValueError,
            "gam_penalty: the hvp_step schedule at step 100 must be a finite number > 0",
        ),
    ],
)
def test_bad_sam_rho_and_hvp_step_raise_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message) as raised:
        penalty_tx(RHO, PENALTY, **kwargs)
    if error is ValueError:
        assert "Pass a finite Python float" in str(raised.value)


# ----------------------------------------------------------------------------
# The README's example and the experiments' entry.
# ----------------------------------------------------------------------------


def test_the_readme_example_builds_and_descends():
    readme = pathlib.Path(__file__).parents[2] / "README.md"
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
                if "sam_rho=" in b]  # fmt: skip
    namespace = {"optax": optax, "gam_optax": gam_optax}
    exec(block, namespace)
    tx = namespace["tx"]
    params = tree(THETA)
    state = tx.init(params)
    before = float(loss(params))
    for _ in range(5):
        updates, state = tx.update(jax.grad(loss)(params), state, params, loss_fn=loss)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < before


def test_the_experiments_sam_gam_entry_is_sam_gam_with_its_section():
    pytest.importorskip("ml_collections")  # the experiments' extra; not in the lowest CI stage
    from experiments import optimizers
    from experiments.configs import default

    config = default.get_config()
    config.optimizer, config.weight_decay = "sam_gam", 0.0
    section = config.sam_gam.to_dict()
    assert section["sam_rho"] == section["hvp_step"]  # the shared point
    tx = optimizers.create(config, lambda count: 0.1)
    want = optax.chain(
        gam_optax.sam_gam(**section, has_aux=True),
        optax.chain(optax.add_decayed_weights(0.0), optax.sgd(0.1, momentum=config.momentum)),
    )
    params = tree(THETA)
    aux_loss = lambda p: (loss(p), {})
    g0 = jax.grad(loss)(params)
    got, _ = tx.update(g0, tx.init(params), params, loss_fn=aux_loss)
    expected, _ = want.update(g0, want.init(params), params, loss_fn=aux_loss)
    np.testing.assert_array_equal(flat(got), flat(expected))
