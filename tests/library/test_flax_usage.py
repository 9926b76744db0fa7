"""The Flax guide's recipes work: Linen with BatchNorm, and NNX's nnx.Optimizer; and
gam_optax.flax's misuse (wrong model, loss, wrt, loss_fn/grad_fn) gets a one-line error that
names the argument and the fix, at nnx_loss_fn's call or loss_fn's first trace."""

import functools
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_misuse import assert_names_the_argument_and_the_fix

import gam_optax
import gam_optax.flax
from gam_optax import _compat  # nnx.merge(..., copy=True) where flax has it

# Outside the fast tier (CONTRIBUTING.md): Flax, flatness, README examples, mypy.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).parents[2]
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
            m = _compat.nnx_merge_copy(nnx, graphdef, p, rest)
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
        m = _compat.nnx_merge_copy(nnx, graphdef, p, rest)
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


# ----------------------------------------------------------------------------- gam_optax.flax


def test_linen_train_state_takes_m_sharpness_steps_under_jax_vmap(x64):
    """m-sharpness with the Linen helper: the user's train_step, unchanged, under
    ``jax.vmap(..., axis_name='micro')`` over 4 micro-batches of 4, with
    ``gam(axis_name='micro')``: every micro-batch gets the same parameters (the mean of the
    micro-batches' own GAM directions, each with BatchNorm over its 4 examples), and its own
    BatchNorm statistics, which the caller averages. Checked against the plain member run
    by hand on each micro-batch."""
    x, y = _data()
    x = x.astype(jnp.float64)
    model = LinenNet64()
    variables = model.init(jax.random.key(1), x, train=False)
    member = lambda **kw: gam_optax.gam(**HYPER, has_aux=True, **kw)
    tx = optax.chain(member(axis_name="micro"), optax.sgd(0.1))
    state = gam_optax.flax.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
    )

    def make_loss_fn(stats, x, y):
        def loss_fn(params):
            variables = {"params": params, "batch_stats": stats}
            logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updated["batch_stats"]

        return loss_fn

    def train_step(state, x, y):  # one micro-batch: the user's step as the guide writes it
        loss_fn = make_loss_fn(state.batch_stats, x, y)
        (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, loss_fn=loss_fn, batch_stats=batch_stats)

    @jax.jit
    def m_sharpness_step(state, x, y):
        split = lambda a: a.reshape(4, 4, *a.shape[1:])
        states = jax.vmap(train_step, (None, 0, 0), axis_name="micro")(state, split(x), split(y))
        first = jax.tree.map(lambda v: v[0], states)
        return first.replace(batch_stats=jax.tree.map(lambda v: v.mean(0), states.batch_stats))

    params, stats, plain = variables["params"], variables["batch_stats"], member()
    for _ in range(3):
        directions, new_stats = [], []
        for k in range(4):
            loss_fn = make_loss_fn(stats, x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4])
            (_, s), g0 = jax.value_and_grad(loss_fn, has_aux=True)(params)
            directions.append(plain.update(g0, plain.init(params), params, loss_fn=loss_fn)[0])
            new_stats.append(s)
        d = jax.tree.map(lambda *v: sum(v) / 4, *directions)
        params = jax.tree.map(lambda p, d: p - 0.1 * d, params, d)
        stats = jax.tree.map(lambda *v: sum(v) / 4, *new_stats)
        state = m_sharpness_step(state, x, y)
    assert int(state.step) == 3
    for got, want in ((state.params, params), (state.batch_stats, stats)):
        jax.tree.map(assert_close, got, want)


def test_import_gam_optax_does_not_import_flax():
    code = "import sys, gam_optax; assert 'flax' not in sys.modules, 'flax was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def assert_close(a, b):
    """float64: the same computation, in another program (a bias before BatchNorm has a zero
    gradient, whose round-off is ~1e-19)."""
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


