"""Every member of the family in every mode equals its inline one-call form (float64).

The table is ``perturbations.FAMILY``: each row with every option on (a radius schedule,
ASAM's adaptive steps where the member has them, a mask), in its finite-difference mode and
its exact mode where it has one. Five steps of ``optax.chain(member, SGD with momentum)``,
a new batch each step, run

* inline (``unroll=True``, the reference);
* inline with the other arithmetic (``flat``: one flat vector of the gradients, or leaf by
  leaf);
* ``unroll=False``: one traced gradient in a ``jax.lax.scan``;
* ``gam_optax.transparent(member, SGD with momentum)``: one gradient per ``update`` call,
  each batch fed ``calls`` times (the exact modes refuse it, by name);

and the parameters and the momentum must agree to round-off. ``optax.contrib.sam``'s
default mode is the reference for transparent SAM.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from perturbations import FAMILY
from test_family import make_problem, softmax_loss

import gam_optax

STEPS = 5
CASES = {
    **{f"{name}": (name, row.everything) for name, row in FAMILY.items()},
    **{
        f"{name}_exact": (name, {**row.everything, **row.exact})
        for name, row in FAMILY.items()
        if row.exact is not None
    },
    # sam_rho the hvp_step and no mask: SAM's gradient is the first probe's (4 calls).
    "sam_gam_shared": ("sam_gam", dict(rho=FAMILY["sam_gam"].everything["rho"])),
}
# Gradients per step with g0: the transparent mode's calls, and the README's table.
CALLS = {"sam": 2, "gsam": 2, "gam": 4, "gam_penalty": 4, "sam_gam": 5, "sam_gam_shared": 4}


def member(case, **options):
    name, kwargs = CASES[case]
    return FAMILY[name].factory(**kwargs, **options)


def outer():
    return optax.sgd(0.1, momentum=0.9)


def batches():
    x, y, params = make_problem(n=12)
    return params, [(x + 0.1 * t, y) for t in range(STEPS)]


def relative(a, b):
    """The largest difference relative to the tree's scale (float64 round-off: ~1e-15)."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(float(jnp.max(jnp.abs(v))) for v in b)
    return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(a, b, strict=True)) / scale


@functools.cache
def inline(case):
    """Params and momentum after STEPS inline steps (float64), computed once a case."""
    with jax.enable_x64(True):
        return train(optax.chain(member(case), outer()), calls=1, loss_fn=True)


def train(tx, calls, loss_fn):
    params, data = batches()
    state = tx.init(params)

    @jax.jit
    def call(params, state, x, y):
        loss = lambda p: softmax_loss(p, x, y)
        extra = dict(loss_fn=loss) if loss_fn else {}
        updates, state = tx.update(jax.grad(loss)(params), state, params, **extra)
        return optax.apply_updates(params, updates), state

    for x, y in data:
        for _ in range(calls):  # the same batch, once a call
            params, state = call(params, state, x, y)
    return params, state


def momentum(state):
    """The SGD momentum (``optax.TraceState``) anywhere in an optimizer state."""
    traces = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.TraceState))]
    (trace,) = [s for s in traces if isinstance(s, optax.TraceState)]
    return trace.trace


@pytest.mark.parametrize("case", list(CASES))
def test_unroll_false_equals_the_inline_step(case, x64):
    params, state = train(optax.chain(member(case, unroll=False), outer()), 1, loss_fn=True)
    want_params, want_state = inline(case)
    assert relative(params, want_params) < 1e-12
    assert relative(momentum(state), momentum(want_state)) < 1e-12
    assert relative(params, batches()[0]) > 1e-3  # it trained


@pytest.mark.parametrize("case", list(CASES))
def test_the_other_arithmetic_equals_the_inline_step(case, x64):
    flat = not member(case).options.flat  # each member's default, and the other
    params, state = train(optax.chain(member(case, flat=flat), outer()), 1, loss_fn=True)
    want_params, want_state = inline(case)
    assert relative(params, want_params) < 1e-12
    assert relative(momentum(state), momentum(want_state)) < 1e-12


