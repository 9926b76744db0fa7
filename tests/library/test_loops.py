"""The user's own loop and chain: Flax's stock TrainState, clipping, the transparent mode.

* A loop that drops ``loss_fn`` (Flax's stock ``TrainState``) gets an error that names the
  fix.
* Clipping: after ``gam`` in the chain it clips the direction (the documented place);
  ``every_gradient`` clips every gradient GAM uses (GAM of the clipped gradient field);
  before ``gam`` it clips ``g0`` alone, which is a different (wrong) algorithm.
* ``transparent_gam``: four ``update`` calls, one gradient each, equal one call of
  ``chain(gam(), optimizer)`` with ``loss_fn``, in float64 to 1e-12, also through Flax's
  stock ``TrainState`` and with BatchNorm statistics kept from the ``g0`` pass.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from test_gam import HYPER, flat, make_problem, numpy_gam, numpy_grad, relative_error, softmax_loss

import gam_optax
import gam_optax.flax

# Outside the fast tier (CONTRIBUTING.md): Flax, flatness, README examples, mypy.
pytestmark = pytest.mark.slow


def assert_close(a, b, rtol=1e-12):
    """float64: the same arithmetic in another order; 1e-12 relative to the leaf's scale."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(1.0, float(np.max(np.abs(b)))))


# ---------------------------------------------------------------------------
# Flax's stock TrainState swallows loss_fn: the error names the fix.
# ---------------------------------------------------------------------------


def _quadratic():
    params = {"w": jnp.array([2.0, -1.0])}
    loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    return params, loss


def test_stock_flax_train_state_error_names_the_fix():
    params, loss = _quadratic()
    tx = optax.chain(gam_optax.gam(), optax.sgd(0.1))
    state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
    step = jax.jit(lambda s: s.apply_gradients(grads=jax.grad(loss)(s.params), loss_fn=loss))
    with pytest.raises(ValueError) as error:
        step(state)
    message = str(error.value)
    assert "neither was given" in message
    assert "Flax's own TrainState.apply_gradients drops loss_fn" in message
    assert "gam_optax.flax.TrainState" in message  # the Linen fix
    assert "gam_optax.flax.nnx_loss_fn" in message  # the NNX path
    assert "gam_optax.transparent(gam_optax.gam(...), optimizer)" in message  # no loss_fn
    # The fix it names works, with the same call.
    fixed = gam_optax.flax.TrainState.create(apply_fn=None, params=params, tx=tx)
    assert int(step(fixed).step) == 1


def test_nnx_optimizer_without_loss_fn_error_names_the_fix():
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    tx = optax.chain(gam_optax.sam(0.05), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    loss = lambda m: jnp.sum(m(jnp.ones((3, 2))) ** 2)
    with pytest.raises(ValueError) as error:
        optimizer.update(model, nnx.grad(loss)(model))
    message = str(error.value)
    assert "optimizer.update(model, grads, loss_fn=gam_optax.flax.nnx_loss_fn(model, loss))" in (
        message
    )
    assert "gam_optax.transparent(gam_optax.sam(...), optimizer)" in message


def test_plain_update_without_loss_fn_lists_every_fix():
    params, loss = _quadratic()
    for tx, alternative in (
        (gam_optax.gam(), "transparent(gam_optax.gam(...), optimizer)"),
        (gam_optax.gam(hessian=True), "transparent(gam_optax.gam(hessian=False), optimizer)"),
        (gam_optax.gam_penalty(0.1, 0.5), "gam_penalty(hvp_step=0.01), optimizer)"),
        (gam_optax.sam_gam(0.1, 0.5, 0.05, hvp_step=0.05), "sam_gam(...), optimizer)"),
    ):
        with pytest.raises(ValueError) as error:
            tx.update(jax.grad(loss)(params), tx.init(params), params)
        message = str(error.value)
        assert "loss_fn=lambda p: loss(p, batch)" in message
        assert "Flax's own TrainState.apply_gradients drops loss_fn" in message
        assert "gam_optax.flax.TrainState" in message and "nnx_loss_fn" in message
        assert alternative in message


# ---------------------------------------------------------------------------
# Clipping: where it goes, and every_gradient.
# ---------------------------------------------------------------------------


def numpy_clip(g, c):
    return g * min(1.0, c / np.linalg.norm(g))


def _softmax_problem():
    x, y, params = make_problem()
    d, k = params["w"].shape
    loss = lambda p: softmax_loss(p, x, y)
    grad = lambda t: numpy_grad(t, x, y, d, k)
    return params, loss, grad


def _train(tx, params, loss, steps=3):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params, loss_fn=loss)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params


