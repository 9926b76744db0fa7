"""Bad input, the whole family: each error names the transformation and the argument.

Every row of ``perturbations.FAMILY`` meets the same wrong values: its hyperparameters,
options, states and gradients, at construction or when ``update`` is traced.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from perturbations import FAMILY, OPTIONAL
from test_gam import flat, gam_direction, relative_error, softmax_loss

import gam_optax

# Tables of bad inputs, per category. Each expects an error that names the
# transformation and the argument, and (for hyperparameters) says what to pass.


# value -> (exception, message after "<transformation>: <argument> ")
WRONG_NUMBERS = [
    ("0.1", TypeError, "must be a real number, got str '0.1'"),
    (None, TypeError, "must be a real number, got NoneType"),
    (0.1 + 0j, TypeError, "must be a real number, got complex"),
    (True, TypeError, "must be a real number, got the bool True"),
    (np.array([0.1, 0.2]), ValueError, r"must be a scalar, got an array of shape \(2,\)"),
    (jnp.ones((1,)), ValueError, r"must be a scalar, got an array of shape \(1,\)"),
    (np.array(0.1 + 1j), TypeError, "must be a real number, got ndarray of dtype complex128"),
    (float("nan"), ValueError, "must be a finite number( >=? 0)?, got nan"),
    (jnp.float32(float("inf")), ValueError, "must be a finite number( >=? 0)?, got inf"),
]
BAD_SCHEDULES = [
    # Negative only after step 100: caught by the probe at step 1000.
    (optax.linear_schedule(0.1, -0.1, 200), ValueError, "schedule at step 1000 must be a finite"),
    (lambda t: jnp.where(t > 5, jnp.nan, 0.1), ValueError, "schedule at step 10 must be a finite"),
    (lambda t: "0.1", TypeError, "schedule at step 0 must be a real number"),
    (lambda t: jnp.ones(3) * 0.1, ValueError, "schedule at step 0 must be a scalar"),
    (lambda: 0.1, TypeError, "schedule failed when called with the step count 0"),
]
# Radii (their schedules too) longer than 100 send the perturbed point where a model's
# gradients overflow: refused by name.
RADII = ("rho", "rho_prime", "sam_rho", "hvp_step")
TOO_LONG = [
    (1e30, ValueError, r"= 1e\+30 is above 100, the longest radius accepted"),
    (100.5, ValueError, r"= 100.5 is above 100"),
]
TOO_LONG_SCHEDULE = (
    lambda t: jnp.where(t >= 10, 1e3, 0.1),
    ValueError,
    "schedule at step 10 = 1000 is above 100",
)
REMEDY = "Pass a finite Python float"
LR = optax.linear_schedule(0.1, 0.0, 200)


def _hyperparameter_cases():
    for transformation, entry in FAMILY.items():
        factory = entry.factory
        for argument, (nonnegative, schedule) in entry.numbers.items():
            cases = [c for c in WRONG_NUMBERS if not (argument in OPTIONAL and c[0] is None)]
            if nonnegative == ">0":
                cases.append((-0.01, ValueError, "must be a finite number > 0, got -0.01"))
                cases.append((0.0, ValueError, "must be a finite number > 0, got 0.0"))
            elif nonnegative:
                cases.append((-0.01, ValueError, "must be a finite number >= 0, got -0.01"))
            if schedule:
                cases += [(v, e, m) for v, e, m in BAD_SCHEDULES]
                if nonnegative == ">0":  # the first one is 0 at step 100 already
                    message = "schedule at step 100 must be a finite number > 0, got 0.0"
                    cases[-len(BAD_SCHEDULES)] = (BAD_SCHEDULES[0][0], ValueError, message)
            else:
                cases.append((lambda t: 0.1, TypeError, "must be a number, not a schedule"))
            if argument in RADII:
                cases += [*TOO_LONG, TOO_LONG_SCHEDULE]
            for i, (value, error, message) in enumerate(cases):
                prefix = f"{transformation}: " + (
                    f"the {argument} " if message.startswith("schedule") else f"{argument} "
                )
                yield pytest.param(
                    factory,
                    {argument: value},
                    error,
                    prefix + message,
                    id=f"{transformation}-{argument}-{i}",
                )


@pytest.mark.parametrize(("factory", "kwargs", "error", "message"), list(_hyperparameter_cases()))
def test_bad_hyperparameters_name_the_argument_and_the_remedy(factory, kwargs, error, message):
    with pytest.raises(error, match=message) as raised:
        factory(**kwargs)
    if "is above 100" in message:
        assert "Pass a radius <= 100, e.g." in str(raised.value)
    elif "schedule failed" not in message and "not a schedule" not in message:
        assert REMEDY in str(raised.value)


def _option_cases():
    for transformation, entry in FAMILY.items():
        factory = entry.factory
        for flag in entry.flags:
            for value in ("True", 1, None, jnp.array(True)):
                yield pytest.param(
                    factory,
                    {flag: value},
                    TypeError,
                    f"{transformation}: {flag} must be a Python bool.*static_args",
                    id=f"{transformation}-{flag}-{value!r}",
                )
        for value in (0, ["batch"], ("batch",)):
            yield pytest.param(
                factory,
                {"axis_name": value},
                TypeError,
                f"{transformation}: axis_name must be a string.*axis_name='batch'",
                id=f"{transformation}-axis_name-{value!r}",
            )
        for value in (None, ["gradients"], "mean"):
            yield pytest.param(
                factory,
                {"average": value},
                ValueError,
                f"{transformation}: average must be one of",
                id=f"{transformation}-average-{value!r}",
            )
    for value in (None, 1, "algorithm2"):
        yield pytest.param(
            gam_optax.gam,
            {"h_minus_weighting": value},
            ValueError,
            "gam: h_minus_weighting must be one of.*'paper'",
            id=f"gam-h_minus_weighting-{value!r}",
        )


@pytest.mark.parametrize(("factory", "kwargs", "error", "message"), list(_option_cases()))
def test_bad_options_name_the_argument(factory, kwargs, error, message):
    with pytest.raises(error, match=message):
        factory(**kwargs)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: gam_optax.proportional_schedule(0.1, 0.1, 0.0, 0.2, 0.02),
            TypeError,
            r"proportional_schedule: lr_schedule must be a schedule .*got float 0\.1\.",
        ),
        (
            lambda: gam_optax.proportional_schedule(LR, 0.1, 0.0, -0.2, 0.02),
            ValueError,
            "proportional_schedule: max_value must be a finite number >= 0",
        ),
        (
            lambda: gam_optax.proportional_schedule(LR, 0.1, 0.0, 0.2, -0.02),
            ValueError,
            "proportional_schedule: min_value must be a finite number >= 0",
        ),
        (
            lambda: gam_optax.proportional_schedule(LR, 0.1, -0.1, 0.2, 0.02),
            ValueError,
            "proportional_schedule: lr_min must be a finite number >= 0",
        ),
        (
            lambda: gam_optax.proportional_schedule(LR, float("inf"), 0.0, 0.2, 0.02),
            ValueError,
            "proportional_schedule: lr_max must be a finite number",
        ),
        (
            lambda: gam_optax.proportional_schedule(LR, "0.1", 0.0, 0.2, 0.02),
            TypeError,
            "proportional_schedule: lr_max must be a real number",
        ),
        (
            lambda: gam_optax.proportional_schedule(LR, 0.1, None, 0.2, 0.02),
            TypeError,
            "proportional_schedule: lr_min must be a real number",
        ),
        (
            lambda: gam_optax.proportional_schedule(LR, 0.1, 0.0, jnp.ones(2), 0.02),
            ValueError,
            "proportional_schedule: max_value must be a scalar",
        ),
        (
            lambda: gam_optax.proportional_schedule(LR, 0.1, 0.0, 0.2, True),
            TypeError,
            "proportional_schedule: min_value must be a real number, got the bool",
        ),
        (
            lambda: gam_optax.proportional_schedule(LR, 0.0, 0.1, 0.2, 0.02),
            ValueError,
            r"lr_max \(0.0\) must be >= lr_min",
        ),
        # lr goes below lr_min: the extrapolated radius turns negative, caught by gam.
        (
            lambda: gam_optax.gam(rho=gam_optax.proportional_schedule(LR, 0.1, 0.05, 0.2, 0.02)),
            ValueError,
            "gam: the rho schedule at step 1000 must be a finite number >= 0",
        ),
        (lambda: gam_optax.gam_preset(None), ValueError, "gam_preset: unknown GAM preset None"),
        (lambda: gam_optax.gam_preset(["cifar10_resnet"]), ValueError, "gam_preset: unknown"),
        (lambda: gam_optax.sam_preset(3), ValueError, "sam_preset: unknown SAM preset 3"),
        (lambda: gam_optax.gsam_preset({}), ValueError, "gsam_preset: unknown GSAM preset"),
        (
            lambda: gam_optax.gsam_preset("gsam_imagenet_vit", LR, 0.1, "0"),
            TypeError,
            "proportional_schedule: lr_min must be a real number",
        ),
        (
            lambda: gam_optax.from_released_names(grad_rho="0.02"),
            TypeError,
            "from_released_names: grad_rho must be a real number",
        ),
        (
            lambda: gam_optax.from_released_names(grad_norm_rho=-0.2),
            ValueError,
            "from_released_names: grad_norm_rho must be a finite number >= 0",
        ),
        (
            lambda: gam_optax.from_released_names(grad_gamma=None),
            TypeError,
            "from_released_names: grad_gamma must be a real number",
        ),
        (
            lambda: gam_optax.from_released_names(perturb_eps=float("nan")),
            ValueError,
            "from_released_names: perturb_eps must be a finite number",
        ),
    ],
)
def test_bad_schedule_and_preset_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


LEGAL_FORMS = {
    "int": 1,  # scaled below: rho = 0.25 * value
    "float": 1.0,
    "np.float32": np.float32(1.0),
    "np.int64": np.int64(1),
    "0-d numpy": np.asarray(1.0),
    "0-d jax": jnp.asarray(1.0),
    "schedule": optax.constant_schedule(1.0),
}


@pytest.mark.parametrize("form", list(LEGAL_FORMS))
def test_legal_hyperparameter_forms_construct_and_run(f32_problem, form):
    """Each legal form gives the direction of plain floats. The arithmetic is float32 in
    both; the tolerance covers one rounding of a weight to float32 (relative 6e-8),
    amplified by at most a few operations."""
    x, y, params = f32_problem
    loss_fn = lambda p: softmax_loss(p, x, y)
    one = LEGAL_FORMS[form]
    # rho = one / 4: a weight computed from the given form (a schedule stays a schedule).
    quarter = (lambda t: one(t) / 4) if callable(one) else one / 4
    number = 1.0 if callable(one) else one  # arguments that take no schedule
    pairs = [
        (
            gam_optax.gam(rho=quarter, rho_prime=quarter, alpha=number, gamma=number),
            gam_optax.gam(rho=0.25, rho_prime=0.25, alpha=1.0, gamma=1.0),
        ),
        (gam_optax.sam(quarter, adaptive=True), gam_optax.sam(0.25, adaptive=True)),
        (gam_optax.gsam(quarter, alpha=number), gam_optax.gsam(0.25, alpha=1.0)),
        (gam_optax.gam_penalty(quarter, penalty=number), gam_optax.gam_penalty(0.25, 1.0)),
        (
            gam_optax.sam_gam(quarter, number, sam_rho=quarter, hvp_step=quarter),
            gam_optax.sam_gam(0.25, 1.0, sam_rho=0.25, hvp_step=0.25),
        ),
    ]
    for tx, reference in pairs:
        got, _ = gam_direction(tx, params, loss_fn)
        expected, _ = gam_direction(reference, params, loss_fn)
        assert relative_error(flat(got), flat(expected)) < 1e-6


def test_inject_hyperparams_is_not_checked_at_trace_time(f32_problem):
    """inject_hyperparams passes tracers (unchecked) under jit, and arrays outside it."""
    x, y, params = f32_problem
    loss_fn = lambda p: softmax_loss(p, x, y)
    tx = optax.inject_hyperparams(gam_optax.gam, static_args=("adaptive",))(
        rho=LR, rho_prime=0.05, adaptive=False
    )
    direction, _ = gam_direction(tx, params, loss_fn)
    expected, _ = gam_direction(gam_optax.gam(rho=0.1, rho_prime=0.05), params, loss_fn)
    assert relative_error(flat(direction), flat(expected)) < 1e-6
    eager, _ = tx.update(jax.grad(loss_fn)(params), tx.init(params), params, loss_fn=loss_fn)
    assert relative_error(flat(eager), flat(expected)) < 1e-5


def _int(tree):
    return jax.tree.map(lambda a: jnp.round(a * 100).astype(jnp.int32), tree)


UPDATE_CASES = [
    (
        "grad_fn wrong shape",
        lambda g, p: dict(grad_fn=lambda q, i: {"w": q["w"].T, "b": q["b"]}),
        ValueError,
        r"grad_fn\(params, 1\) has shape \(4, 6\) at params\['w'\], where params\['w'\] has",
    ),
    (
        "grad_fn integer",
        lambda g, p: dict(grad_fn=lambda q, i: _int(q)),
        TypeError,
        r"grad_fn\(params, 1\) has dtype int32 at params\['b'\]; gradients must be real floating",
    ),
    (
        "grad_fn bool",
        lambda g, p: dict(grad_fn=lambda q, i: jax.tree.map(lambda a: a > 0, q)),
        TypeError,
        "has dtype bool",
    ),
    (
        "updates wrong shape",
        lambda g, p: dict(updates={"w": g["w"][:1], "b": g["b"]}),
        ValueError,
        r"updates \(g0\) has shape \(1, \d\) at params\['w'\]",
    ),
    (
        "updates integer",
        lambda g, p: dict(updates=_int(g)),
        TypeError,
        r"updates \(g0\) has dtype int32 at params\['b'\]",
    ),
    (
        "params integer",
        lambda g, p: dict(params={"w": p["w"], "b": jnp.zeros(4, jnp.int32)}),
        TypeError,
        r"params\['b'\] has dtype int32.*Cast it",
    ),
    (
        "optax state",
        lambda g, p: dict(state=optax.sgd(0.1).init(p)),
        TypeError,
        r"\.update: state must be the .*State returned by .*init\(params\), got tuple",
    ),
]


@pytest.mark.parametrize("transformation", list(FAMILY))
@pytest.mark.parametrize(
    ("case", "change", "error", "message"), UPDATE_CASES, ids=[c[0] for c in UPDATE_CASES]
)
def test_bad_update_inputs_fail_at_trace_time(
    sharded_problem, transformation, case, change, error, message
):
    del case
    x, y, params = sharded_problem  # 4 classes, 6 features: w is not square
    loss_fn = lambda p: softmax_loss(p, x, y)
    tx = FAMILY[transformation].factory()
    grads = jax.grad(loss_fn)(params)
    args = dict(updates=grads, state=tx.init(params), params=params, loss_fn=loss_fn)
    args.update(change(grads, params))
    if "grad_fn" in args:
        del args["loss_fn"]
    run = lambda u, s, p: tx.update(u, s, p, **{k: v for k, v in args.items() if k.endswith("_fn")})
    with pytest.raises(error, match=f"{transformation}.*{message}"):
        jax.jit(run)(args["updates"], args["state"], args["params"])


@pytest.mark.parametrize("transformation", list(FAMILY))
def test_an_integer_loss_is_refused_by_name(sharded_problem, transformation):
    """A loss_fn returning an integer (a count of correct predictions, say) has no gradient."""
    x, y, params = sharded_problem
    tx = FAMILY[transformation].factory()
    grads = jax.grad(lambda p: softmax_loss(p, x, y))(params)
    count = lambda p: jnp.sum(jnp.argmax(x @ p["w"] + p["b"], axis=-1) == y, dtype=jnp.int32)
    message = f"{transformation}: loss_fn must return a floating-point scalar, got int32"
    with pytest.raises(TypeError, match=re.escape(message)):
        jax.jit(lambda p: tx.update(grads, tx.init(p), p, loss_fn=count))(params)


@pytest.mark.parametrize("transformation", list(FAMILY))
@pytest.mark.parametrize(
    ("argument", "value", "kind"), [("loss_fn", 3.0, "float"), ("grad_fn", "g", "str")]
)
def test_a_loss_or_gradient_that_is_no_function_is_named(
    sharded_problem, transformation, argument, value, kind
):
    x, y, params = sharded_problem
    tx = FAMILY[transformation].factory()
    grads = jax.grad(lambda p: softmax_loss(p, x, y))(params)
    message = re.escape(f"{transformation}: {argument} must be a function of") + f".*got {kind} "
    with pytest.raises(TypeError, match=message):
        tx.update(grads, tx.init(params), params, **{argument: value})


def test_the_step_count_state_is_one_class_under_its_old_names():
    assert gam_optax.SAMState is gam_optax.GAMState is gam_optax.PerturbationState
    assert gam_optax.GAMPenaltyState is gam_optax.PerturbationState


@pytest.mark.parametrize("transformation", list(FAMILY))
def test_a_count_state_serves_every_perturbation_and_a_foreign_one_is_named(
    f32_problem, transformation
):
    x, y, params = f32_problem
    loss_fn = lambda p: softmax_loss(p, x, y)
    tx = FAMILY[transformation].factory()
    grads = jax.grad(loss_fn)(params)
    own = tx.update(grads, tx.init(params), params, loss_fn=loss_fn)
    other = "sam" if transformation != "sam" else "gam"
    shared = tx.update(grads, FAMILY[other].factory().init(params), params, loss_fn=loss_fn)
    assert jax.tree.structure(shared) == jax.tree.structure(own)
    for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(own), strict=True):
        np.testing.assert_array_equal(a, b)
    adam = optax.adam(0.1).init(params)
    message = f"{transformation}.update: state must be the PerturbationState returned by "
    with pytest.raises(TypeError, match=re.escape(message) + ".*got tuple"):
        tx.update(grads, adam, params, loss_fn=loss_fn)
