"""Misuse around the members and their wrappers is loud: one clear error that names the
argument and the fix, for every member of the family (``perturbations.FAMILY``).

The flax module's misuse table is in ``test_flax_usage.py``; bad hyperparameters and
gradients in ``test_validation.py``; the transparent mode's refusals in ``test_modes.py``.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from perturbations import FAMILY

import gam_optax

PARAMS = {"w": jnp.ones((2, 2)), "b": jnp.zeros(2)}
LOSS = lambda p: jnp.sum(jnp.sin(p["w"])) + jnp.sum(p["b"] ** 2)
G0 = jax.grad(LOSS)(PARAMS)


def update(tx, **extra):
    return lambda: tx.update(G0, tx.init(PARAMS), PARAMS, **extra)


def on_a_filtered_tree(tx):
    """``tx``'s update on params holding None where a filter left out the activation."""
    params, grads = {**PARAMS, "activation": None}, {**G0, "activation": None}
    loss_fn = lambda p: jnp.sum(p["activation"](p["w"]))
    return lambda: tx.update(grads, tx.init(params), params, loss_fn=loss_fn)


def branches_on_i(p, i):
    """A grad_fn that chooses in Python by i: fine inline, not with a traced i."""
    return jax.grad(LOSS)(p) if i == 1 else jax.tree.map(jnp.zeros_like, p)


def family_cases():
    """(misuse, exception, a substring naming the argument, one naming the fix), by member."""
    for name, row in FAMILY.items():
        yield (
            f"{name}-one-argument-grad_fn",
            (
                update(row.factory(), grad_fn=lambda p: G0),
                TypeError,
                f"{name}: grad_fn must take the params and i alone",
                "grad_fn=lambda p, i:",
            ),
        )
        yield (
            f"{name}-loss_fn-of-params-and-batch",
            (
                update(row.factory(), loss_fn=lambda p, batch: LOSS(p)),
                TypeError,
                f"{name}: loss_fn must take the params alone",
                "close over the rest, e.g. loss_fn=lambda p: loss(p, batch)",
            ),
        )
        yield (
            f"{name}-python-branch-on-traced-i",
            (
                update(row.factory(unroll=False), grad_fn=branches_on_i),
                TypeError,
                "with unroll=False i is a traced int32",
                "jnp.where / jax.lax.switch on i",
            ),
        )
        yield (
            f"{name}-reuse-of-a-chain",
            (
                lambda row=row: gam_optax.reuse(optax.chain(row.factory(), optax.sgd(0.1))).init(
                    PARAMS
                ),
                TypeError,
                "reuse: inner must be a sharpness-aware member",
                "optax.chain(gam_optax.reuse(gam_optax.gam()), optax.sgd(0.1))",
            ),
        )


def empty_params_cases():
    """Params that hold no array: nothing to perturb, refused at init and at update."""
    for name, row in FAMILY.items():
        for flat in (False, True):
            tx = row.factory(flat=flat)
            yield (
                f"{name}-empty-params-init-flat={flat}",
                (lambda tx=tx: tx.init({}), ValueError, f"{name}: params hold no array", "Pass"),
            )
            yield (
                f"{name}-empty-params-update-flat={flat}",
                (
                    lambda tx=tx: tx.update({}, tx.init(PARAMS), {}, loss_fn=lambda p: 0.0),
                    ValueError,
                    f"{name}: params hold no array (dict {{}})",
                    "Pass the model's parameters",
                ),
            )


def transparent_update(tx, state):
    return lambda: tx.update(G0, state, PARAMS)


SGD = optax.sgd(0.1)
TRANSPARENT_SAM, TRANSPARENT_GAM = (
    gam_optax.transparent(m, SGD) for m in (gam_optax.sam(), gam_optax.gam())
)
FOREIGN_STATE = "the state of another member, optimizer or model?"
SAME_INIT = "Initialise the state with the same transformation that updates it"
REUSE = gam_optax.reuse(gam_optax.gam())
TWO_TRANSPARENT = optax.chain(TRANSPARENT_SAM, gam_optax.transparent(gam_optax.gam(), SGD))