def test_clipping_after_gam_clips_the_direction(x64):
    params, loss, grad = _softmax_problem()
    c = 0.05
    d = numpy_gam(flat(params), grad, **HYPER)
    assert np.linalg.norm(d) > 2 * c  # the clip is active
    tx = optax.chain(gam_optax.gam(**HYPER), optax.clip_by_global_norm(c), optax.sgd(0.1))
    got = flat(_train(tx, params, loss, steps=1))
    np.testing.assert_allclose(got, flat(params) - 0.1 * numpy_clip(d, c), rtol=1e-12)


def test_every_gradient_runs_gam_on_the_clipped_gradient_field(x64):
    params, loss, grad = _softmax_problem()
    c = 0.05
    clipped = lambda t: numpy_clip(grad(t), c)
    assert np.linalg.norm(grad(flat(params))) > 2 * c
    expected = numpy_gam(flat(params), clipped, **HYPER)
    inner = gam_optax.gam(**HYPER)
    tx = gam_optax.every_gradient(optax.clip_by_global_norm(c), inner)
    g0 = jax.grad(loss)(params)
    for extra in (
        {"loss_fn": loss},
        {"loss_fn": lambda p: (loss(p), {"aux": 1.0})},  # has_aux: recognised
        {"grad_fn": lambda p, i: jax.grad(loss)(p)},
    ):
        direction, state = tx.update(g0, tx.init(params), params, **extra)
        assert relative_error(flat(direction), expected) < 1e-10
        assert int(state.count) == 1
    # Clipping g0 alone (a clip placed before gam in the chain) is another, wrong algorithm.
    wrong, _ = inner.update(
        optax.clip_by_global_norm(c).update(g0, None)[0], inner.init(params), params, loss_fn=loss
    )
    assert relative_error(flat(wrong), expected) > 0.1


def test_every_gradient_hands_each_evaluation_point_to_the_transform(x64):
    """add_decayed_weights(w) at every point is GAM on L + w/2 |theta|^2: the transform sees
    the point each gradient is taken at, not only theta."""
    params, loss, grad = _softmax_problem()
    w = 0.3
    decayed = lambda t: grad(t) + w * t
    expected = numpy_gam(flat(params), decayed, **HYPER)
    tx = gam_optax.every_gradient(optax.add_decayed_weights(w), gam_optax.gam(**HYPER))
    direction, _ = tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)
    assert relative_error(flat(direction), expected) < 1e-10
    # Decay at theta alone (the transform given the params, not the point) is another step.
    at_theta = lambda t: grad(t) + w * flat(params)
    assert relative_error(flat(direction), numpy_gam(flat(params), at_theta, **HYPER)) > 1e-3


def test_clip_before_gam_is_wrong_and_every_gradient_or_after_is_right(x64):
    """The issue's example: chain(clip_by_global_norm(1e-3), gam(), sgd(0.1)), 3 steps."""
    params, loss, _ = _softmax_problem()
    clip = lambda: optax.clip_by_global_norm(1e-3)
    chains = {
        "before": (clip(), gam_optax.gam(**HYPER)),
        "after": (gam_optax.gam(**HYPER), clip()),
        "every": (gam_optax.every_gradient(clip(), gam_optax.gam(**HYPER)),),
        "none": (gam_optax.gam(**HYPER),),
    }
    moved = {
        name: flat(_train(optax.chain(*chain, optax.sgd(0.1)), params, loss)) - flat(params)
        for name, chain in chains.items()
    }
    bound = 3 * 0.1 * 1e-3  # 3 steps of lr 0.1 along directions of norm <= 1e-3
    for name in ("after", "every"):  # the clip is respected
        assert np.linalg.norm(moved[name]) <= bound * (1 + 1e-9)
    assert np.linalg.norm(moved["none"]) > 100 * bound  # and it matters here
    # Before: g1 - g0 compares unclipped gradients with a clipped one and h_plus is
    # unclipped, so the step is neither clipped nor GAM's.
    assert np.linalg.norm(moved["before"]) > 400 * bound  # the README: "450 times farther"
    assert relative_error(moved["before"], moved["none"]) > 0.01