@pytest.mark.parametrize("case", list(CASES))
def test_transparent_equals_the_inline_step(case, x64):
    if case.endswith("_exact"):
        fix = "hessian=False" if case.startswith("gam_exact") else "hvp_step=0.01"
        with pytest.raises(ValueError, match=f"exact mode takes Hessian-vector products.*{fix}"):
            gam_optax.transparent(member(case), outer())
        return
    tx = gam_optax.transparent(member(case), outer())
    params, state = train(tx, CALLS[case.removesuffix("_exact")], loss_fn=False)
    want_params, want_state = inline(case)
    assert int(gam_optax.transparent_phase(state)) == 0  # a whole number of steps
    assert int(state.count) == STEPS  # the steps counted: the schedules' clock
    assert relative(params, want_params) < 1e-12
    assert relative(momentum(state), momentum(want_state)) < 1e-12


def test_transparent_sam_is_optax_contrib_sams_default_mode(x64):
    """A peer's implementation as the reference: optax.contrib.sam's transparent mode with
    the adversarial optimizer of SAM's paper (normalise, step rho), eps=0 as optax."""
    rho = 0.05
    ours = gam_optax.transparent(gam_optax.sam(rho, eps=0.0), outer())
    theirs = optax.contrib.sam(outer(), optax.chain(optax.contrib.normalize(), optax.sgd(rho)))
    params, state = train(ours, 2, loss_fn=False)
    want_params, want_state = train(theirs, 2, loss_fn=False)
    assert relative(params, want_params) < 1e-12
    assert relative(momentum(state), momentum(want_state)) < 1e-12
    assert relative(params, batches()[0]) > 1e-3


def test_transparent_refuses_what_it_cannot_run():
    gam = gam_optax.gam()
    with pytest.raises(TypeError, match=r"transparent: optimizer is gam_optax.gam.*outer"):
        gam_optax.transparent(outer(), gam)  # swapped
    with pytest.raises(TypeError, match=r"transparent: perturbation must be a member.*chain"):
        gam_optax.transparent(optax.chain(gam, outer()), outer())
    with pytest.raises(ValueError, match=r"axis_name='batch'.*jax.lax.pmean"):
        gam_optax.transparent(gam_optax.sam(axis_name="batch"), outer())
    with pytest.raises(TypeError, match=r"transparent_gam: optimizer is gam_optax.gam"):
        gam_optax.transparent_gam(gam)
    tx = gam_optax.transparent(gam, outer())
    params = {"w": jnp.ones(3)}
    with pytest.raises(TypeError, match=r"no loss_fn; it would be ignored, and a call is 1/4"):
        tx.update(params, tx.init(params), params, loss_fn=lambda p: jnp.sum(p["w"]))


@pytest.mark.parametrize("name", list(FAMILY))
def test_calls_per_step_is_one_plus_the_traced_gradients(name):
    """The transparent mode's calls are g0 plus the gradients one inline update takes."""
    params = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
    seen = []

    def grad_fn(p, i):
        seen.append(i)
        return jax.tree.map(jnp.cos, p)

    tx = FAMILY[name].factory(**FAMILY[name].everything)
    tx.update(jax.tree.map(jnp.sin, params), tx.init(params), params, grad_fn=grad_fn)
    assert seen == list(range(1, len(seen) + 1))
    assert gam_optax._transparent.calls_per_step(tx) == 1 + len(seen) == CALLS[name]


# ---------------------------------------------------------------------------
# grad_fn's index i in the modes that take grad_fn (all but the transparent one).
# ---------------------------------------------------------------------------

GRAD_FN_MODES = {
    "unroll=False": lambda case: dict(unroll=False),
    "other-arithmetic": lambda case: dict(flat=not member(case).options.flat),
    "unroll=False-other-arithmetic": lambda case: dict(
        unroll=False, flat=not member(case).options.flat
    ),
}