MISUSE = {
    **dict(family_cases()),
    **dict(empty_params_cases()),
    "transparent-empty-params": (
        lambda: TRANSPARENT_GAM.init({}),
        ValueError,
        "transparent: params hold no array",
        "Pass the model's parameters",
    ),
    "two-transparent-in-one-chain": (
        lambda: TWO_TRANSPARENT.update(G0, TWO_TRANSPARENT.init(PARAMS), PARAMS),
        TypeError,
        "transparent: the gradient given to update is the parameter move another transparent",
        "gam_optax.transparent(member, optax.chain(...))",
    ),
    "transparent-given-another-members-state": (
        transparent_update(TRANSPARENT_SAM, TRANSPARENT_GAM.init(PARAMS)),
        TypeError,
        "transparent.update: state.carry",
        SAME_INIT,
    ),
    "transparent-given-another-optimizers-state": (
        transparent_update(
            gam_optax.transparent(gam_optax.gam(), optax.adam(0.1)),
            gam_optax.transparent(gam_optax.gam(), optax.sgd(0.1, momentum=0.9)).init(PARAMS),
        ),
        TypeError,
        FOREIGN_STATE,
        SAME_INIT,
    ),
    "transparent-given-other-params-state": (
        transparent_update(TRANSPARENT_GAM, TRANSPARENT_GAM.init({"w": PARAMS["w"]})),
        TypeError,
        "transparent.update: state.theta['b'] holds nothing where",
        SAME_INIT,
    ),
    "reuse-given-other-params-state": (
        lambda: REUSE.update(
            G0,
            REUSE.init({"w": PARAMS["w"], "b": jnp.zeros(3)}),
            PARAMS,
            loss_fn=LOSS,
            refresh=True,
        ),
        TypeError,
        "reuse.update: state.v['b'] holds an array of shape (3,) where reuse(...).init(params) "
        "puts one of shape (2,)",
        SAME_INIT,
    ),
    "reuse-given-a-state-with-an-extra-leaf": (
        lambda: REUSE.update(
            G0,
            REUSE.init({**PARAMS, "extra": jnp.zeros(2)}),
            PARAMS,
            loss_fn=LOSS,
            refresh=True,
        ),
        TypeError,
        "reuse.update: state.v['extra'] holds an array of shape (2,) where reuse(...)"
        ".init(params) puts nothing",
        SAME_INIT,
    ),
    "reuse-given-the-same-leaves-in-other-containers": (  # a list for a tuple: same paths
        lambda: REUSE.update(
            (G0["w"], G0["b"]),
            REUSE.init((PARAMS["w"], PARAMS["b"]))._replace(v=[PARAMS["w"], PARAMS["b"]]),
            (PARAMS["w"], PARAMS["b"]),
            loss_fn=lambda p: LOSS({"w": p[0], "b": p[1]}),
            refresh=True,
        ),
        TypeError,
        "reuse.update: state's containers differ from reuse(...).init(params) puts them",
        SAME_INIT,
    ),
    "has_aux-loss_fn-returning-an-integer-vector": (
        update(gam_optax.gam(has_aux=True), loss_fn=lambda p: jnp.arange(3)),
        TypeError,
        "it returned one array (int32[3])",
        "must return a tuple (loss, aux)",
    ),
    "has_aux-loss_fn-returning-a-string": (
        update(gam_optax.gam(has_aux=True), loss_fn=lambda p: "0.5"),
        TypeError,
        "gam: has_aux=True, so loss_fn must return a tuple (loss, aux); it returned str.",
        "must return a tuple",
    ),
    "every_gradient-loss_fn-returning-a-list": (
        update(
            gam_optax.every_gradient(optax.clip_by_global_norm(1.0), gam_optax.gam(has_aux=True)),
            loss_fn=lambda p: [LOSS(p), {"aux": 1.0}],
        ),
        TypeError,
        "every_gradient: loss_fn must return the loss or a tuple (loss, aux); it returned a list",
        "Return a tuple: loss_fn=lambda p: (loss, aux)",
    ),
    "has_aux-loss_fn-returning-one-array": (
        update(gam_optax.gam(has_aux=True), loss_fn=LOSS),
        TypeError,
        "gam: has_aux=True, so loss_fn must return a tuple (loss, aux); it returned one array",
        "(float32[])",
    ),
    "loss_fn-failing-on-a-filtered-tree": (  # eqx.filter's style: the activation is None
        on_a_filtered_tree(gam_optax.gam()),
        TypeError,
        "gam: loss_fn failed on the params (TypeError: 'NoneType' object is not callable)",
        "params, static = eqx.partition(model, eqx.is_array)",
    ),
    "every_gradient-loss_fn-failing-on-a-filtered-tree": (
        on_a_filtered_tree(
            gam_optax.every_gradient(optax.clip_by_global_norm(1.0), gam_optax.gam())
        ),
        TypeError,
        "every_gradient: loss_fn failed on the params (TypeError",
        "eqx.combine(p, static)",
    ),
    "loss_fn-returning-a-vector": (
        update(gam_optax.gam(), loss_fn=lambda p: LOSS(p) * jnp.ones(3)),
        ValueError,
        "gam: loss_fn must return a scalar loss, got shape (3,).",
        "Reduce it, e.g. with .mean() over the batch",
    ),
    "loss_fn-returning-a-pair-without-has_aux": (
        update(gam_optax.gam(), loss_fn=lambda p: (LOSS(p), {"aux": 1.0})),
        TypeError,
        "gam: loss_fn returned a tuple of length 2.",
        "construct the transformation with has_aux=True",
    ),
    "has_aux-loss_fn-returning-a-dtype-only": (  # a dtype but no shape: not an array
        update(gam_optax.gam(has_aux=True), loss_fn=lambda p: types.SimpleNamespace(dtype="f")),
        TypeError,
        "it returned SimpleNamespace.",
        "must return a tuple (loss, aux)",
    ),
    "dataset_loss-of-a-one-argument-loss": (
        lambda: gam_optax.flatness.dataset_loss(LOSS, jnp.ones((3, 4))),
        TypeError,
        "dataset_loss: loss_fn must take the params and a batch alone, but its signature is (p)",
        "e.g. loss_fn=lambda p, batch: loss(p, batch)",
    ),
    "flatness-of-a-two-argument-loss": (
        lambda: gam_optax.flatness.hessian_trace(lambda p, b: LOSS(p), PARAMS, jax.random.key(0)),
        TypeError,
        "hessian_trace: loss_fn must take the params alone",
        "close over the rest, e.g. loss_fn=lambda p: loss(p, batch)",
    ),
    "reuse-of-transparent": (
        lambda: gam_optax.reuse(gam_optax.transparent(gam_optax.sam(), optax.sgd(0.1))).init(
            PARAMS
        ),
        TypeError,
        "its init gave TransparentState",
        "Put the base optimizer after reuse",
    ),
    "transparent_gam-given-gam": (
        lambda: gam_optax.transparent_gam(gam_optax.gam()),
        TypeError,
        "transparent_gam: optimizer is gam_optax.gam(...)",
        "gam_optax.transparent(gam_optax.gam(...), optax.sgd(0.1, momentum=0.9))",
    ),
    "transparent_gam-given-loss_fn": (
        update(gam_optax.transparent_gam(optax.sgd(0.1)), loss_fn=LOSS),
        TypeError,
        "transparent_gam: update takes one gradient per call and no loss_fn",
        "use optax.chain(gam_optax.gam(...), optimizer)",
    ),
    "transparent-given-grad_fn": (
        update(gam_optax.transparent(gam_optax.gsam(), optax.sgd(0.1)), grad_fn=lambda p, i: p),
        TypeError,
        "no grad_fn; it would be ignored, and a call is 1/2 of a step",
        "optax.chain(gam_optax.gsam(...), optimizer)",
    ),
    "transparent-of-inject_hyperparams": (
        lambda: gam_optax.transparent(
            optax.inject_hyperparams(gam_optax.sam)(rho=0.1), optax.sgd(0.1)
        ),
        TypeError,
        "perturbation must be a member of the family",
        "not wrapped in optax.chain, optax.inject_hyperparams or reuse",
    ),
    "every_gradient-loss_fn-of-params-and-batch": (
        update(
            gam_optax.every_gradient(optax.clip_by_global_norm(1.0), gam_optax.sam()),
            loss_fn=lambda p, batch: LOSS(p),
        ),
        TypeError,
        "every_gradient: loss_fn must take the params alone",
        "close over the rest",
    ),
    "update-without-params": (
        lambda: gam_optax.sam().update(G0, gam_optax.sam().init(PARAMS), loss_fn=LOSS),
        ValueError,
        "sam: update needs params",
        "tx.update(grads, state, params, ...)",
    ),
}


