"""gam(unroll=False): the three extra gradients from one traced gradient, the same arithmetic.

Every formulation is checked against the unrolled one in float64, where the two programs
differ only in the order XLA fuses the same operations (measured: ~3e-16 relative).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gam_optax

HYPER = dict(rho=0.3, rho_prime=0.05, alpha=0.6, beta=1.7, gamma=0.2)


def make_problem(seed=0):
    """A two-layer tanh network: its Hessian is not constant, so every point matters."""
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(32, 5)), rng.normal(size=(32,))
    params = {"w": rng.normal(size=(5, 7)) * 0.5, "v": rng.normal(size=(7,))}
    return x, y, params


def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2) + 0.1 * jnp.sum(p["w"] ** 4)


def worst_error(a, b):
    """The largest absolute difference, relative to the largest entry of ``b``."""
    return max(
        float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def direction(tx, params, x, y, steps=1, **call):
    """The direction of the ``steps``-th update (schedules see the count advance)."""
    loss_fn = lambda p: loss(p, x, y)
    g0 = jax.grad(loss_fn)(params)
    if call.pop("aux", False):
        call["loss_fn"] = lambda p: (loss_fn(p), {"logits": x @ p["w"]})
    elif call.pop("grad_fn", False):
        call["grad_fn"] = lambda p, i: jax.grad(loss_fn)(p)
    else:
        call["loss_fn"] = loss_fn
    update = jax.jit(lambda s, p: tx.update(g0, s, p, **call))
    state = tx.init(params)
    for _ in range(steps):
        d, state = update(state, params)
    return d


# Every member's unroll=False equals its inline step with every option on: test_modes.py.


@pytest.mark.parametrize("call", ["aux", "grad_fn", "schedules"])
def test_one_traced_gradient_with_aux_grad_fn_and_schedules(x64, call):
    x, y, params = make_problem(seed=1)
    hyper, kwargs, steps = dict(HYPER), {}, 1
    if call == "schedules":  # evaluated at the count: the third step
        hyper.update(rho=optax.linear_schedule(0.3, 0.1, 4), rho_prime=lambda t: 0.05 / (1 + t))
        steps = 3
    else:
        kwargs[call] = True
    has_aux = call == "aux"
    unrolled = direction(gam_optax.gam(**hyper, has_aux=has_aux), params, x, y, steps, **kwargs)
    scanned = direction(
        gam_optax.gam(**hyper, has_aux=has_aux, unroll=False), params, x, y, steps, **kwargs
    )
    assert worst_error(scanned, unrolled) <= 1e-12


@pytest.mark.parametrize("hessian", [False, True])
def test_the_loss_is_traced_once_instead_of_three_times(hessian):
    x, y, params = make_problem()
    params = jax.tree.map(jnp.float32, params)
    for unroll, traces in ((True, 3), (False, 1)):
        assert count_traces(params, x, y, hessian=hessian, unroll=unroll) == traces


def count_traces(params, x, y, **kwargs):
    """How often tracing gam's update calls ``loss_fn`` (a Python side effect)."""
    calls = []

    def loss_fn(p):
        calls.append(1)
        return loss(p, x, y)

    tx = gam_optax.gam(**HYPER, **kwargs)
    g0 = jax.grad(loss_fn)(params)
    calls.clear()
    jax.jit(lambda p: tx.update(g0, tx.init(p), p, loss_fn=loss_fn)[0]).lower(params)
    return len(calls)


@pytest.mark.parametrize("average", ["direction", "gradients"])
def test_one_traced_gradient_under_pmap_and_shard_map(x64, average):
    """The pmean of each gradient (``'gradients'``) or of the direction, inside the loop."""
    assert jax.device_count() == 4, "tests/conftest.py sets 4 fake CPU devices"
    x, y, params = make_problem(seed=2)
    shards = lambda a: a.reshape(4, -1, *a.shape[1:])
    got = {}
    for unroll in (True, False):
        tx = gam_optax.gam(**HYPER, axis_name="batch", average=average, unroll=unroll)

        def per_device(p, bx, by, tx=tx):
            loss_fn = lambda q: loss(q, bx, by)
            return tx.update(jax.grad(loss_fn)(p), tx.init(p), p, loss_fn=loss_fn)[0]

        pmapped = jax.pmap(per_device, axis_name="batch", in_axes=(None, 0, 0))
        got[unroll] = jax.tree.map(lambda d: d[0], pmapped(params, shards(x), shards(y)))
    assert worst_error(got[False], got[True]) <= 1e-12

    mesh = jax.make_mesh((4,), ("data",))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    for unroll in (True, False):
        tx = gam_optax.gam(**HYPER, axis_name="data", average=average, unroll=unroll)

        def body(p, bx, by, tx=tx):
            loss_fn = lambda q: loss(q, bx, by)
            g0 = jax.grad(loss_fn)(jax.lax.pcast(p, "data", to="varying"))
            return tx.update(g0, tx.init(p), p, loss_fn=loss_fn)[0]

        sharded = jax.shard_map(
            body, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P()
        )
        got[unroll] = jax.jit(sharded)(put(params, P()), put(x, P("data")), put(y, P("data")))
    assert worst_error(got[False], got[True]) <= 1e-12


def test_reuse_refreshes_with_one_traced_gradient(x64):
    x, y, params = make_problem(seed=3)
    loss_fn = lambda p: loss(p, x, y)
    out = []
    for unroll in (True, False):
        tx = gam_optax.reuse(gam_optax.gam(**HYPER, unroll=unroll), every=2)
        step = jax.jit(
            lambda p, s, r, tx=tx: tx.update(
                jax.grad(loss_fn)(p), s, p, loss_fn=loss_fn, refresh=r
            ),
            static_argnums=2,
        )
        state, ds = tx.init(params), []
        for t in range(3):
            d, state = step(params, state, t % 2 == 0)
            ds.append(d)
        out.append(ds)
    for a, b in zip(*out, strict=True):
        assert worst_error(b, a) <= 1e-12


@pytest.mark.parametrize("factory", [gam_optax.gam, gam_optax.gam_penalty])
def test_unroll_must_be_a_bool(factory):
    with pytest.raises(TypeError, match="unroll must be a Python bool"):
        factory(0.1, 0.1, unroll=0)


def test_reuse_warns_about_the_conditional_on_cpu_only_where_it_is_used():
    params = {"w": jnp.ones(3)}
    loss_fn = lambda p: jnp.sum(p["w"] ** 2)
    tx = gam_optax.reuse(gam_optax.gam(), every=2)
    g0 = jax.grad(loss_fn)(params)
    with pytest.warns(UserWarning, match="refresh=.*static_argnames='refresh'"):
        tx.update(g0, tx.init(params), params, loss_fn=loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx.update(g0, tx.init(params), params, loss_fn=loss_fn, refresh=True)