def indexed_grad_fn(loss, seen):
    """A grad_fn whose gradient depends on i, (1 + i / 10) g(p), that records each (i, p)
    it is evaluated at (under unroll=False i is a traced int32: the callback sees its
    value; in the exact mode p is the primal point of jax.jvp)."""

    def record(i, p):
        seen.append((int(i), jax.tree.map(jnp.asarray, p)))

    def grad_fn(p, i):
        jax.debug.callback(record, i, p)
        return jax.tree.map(lambda g: g * (1 + 0.1 * i), jax.grad(loss)(p))

    return grad_fn


def grad_fn_direction(tx, grad_fn_of):
    """The direction of one jitted update with an indexed grad_fn, and the (i, point)
    pairs it was evaluated at, ordered by i (unordered callbacks may run in any order)."""
    params, ((x, y), *_) = batches()
    loss = lambda p: softmax_loss(p, x, y)
    seen = []
    grad_fn = grad_fn_of(loss, seen)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn)[0])
    d = step(jax.grad(loss)(params), tx.init(params), params)
    jax.effects_barrier()
    return d, sorted(seen, key=lambda pair: pair[0])


@pytest.mark.parametrize("mode", list(GRAD_FN_MODES))
@pytest.mark.parametrize("case", list(CASES))
def test_grad_fn_gets_the_inline_index_and_point_in_every_mode(case, mode, x64):
    """unroll=False evaluates grad_fn in a jax.lax.scan, i a traced int32: it must get the
    values 1, 2, 3... of the inline mode at the same points, and a grad_fn whose result
    depends on i must give the inline direction (float64)."""
    want, want_seen = grad_fn_direction(member(case), indexed_grad_fn)
    got, got_seen = grad_fn_direction(member(case, **GRAD_FN_MODES[mode](case)), indexed_grad_fn)
    indices = [i for i, _ in want_seen]
    assert indices == list(range(1, len(indices) + 1)) and len(indices) >= 1
    assert [i for i, _ in got_seen] == indices
    for (i, point), (_, want_point) in zip(got_seen, want_seen, strict=True):
        assert relative(point, want_point) < 1e-12, i
    assert relative(got, want) < 1e-12
    # i does matter here: the same grad_fn without the factor gives another direction (by
    # 10-50%; 0.5% for gam_penalty_exact, where only h_norm keeps the factor, 1.3: the
    # other two evaluations are normalised away, and their i are checked above).
    plain, _ = grad_fn_direction(member(case), lambda loss, seen: lambda p, i: jax.grad(loss)(p))
    assert relative(want, plain) > 1e-3


# ---------------------------------------------------------------------------
# average='direction' inside jax.shard_map: every member, inline and scanned.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("unroll", [True, False], ids=["inline", "unroll=False"])
@pytest.mark.parametrize("case", list(CASES))
def test_shard_map_direction_mode_is_the_mean_of_each_devices_own_direction(case, unroll, x64):
    """axis_name='data', average='direction' (the default) on 4 devices, each with a quarter
    of the batch: the direction is the mean of the one-device directions of the quarters
    (float64: the same arithmetic per device, then a mean). The scan's carry must be typed
    per device from its start (GradientOracle.per_device), in every member and mode: the
    exact modes' first probe is (theta, step), theta replicated, where the finite
    differences' is theta + e, already per device."""
    assert jax.device_count() == 4, "the root conftest.py sets 4 fake CPU devices"
    x, y, params = make_problem(n=16)
    quarters = [(x[s : s + 4], y[s : s + 4]) for s in range(0, 16, 4)]
    single = member(case, unroll=unroll)
    own = []
    for bx, by in quarters:
        loss = lambda p, bx=bx, by=by: softmax_loss(p, bx, by)
        g0 = jax.grad(loss)(params)
        own.append(single.update(g0, single.init(params), params, loss_fn=loss)[0])
    want = jax.tree.map(lambda *ds: sum(ds) / 4, *own)

    tx = member(case, unroll=unroll, axis_name="data")

    def body(p, bx, by):
        loss = lambda q: softmax_loss(q, bx, by)
        g0 = jax.grad(loss)(jax.lax.pcast(p, "data", to="varying"))
        return tx.update(g0, tx.init(p), p, loss_fn=loss)[0]

    mesh = jax.make_mesh((4,), ("data",))
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P())
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    got = jax.jit(sharded)(put(params, P()), put(x, P("data")), put(y, P("data")))
    assert relative(got, want) < 1e-12
    # The direction mode differs from the one-device direction on the whole batch.
    loss = lambda p: softmax_loss(p, x, y)
    full = single.update(jax.grad(loss)(params), single.init(params), params, loss_fn=loss)[0]
    assert relative(want, full) > 1e-3