class LinenNet64(nn.Module):
    """LinenNet in float64 (params and compute): the checks below are exact equalities."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8, dtype=jnp.float64, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.5, dtype=jnp.float64, param_dtype=jnp.float64
        )(x)
        return nn.Dense(3, dtype=jnp.float64, param_dtype=jnp.float64)(nn.relu(x))


def test_linen_train_state_forwards_loss_fn_counts_steps_and_keeps_g0_statistics(x64):
    x, y = _data()
    x = x.astype(jnp.float64)
    model = LinenNet64()
    variables = model.init(jax.random.key(1), x, train=False)
    tx = optax.chain(gam_optax.gam(**HYPER, has_aux=True), optax.sgd(0.1))
    state = gam_optax.flax.TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=tx,
        batch_stats=variables["batch_stats"],
    )

    def make_loss_fn(params_stats):
        def loss_fn(params):
            logits, updated = model.apply(
                {"params": params, "batch_stats": params_stats},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updated[
                "batch_stats"
            ]

        return loss_fn

    @jax.jit
    def train_step(state):
        loss_fn = make_loss_fn(state.batch_stats)
        (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, loss_fn=loss_fn, batch_stats=batch_stats)

    # By hand: g0 and its statistics, GAM's direction, then SGD.
    params, stats, gam = (
        variables["params"],
        variables["batch_stats"],
        gam_optax.gam(**HYPER, has_aux=True),
    )
    for _ in range(3):
        loss_fn = make_loss_fn(stats)
        (_, new_stats), g0 = jax.value_and_grad(loss_fn, has_aux=True)(params)
        d, _ = gam.update(g0, gam.init(params), params, loss_fn=loss_fn)
        params, stats = jax.tree.map(lambda p, d: p - 0.1 * d, params, d), new_stats
        state = train_step(state)
    assert int(state.step) == 3
    for got, want in ((state.params, params), (state.batch_stats, stats)):
        jax.tree.map(assert_close, got, want)
    moved = jax.tree.map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), stats, variables["batch_stats"]
    )
    assert min(jax.tree.leaves(moved)) > 1e-3  # the running statistics did move


class NNXNetBN(nnx.Module):
    """BatchNorm and dropout, in float64."""

    def __init__(self, rngs):
        kwargs = dict(dtype=jnp.float64, param_dtype=jnp.float64, rngs=rngs)
        self.hidden = nnx.Linear(6, 8, **kwargs)
        self.bn = nnx.BatchNorm(8, momentum=0.5, **kwargs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.out = nnx.Linear(8, 3, **kwargs)

    def __call__(self, x):
        return self.out(self.drop(jax.nn.relu(self.bn(self.hidden(x)))))


def _rng_counts(model):
    return [int(c) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))]


def test_nnx_loss_fn_keeps_batchnorm_statistics_dropout_masks_and_rng_right(x64):
    x, y = _data()
    x = x.astype(jnp.float64)
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    tx = optax.chain(gam_optax.gam(**HYPER), optax.sgd(0.1))
    model, plain = NNXNetBN(nnx.Rngs(0)), NNXNetBN(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer):
        loss_fn = gam_optax.flax.nnx_loss_fn(model, loss)  # before the g0 pass
        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads, loss_fn=loss_fn)

    @nnx.jit
    def plain_pass(model):  # what a step without GAM does to statistics and random state
        return nnx.grad(loss)(model)

    # By hand, from a copy of the model before the step: g0, and GAM's extra passes on
    # copies that start from the same random state (so the same dropout masks as g0).
    before = nnx.clone(model)
    graphdef, params, rest = nnx.split(before, nnx.Param, ...)
    at = lambda p: loss(_compat.nnx_merge_copy(nnx, graphdef, p, rest))
    gam = gam_optax.gam(**HYPER)
    d, _ = gam.update(jax.grad(at)(params), gam.init(params), params, loss_fn=at)
    expected = jax.tree.map(lambda p, d: np.asarray(p) - 0.1 * np.asarray(d), params, d)

    train_step(model, optimizer)
    plain_pass(plain)
    _, after, _ = nnx.split(model, nnx.Param, ...)
    jax.tree.map(assert_close, after, expected)
    # Statistics and random state: exactly those of one plain pass.
    for collection in (nnx.BatchStat, nnx.RngCount):
        jax.tree.map(
            np.testing.assert_array_equal,
            nnx.state(model, collection),
            nnx.state(plain, collection),
        )
    assert _rng_counts(model) == [1]
    assert float(jnp.max(jnp.abs(model.bn.mean[...]))) > 1e-3  # the statistics moved


# ----------------------------------------------------------------------------- misuse


class LoRANet(nnx.Module):
    """nnx.Param (Linear), nnx.LoRAParam (a subclass of nnx.Param) and nnx.BatchStat."""

    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 4, rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.lora = nnx.LoRA(3, 2, 4, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.lin(x)) + self.lora(x)


X3 = jnp.linspace(-1.0, 1.0, 15).reshape(5, 3)


def _loss(m):
    return jnp.mean(m(X3) ** 2)


def _step_with(optimizer_wrt, loss_fn_wrt):
    """One jitted SAM step, the optimizer and nnx_loss_fn built with these filters."""
    model = LoRANet(nnx.Rngs(0))
    tx = optax.chain(gam_optax.sam(0.05), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=optimizer_wrt)

    @nnx.jit
    def step(model, optimizer):
        loss_fn = gam_optax.flax.nnx_loss_fn(model, _loss, wrt=loss_fn_wrt)
        grads = nnx.grad(_loss, argnums=nnx.DiffState(0, optimizer_wrt))(model)
        optimizer.update(model, grads, loss_fn=loss_fn)

    step(model, optimizer)
    return model


def _call_loss_fn(wrt, given):
    """loss_fn of nnx_loss_fn(..., wrt=wrt) called with the params ``given`` selects."""
    model = LoRANet(nnx.Rngs(0))
    loss_fn = gam_optax.flax.nnx_loss_fn(model, _loss, wrt=wrt)
    return loss_fn(nnx.state(model, given))


def _nnx_loss_fn(model, loss, **kwargs):
    return lambda: gam_optax.flax.nnx_loss_fn(model(), loss, **kwargs)


def _linear():
    return nnx.Linear(2, 1, rngs=nnx.Rngs(0))


def _apply_gradients(**kwargs):
    params = {"w": jnp.array([2.0, -1.0])}
    loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    tx = optax.chain(gam_optax.gam(), optax.sgd(0.1))
    state = gam_optax.flax.TrainState.create(apply_fn=None, params=params, tx=tx)
    return lambda: state.apply_gradients(grads=jax.grad(loss)(params), **kwargs)


ONES = jnp.ones((3, 2))
_square = lambda m: jnp.sum(m(ONES) ** 2)
_grad = lambda p, i: jax.tree.map(jnp.ones_like, p)

# id -> (the misuse, exception, a substring naming the argument, one naming the fix)
MISUSE = {
    "linen-model": (
        _nnx_loss_fn(lambda: nn.Dense(3), _square),
        TypeError,
        "model is a Linen module (Dense)",
        "use gam_optax.flax.TrainState",
    ),
    "params-as-model": (
        _nnx_loss_fn(lambda: {"w": jnp.ones(2)}, _square),
        TypeError,
        "model must be an nnx.Module",
        "loss_fn=lambda p: loss(p, batch) to tx.update",
    ),
    "state-as-model": (
        _nnx_loss_fn(lambda: nnx.state(_linear()), _square),
        TypeError,
        "model must be an nnx.Module (the model nnx.Optimizer updates), got State",
        "pass the model itself",
    ),
    "optimizer-as-model": (
        _nnx_loss_fn(lambda: nnx.Optimizer(_linear(), optax.sgd(0.1), wrt=nnx.Param), _square),
        TypeError,
        "model is an nnx.Optimizer",
        "pass the model it updates",
    ),
    "swapped-arguments": (
        lambda: gam_optax.flax.nnx_loss_fn(_square, _linear()),
        TypeError,
        "model must be an nnx.Module",
        "the arguments are swapped; call nnx_loss_fn(model, loss)",
    ),
    "string-loss": (
        _nnx_loss_fn(_linear, "mse"),
        TypeError,
        "loss must be a function of the model, got str 'mse'",
        "loss=lambda m: loss(m, batch)",
    ),
    "none-loss": (
        _nnx_loss_fn(_linear, None),
        TypeError,
        "loss must be a function of the model, got NoneType",
        "loss=lambda m: loss(m, batch)",
    ),
    "two-argument-loss": (
        _nnx_loss_fn(_linear, lambda m, batch: _square(m)),
        TypeError,
        "loss must take the model alone",
        "close over the rest, e.g. loss=lambda m: loss(m, batch)",
    ),
    "keyword-only-batch-loss": (
        _nnx_loss_fn(_linear, lambda m, *, batch: _square(m)),
        TypeError,
        "loss must take the model alone",
        "close over the rest",
    ),
    "no-argument-loss": (
        _nnx_loss_fn(_linear, lambda: 0.0),
        TypeError,
        "loss must take the model alone",
        "but its signature is (): e.g. loss=lambda m:",
    ),
    "wrt-not-a-filter": (
        _nnx_loss_fn(_linear, _square, wrt=3),
        TypeError,
        "wrt=3 is not an nnx filter",
        "pass the wrt your nnx.Optimizer was built with",
    ),
    "wrt-selects-nothing": (
        _nnx_loss_fn(_linear, _square, wrt=nnx.BatchStat),
        ValueError,
        "wrt=nnx.BatchStat selects no variable of model",
        "pass the wrt your nnx.Optimizer was built with",
    ),
    # The optimizer's wrt differs from nnx_loss_fn's: at loss_fn's first (traced) call.
    "wrt-narrower-than-optimizer": (
        lambda: _step_with(nnx.Param, nnx.LoRAParam),
        ValueError,
        "nnx_loss_fn(..., wrt=nnx.LoRAParam): loss_fn got params other than those wrt selects",
        "pass the wrt your nnx.Optimizer was built with",
    ),
    "wrt-wider-than-optimizer": (
        lambda: _step_with(nnx.LoRAParam, nnx.Param),
        ValueError,
        "nnx_loss_fn(..., wrt=nnx.Param): loss_fn got params other than those wrt selects",
        "pass the wrt your nnx.Optimizer was built with",
    ),
    "wrt-everything": (
        lambda: _step_with(nnx.Param, ...),
        ValueError,
        "wrt=...): loss_fn got params other than those wrt selects from the model",
        "pass the wrt your nnx.Optimizer was built with",
    ),
    "wrt-two-kinds": (
        lambda: _call_loss_fn(nnx.Param, nnx.Any(nnx.Param, nnx.BatchStat)),
        ValueError,
        "loss_fn got params other than those wrt selects from the model (extra: ['bn.mean'",
        "pass the wrt your nnx.Optimizer was built with",
    ),
    "wrt-by-path": (  # no Variable-type filter selects these: the fix names none
        lambda: _call_loss_fn(nnx.Param, nnx.All(nnx.Param, nnx.PathContains("lin"))),
        ValueError,
        "loss_fn got params other than those wrt selects from the model (extra: []; missing:",
        "pass the wrt your nnx.Optimizer was built with",
    ),
    "apply-gradients-string-loss-fn": (
        _apply_gradients(loss_fn="mse"),
        TypeError,
        "gam: loss_fn must be a function of the params, got str",
        "loss_fn=lambda p: loss(p, batch)",
    ),
    "apply-gradients-two-argument-loss-fn": (
        _apply_gradients(loss_fn=lambda p, batch: 0.0),
        TypeError,
        "gam: loss_fn must take the params alone",
        "close over the rest, e.g. loss_fn=lambda p: loss(p, batch)",
    ),
    "apply-gradients-one-argument-grad-fn": (
        _apply_gradients(grad_fn=lambda p: p),
        TypeError,
        "gam: grad_fn must take the params and i alone",
        "grad_fn=lambda p, i: grad(p, batch)",
    ),
    "apply-gradients-grad-fn-not-callable": (
        _apply_gradients(grad_fn=3),
        TypeError,
        "gam: grad_fn must be a function of the params and i, got int",
        "grad_fn=lambda p, i:",
    ),
}


@pytest.mark.parametrize(("misuse", "error", "argument", "fix"), MISUSE.values(), ids=MISUSE)
def test_flax_misuse_names_the_argument_and_the_fix(misuse, error, argument, fix):
    assert_names_the_argument_and_the_fix(misuse, error, argument, fix)


class _NoSignature:
    """A callable whose signature Python cannot read: not checked, its call decides."""

    __signature__ = "unreadable"

    def __call__(self, model):
        return _square(model)


@pytest.mark.parametrize(
    "loss",
    [
        _square,
        functools.partial(lambda m, batch: jnp.sum(m(batch) ** 2), batch=ONES),
        lambda m, batch=ONES: jnp.sum(m(batch) ** 2),
        lambda *args: _square(args[0]),
        jax.jit(_square),
        _NoSignature(),
    ],
    ids=["lambda", "partial", "default-batch", "varargs", "jax-jit", "no-signature"],
)
def test_nnx_loss_fn_accepts_every_loss_of_the_model_alone(loss):
    model = _linear()
    loss_fn = gam_optax.flax.nnx_loss_fn(model, loss)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    moved = jax.tree.map(lambda p: p + 1.0, params)
    np.testing.assert_allclose(loss_fn(params), _square(model), rtol=1e-6)
    assert abs(float(loss_fn(moved)) - float(_square(model))) > 1e-3  # the params are used


@pytest.mark.parametrize("wrt", [nnx.Param, nnx.LoRAParam], ids=["param", "lora"])
def test_matching_wrt_steps_only_what_it_selects(wrt):
    before = LoRANet(nnx.Rngs(0))
    after = _step_with(wrt, wrt)
    moved = {
        ".".join(map(str, path)): bool(np.any(np.asarray(a) != np.asarray(b)))
        for (path, a), (_, b) in zip(
            nnx.to_flat_state(nnx.state(after, nnx.Param)),
            nnx.to_flat_state(nnx.state(before, nnx.Param)),
            strict=True,
        )
    }
    assert all(moved[k] == (wrt is nnx.Param or k.startswith("lora")) for k in moved), moved


def test_train_state_accepts_grad_fn_of_params_and_index():
    params = {"w": jnp.array([2.0, -1.0])}
    loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
    tx = optax.chain(gam_optax.gam(), optax.sgd(0.1))
    state = gam_optax.flax.TrainState.create(apply_fn=None, params=params, tx=tx)
    g0 = jax.grad(loss)(params)
    by_grad = state.apply_gradients(grads=g0, grad_fn=lambda p, i: jax.grad(loss)(p))
    by_loss = state.apply_gradients(grads=g0, loss_fn=loss)
    np.testing.assert_allclose(by_grad.params["w"], by_loss.params["w"], rtol=1e-6)
    assert float(jnp.max(jnp.abs(by_grad.params["w"] - params["w"]))) > 1e-3