def assert_names_the_argument_and_the_fix(misuse, error, argument, fix):
    """``misuse()`` raises ``error`` in one line holding ``argument`` and ``fix``."""
    with pytest.raises(error) as raised:
        misuse()
    message = str(raised.value)
    assert argument in message
    assert fix in message
    assert "\n" not in message  # one line


@pytest.mark.parametrize(("misuse", "error", "argument", "fix"), MISUSE.values(), ids=MISUSE)
def test_misuse_names_the_argument_and_the_fix(misuse, error, argument, fix):
    assert_names_the_argument_and_the_fix(misuse, error, argument, fix)


def test_the_arity_remedy_says_close_over_the_rest_only_when_the_function_takes_more():
    """Too few parameters: the example is the fix; too many: close over the rest."""
    with pytest.raises(TypeError) as few:
        update(gam_optax.gam(), grad_fn=lambda p: G0)()
    assert "e.g. grad_fn=" in str(few.value) and "close over the rest" not in str(few.value)
    with pytest.raises(TypeError) as many:
        update(gam_optax.gam(), loss_fn=lambda p, x, y: LOSS(p))()
    assert "close over the rest, e.g. loss_fn=" in str(many.value)


def test_a_loss_fn_that_fails_on_ordinary_params_raises_its_own_error():
    """The filtered-tree message is for params holding None: a loss_fn's own TypeError on
    ordinary params passes through as it was raised."""

    def buggy(p):
        raise TypeError("my bug")

    with pytest.raises(TypeError) as caught:
        update(gam_optax.gam(), loss_fn=buggy)()
    assert str(caught.value) == "my bug"