@pytest.mark.parametrize(
    ("unroll", "jit"), [(True, True), (True, False), (False, True)], ids=["jit", "eager", "scan"]
)
@pytest.mark.parametrize("case", list(CASES))
def test_m_sharpness_on_one_device_is_jax_vmap_over_micro_batches(case, unroll, jit, x64):
    """SAM's m-sharpness on one device: ``jax.vmap(step, axis_name='m')`` over k micro-batches,
    the member built with ``axis_name='m'``, jitted or not, gives the mean of each
    micro-batch's own direction: what 'direction' mode gives on k devices (the test above).
    With one micro-batch it is the plain step."""
    x, y, params = make_problem(n=16)
    single = member(case, unroll=unroll)

    @jax.jit  # the reference, compiled: op by op it would take most of the test's time
    def own_direction(bx, by):
        loss = lambda p: softmax_loss(p, bx, by)
        return single.update(jax.grad(loss)(params), single.init(params), params, loss_fn=loss)[0]

    tx = member(case, unroll=unroll, axis_name="m")

    def step(p, bx, by):  # the user's step, unchanged: one micro-batch
        loss = lambda q: softmax_loss(q, bx, by)
        return tx.update(jax.grad(loss)(p), tx.init(p), p, loss_fn=loss)[0]

    run = jax.vmap(step, in_axes=(None, 0, 0), axis_name="m")
    run = jax.jit(run) if jit else run
    for k in (4, 1):
        micro = [(x[s : s + 16 // k], y[s : s + 16 // k]) for s in range(0, 16, 16 // k)]
        want = jax.tree.map(lambda *ds, k=k: sum(ds) / k, *[own_direction(*b) for b in micro])
        split = lambda a, k=k: a.reshape(k, 16 // k, *a.shape[1:])
        got = run(params, split(x), split(y))
        for leaf, expected in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert leaf.shape == (k, *expected.shape)  # vmap returns one (equal) copy each
            np.testing.assert_allclose(leaf, np.broadcast_to(expected, leaf.shape), atol=1e-13)


@pytest.mark.parametrize("case", list(CASES))
def test_m_sharpness_sequential_over_micro_batches_equals_the_vmap(case, x64):
    """The sequential strategy, ``jax.lax.map`` of the plain member over the micro-batches
    and a mean (one micro-batch's memory at a time), equals the parallel one, ``jax.vmap``
    with ``axis_name`` (float64)."""
    x, y, params = make_problem(n=16)
    split = lambda a: a.reshape(4, 4, *a.shape[1:])
    plain, averaging = member(case), member(case, axis_name="m")

    def direction(tx, p, bx, by):
        loss = lambda q: softmax_loss(q, bx, by)
        return tx.update(jax.grad(loss)(p), tx.init(p), p, loss_fn=loss)[0]

    each = jax.lax.map(lambda b: direction(plain, params, *b), (split(x), split(y)))
    sequential = jax.tree.map(lambda v: v.mean(0), each)
    parallel = jax.vmap(
        functools.partial(direction, averaging), in_axes=(None, 0, 0), axis_name="m"
    )(params, split(x), split(y))
    for s, p in zip(jax.tree.leaves(sequential), jax.tree.leaves(parallel), strict=True):
        np.testing.assert_allclose(p, np.broadcast_to(s, p.shape), rtol=0, atol=1e-13)