def test_every_gradient_works_for_the_family_and_refuses_a_stateful_transform(x64):
    params, loss, grad = _softmax_problem()
    c = 0.05
    clipped = lambda t: numpy_clip(grad(t), c)
    g0 = jax.grad(loss)(params)
    tx = gam_optax.every_gradient(optax.clip_by_global_norm(c), gam_optax.sam(0.1))
    direction, _ = tx.update(g0, tx.init(params), params, loss_fn=loss)
    theta = flat(params)
    g = clipped(theta)
    expected = clipped(theta + 0.1 * g / (np.linalg.norm(g) + 1e-12))
    assert relative_error(flat(direction), expected) < 1e-10
    # Inside reuse, and with exact Hessian-vector products: it runs and stays finite.
    for inner in (gam_optax.reuse(gam_optax.gam(**HYPER), every=2), gam_optax.gam(hessian=True)):
        tx = gam_optax.every_gradient(optax.clip_by_global_norm(c), inner)
        direction, _ = tx.update(g0, tx.init(params), params, loss_fn=loss)
        assert np.all(np.isfinite(flat(direction)))
    with pytest.raises(ValueError, match="transform must be stateless"):
        gam_optax.every_gradient(optax.scale_by_adam(), gam_optax.gam()).init(params)
    with pytest.raises(ValueError, match="neither was given"):
        tx = gam_optax.every_gradient(optax.clip(1.0), gam_optax.gam())
        tx.update(g0, tx.init(params), params)
    with pytest.raises(TypeError, match="every_gradient: inner must be an optax"):
        gam_optax.every_gradient(optax.clip(1.0), "gam")


# ---------------------------------------------------------------------------
# The transparent mode.
# ---------------------------------------------------------------------------


def _base():
    return optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))


def _batches(steps, n=24, d=5, k=3):
    rng = np.random.default_rng(1)
    return [(rng.normal(size=(n, d)), rng.integers(0, k, size=n)) for _ in range(steps)]


TRANSPARENT_CASES = {
    "defaults": {},
    "adaptive-paper": {"adaptive": True, "h_minus_weighting": "paper"},
    "mask": {"mask": {"w": True, "b": False}},
    "schedules": {
        "rho": optax.linear_schedule(0.3, 0.1, 4),
        "rho_prime": optax.linear_schedule(0.05, 0.01, 4),
    },
}


@pytest.mark.parametrize("case", TRANSPARENT_CASES)
def test_transparent_gam_equals_the_one_call_step(x64, case):
    _, _, params = make_problem()
    hyper = {**HYPER, **TRANSPARENT_CASES[case]}
    one = optax.chain(gam_optax.gam(**hyper), _base())
    four = gam_optax.transparent_gam(_base(), **hyper)

    @jax.jit
    def one_call(params, state, x, y):
        loss = lambda p: softmax_loss(p, x, y)
        updates, state = one.update(jax.grad(loss)(params), state, params, loss_fn=loss)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def transparent_call(params, state, x, y):  # what a loop without loss_fn does
        grads = jax.grad(lambda p: softmax_loss(p, x, y))(params)
        updates, state = four.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    reference, one_state = params, one.init(params)
    current, state = params, four.init(params)
    for x, y in _batches(5):
        reference, one_state = one_call(reference, one_state, x, y)
        theta = current
        for call in range(4):  # the same batch, four times
            assert int(gam_optax.transparent_phase(state)) == call
            current, state = transparent_call(current, state, x, y)
            if call < 3:  # a perturbed point; outer_params is theta
                assert relative_error(flat(current), flat(theta)) > 1e-4
                jax.tree.map(assert_close, gam_optax.outer_params(state, current), theta)
        jax.tree.map(assert_close, current, reference)
        jax.tree.map(assert_close, gam_optax.outer_params(state, current), reference)
    # The outer optimizer's state (momentum) and the GAM step count agree too.
    jax.tree.map(assert_close, state.opt_state, one_state[1])
    assert int(state.count) == int(one_state[0].count) == 5