@pytest.mark.parametrize("name", list(FAMILY))
def test_the_same_grad_fn_is_fine_where_i_is_a_python_int(name):
    """The traced-i error is about unroll=False: inline, i is 1, 2, 3... and the branch runs."""
    tx = FAMILY[name].factory()
    d, _ = tx.update(G0, tx.init(PARAMS), PARAMS, grad_fn=branches_on_i)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(d))


def test_a_transparent_after_a_clip_or_beside_another_is_not_taken_for_two_in_a_chain():
    """The check compares the gradient with the move a transparent update just returned:
    a clip before it, or two models' optimizers each given its own gradient, pass."""
    clipped = optax.chain(optax.clip_by_global_norm(1.0), TRANSPARENT_SAM)
    moved, _ = clipped.update(G0, clipped.init(PARAMS), PARAMS)
    first, _ = TRANSPARENT_SAM.update(G0, TRANSPARENT_SAM.init(PARAMS), PARAMS)
    second, _ = TRANSPARENT_GAM.update(G0, TRANSPARENT_GAM.init(PARAMS), PARAMS)
    step = optax.tree.norm(moved)
    assert 0 < float(step) and float(optax.tree.norm(first)) > 0
    assert float(optax.tree.norm(second)) > 0


def test_a_radius_of_100_is_accepted_and_a_longer_one_refused():
    for name, row in FAMILY.items():
        radius = {"hvp_step": 100.0} if name == "gam_penalty" else {"rho": 100.0}
        d, _ = update(row.factory(**radius), loss_fn=LOSS)()
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(d)), name
        with pytest.raises(ValueError, match="is above 100, the longest radius accepted"):
            row.factory(**{k: 100.01 for k in radius})


def test_reuse_takes_a_numpy_bool_for_refresh_as_the_python_bool():
    tx = gam_optax.reuse(gam_optax.gam(), every=3)
    state = tx.init(PARAMS)
    for flag in (True, False):
        python = tx.update(G0, state, PARAMS, loss_fn=LOSS, refresh=flag)
        numpy = tx.update(G0, state, PARAMS, loss_fn=LOSS, refresh=np.bool_(flag))
        for a, b in zip(jax.tree.leaves(python), jax.tree.leaves(numpy), strict=True):
            assert jnp.array_equal(a, b)


def test_reuses_cpu_warning_points_at_the_callers_line_through_a_chain():
    tx = optax.chain(gam_optax.reuse(gam_optax.gam(), every=2), optax.sgd(0.1))
    with pytest.warns(UserWarning, match="jax.lax.cond") as caught:
        jax.jit(lambda s: tx.update(G0, s, PARAMS, loss_fn=LOSS))(tx.init(PARAMS))
    assert {w.filename for w in caught} == {__file__}


def test_nan_inputs_give_nan_directions_and_apply_if_finite_skips_the_step():
    """As documented (the family guide, "Errors and NaN"): a NaN in g0 spreads to every
    entry of GAM's direction (its norms mix them) and stays at least at the NaN entry of
    SAM's; optax.apply_if_finite passes loss_fn on and skips the step."""
    nan_g0 = {"w": G0["w"].at[0, 0].set(jnp.nan), "b": G0["b"]}
    for name, everywhere in (("gam", True), ("sam", False)):
        tx = FAMILY[name].factory()
        d, _ = tx.update(nan_g0, tx.init(PARAMS), PARAMS, loss_fn=LOSS)
        nan = jnp.concatenate([jnp.isnan(v).ravel() for v in jax.tree.leaves(d)])
        assert bool(nan.all()) if everywhere else bool(jnp.isnan(d["w"][0, 0])), name
    tx = optax.apply_if_finite(optax.chain(gam_optax.gam(), optax.sgd(0.1)), 3)
    state = tx.init(PARAMS)
    skipped, state = tx.update(nan_g0, state, PARAMS, loss_fn=LOSS)
    assert all(bool(jnp.all(v == 0)) for v in jax.tree.leaves(skipped))
    assert int(state.notfinite_count) == 1
    taken, state = tx.update(G0, state, PARAMS, loss_fn=LOSS)
    expected, _ = optax.chain(gam_optax.gam(), optax.sgd(0.1)).update(
        G0, optax.chain(gam_optax.gam(), optax.sgd(0.1)).init(PARAMS), PARAMS, loss_fn=LOSS
    )
    for a, b in zip(jax.tree.leaves(taken), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
