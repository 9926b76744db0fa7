"""The README's Flax recipes work: Linen with BatchNorm, and NNX's nnx.Optimizer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gam_optax

HYPER = dict(rho=0.1, rho_prime=0.02, alpha=0.6, beta=0.5, gamma=0.1)


def _data():
    x = jax.random.normal(jax.random.key(0), (16, 6))
    y = jnp.arange(16) % 3
    return x, y


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(3)(nn.relu(x))


def test_linen_batchnorm_step_keeps_only_the_g0_statistics():
    x, y = _data()
    model = LinenNet()
    variables = model.init(jax.random.key(1), x, train=False)
    params, stats = variables["params"], variables["batch_stats"]
    tx = optax.chain(gam_optax.gam(**HYPER, has_aux=True), optax.sgd(0.1))
    opt_state = tx.init(params)
    calls = []

    def loss_fn(p):
        calls.append(1)
        logits, new_vars = model.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new_vars["batch_stats"]

    @jax.jit
    def step(params, opt_state):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, loss_fn=loss_fn)
        return optax.apply_updates(params, updates), opt_state, new_stats, loss

    new_params, _, new_stats, _ = step(params, opt_state)
    assert len(calls) == 4  # g0 and the three extra passes, traced into one program
    # The statistics are those of the caller's pass at theta, not of a perturbed pass.
    _, at_theta = jax.jit(
        lambda p: model.apply(
            {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
        )
    )(params)
    jax.tree.map(np.testing.assert_allclose, new_stats, at_theta["batch_stats"])
    # The update is -lr times GAM's direction.
    grads = jax.jit(jax.grad(lambda p: loss_fn(p)[0]))(params)
    gam = gam_optax.gam(**HYPER, has_aux=True)
    direction, _ = jax.jit(lambda g, p: gam.update(g, gam.init(p), p, loss_fn=loss_fn))(
        grads, params
    )
    expected = jax.tree.map(lambda p, d: p - 0.1 * d, params, direction)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_params, expected
    )


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def test_nnx_optimizer_forwards_loss_fn():
    x, y = _data()
    model = NNXNet(nnx.Rngs(0))
    tx = optax.chain(gam_optax.gam(**HYPER), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_fn(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        grads = jax.grad(loss_fn)(params)
        optimizer.update(model, grads, loss_fn=loss_fn)
        return loss_fn(params)

    losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
    assert losses[-1] < 0.9 * losses[0]

    # The first step moved the params by exactly -lr * d.
    fresh = NNXNet(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(fresh, nnx.Param, ...)

    def loss_fn(p):
        m = nnx.merge(graphdef, p, rest, copy=True)
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    gam = gam_optax.gam(**HYPER)
    update = jax.jit(lambda g, p: gam.update(g, gam.init(p), p, loss_fn=loss_fn)[0])
    direction = update(jax.grad(loss_fn)(params), params)
    # Computed before the step: nnx.split's states share the model's variables.
    expected = jax.tree.map(lambda p, d: np.asarray(p) - 0.1 * np.asarray(d), params, direction)
    optimizer = nnx.Optimizer(fresh, tx, wrt=nnx.Param)
    train_step(fresh, optimizer, x, y)
    _, after, _ = nnx.split(fresh, nnx.Param, ...)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), after, expected
    )