def test_transparent_gam_checks_its_arguments():
    with pytest.raises(TypeError, match="transparent_gam: optimizer must be an optax"):
        gam_optax.transparent_gam(0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        gam_optax.transparent_gam(optax.sgd(0.1), rho=-1.0)
    tx = gam_optax.transparent_gam(optax.sgd(0.1))
    params, _ = _quadratic()
    with pytest.raises(ValueError, match="transparent_gam: update needs params"):
        tx.update(params, tx.init(params))
    with pytest.raises(TypeError, match="TransparentState"):
        tx.update(params, optax.sgd(0.1).init(params), params)
    with pytest.raises(ValueError, match="exactly one TransparentState"):
        gam_optax.outer_params(optax.sgd(0.1).init(params), params)


class MLP(nn.Module):
    """A small Linen network with BatchNorm, float64."""

    @nn.compact
    def __call__(self, x, train: bool):
        dense = lambda n: nn.Dense(n, dtype=jnp.float64, param_dtype=jnp.float64)
        x = dense(8)(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.5, dtype=jnp.float64, param_dtype=jnp.float64
        )(x)
        return dense(3)(nn.relu(x))


def test_transparent_gam_in_flax_stock_train_state_with_batchnorm(x64):
    """Flax's own TrainState, BatchNorm statistics kept from the g0 pass (the documented
    recipe), equals gam_optax.flax.TrainState's one call with loss_fn."""

    class StockState(train_state.TrainState):  # Flax's TrainState, as its BatchNorm example
        batch_stats: dict

    model = MLP()
    batches = _batches(4, n=16)
    variables = model.init(jax.random.key(0), batches[0][0], train=False)
    variables = jax.tree.map(lambda v: v.astype(jnp.float64), variables)  # float32 statistics

    def make_loss_fn(batch_stats, x, y):
        def loss_fn(params):
            logits, updated = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updated["batch_stats"]

        return loss_fn

    @jax.jit
    def one_call(state, x, y):
        loss_fn = make_loss_fn(state.batch_stats, x, y)
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, loss_fn=loss_fn, batch_stats=stats)

    @jax.jit
    def stock_call(state, x, y):  # a stock Flax step; only the phase gate is GAM's
        loss_fn = make_loss_fn(state.batch_stats, x, y)
        (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        g0_pass = gam_optax.transparent_phase(state.opt_state) == 0
        stats = jax.tree.map(
            lambda new, old: jnp.where(g0_pass, new, old), stats, state.batch_stats
        )
        return state.apply_gradients(grads=grads, batch_stats=stats)

    common = dict(apply_fn=model.apply, params=variables["params"])
    one = gam_optax.flax.TrainState.create(
        **common,
        tx=optax.chain(gam_optax.gam(**HYPER, has_aux=True), _base()),
        batch_stats=variables["batch_stats"],
    )
    stock = StockState.create(
        **common,
        tx=gam_optax.transparent_gam(_base(), **HYPER),
        batch_stats=variables["batch_stats"],
    )
    for x, y in batches:
        one = one_call(one, x, y)
        for _ in range(4):
            stock = stock_call(stock, x, y)
        jax.tree.map(assert_close, stock.params, one.params)
        jax.tree.map(assert_close, stock.batch_stats, one.batch_stats)
    assert int(stock.step) == 4 * int(one.step) == 16  # the stock step counts calls
