"""The input checks every entry point shares: one error that names the function and the
argument, says what was given and what to pass instead.

Hyperparameters are checked at construction where they are concrete; traced values (inside
``optax.inject_hyperparams`` under ``jax.jit``) cannot be, and are not. Gradients, params,
states, masks and axis names are checked when ``update`` is traced (their shapes and dtypes
are static then).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gam_optax import _compat
from gam_optax._tree_math import Params

Average = Literal["direction", "gradients"]
AVERAGE_MODES = ("direction", "gradients")


# Schedules are probed at step 0 and on this geometric grid of later steps: a
# schedule that turns negative (or NaN) only between grid points is not caught.
SCHEDULE_PROBE_STEPS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)


def describe(value: Any) -> str:
    """``value`` for an error message: its type, and its repr when short."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _scalar(name: str, value: Any, transformation: str, remedy: str) -> float | None:
    """A Python float for a concrete real scalar; None for a tracer; else a clear error."""
    if _is_traced(value):
        return None  # inside optax.inject_hyperparams or jit: checked by nobody, as documented
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{transformation}: {name} must be a real number, got the bool {value!r}. {remedy}"
        )
    if isinstance(value, numbers.Real):
        return float(value)
    if value is None or isinstance(value, (str, bytes, numbers.Complex)):
        raise TypeError(
            f"{transformation}: {name} must be a real number, got {describe(value)}. {remedy}"
        )
    try:
        array = np.asarray(value)
    except Exception:
        if isinstance(value, jax.Array):  # e.g. not addressable from this process
            return None
        raise TypeError(
            f"{transformation}: {name} must be a real number, got {describe(value)}. {remedy}"
        ) from None
    if array.dtype == bool or not (  # jnp's issubdtype also knows bfloat16
        jnp.issubdtype(array.dtype, jnp.integer) or jnp.issubdtype(array.dtype, jnp.floating)
    ):
        raise TypeError(
            f"{transformation}: {name} must be a real number, got {type(value).__name__} of "
            f"dtype {array.dtype}. {remedy}"
        )
    if array.shape != ():
        raise ValueError(
            f"{transformation}: {name} must be a scalar, got an array of shape {array.shape}. "
            f"{remedy}"
        )
    return float(array)


def check_number(
    name: str,
    value: Any,
    transformation: str,
    *,
    minimum: float | None = None,
    schedule: bool = False,
    strict: bool = False,
    maximum: float | None = None,
) -> None:
    """Check a real scalar hyperparameter (or, with ``schedule``, a schedule of one, probed
    at :data:`SCHEDULE_PROBE_STEPS`) where it is concrete: TypeError for bools, strings,
    None, complex numbers; ValueError for other shapes, NaN, infinities and values below
    ``minimum`` (``strict``: not above it) or above ``maximum``. Tracers
    (``optax.inject_hyperparams`` under ``jax.jit``) cannot be checked and are not."""
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    example = "0.05" if minimum is not None else "0.5"
    remedy = f"Pass a finite Python float{bound}, e.g. {name}={example}" + (
        ", a 0-d array, or an optax schedule of the step count."
        if schedule
        else ", or a 0-d array."
    )
    if callable(value):
        if not schedule:
            raise TypeError(
                f"{transformation}: {name} must be a number, not a schedule "
                f"({describe(value)}). Pass a number; to vary it during training, wrap the "
                f"transformation in optax.inject_hyperparams and give the schedule there."
            )
        for step in SCHEDULE_PROBE_STEPS:
            try:
                out = value(jnp.asarray(step, jnp.int32))
            except Exception as error:
                raise TypeError(
                    f"{transformation}: the {name} schedule failed when called with the step "
                    f"count {step} (an int32 array): {type(error).__name__}: {error}. A schedule "
                    "maps the step count to a number, e.g. optax.linear_schedule(0.1, 0.0, 1000)."
                ) from error
            at = f"the {name} schedule at step {step}"
            number = _scalar(at, out, transformation, remedy)
            if number is not None:
                _check_range(at, number, transformation, minimum, remedy, strict, probed=True)
                _check_maximum(at, number, transformation, maximum, name)
        return
    number = _scalar(name, value, transformation, remedy)
    if number is not None:
        _check_range(name, number, transformation, minimum, remedy, strict)
        _check_maximum(name, number, transformation, maximum)


def _check_range(
    name: str,
    number: float,
    transformation: str,
    minimum: float | None,
    remedy: str,
    strict: bool = False,
    probed: bool = False,
) -> None:
    grid = " (schedules are probed at step 0 and at steps 1, 10, 100, ..., 10^7)" if probed else ""
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    below = minimum is not None and (number <= minimum if strict else number < minimum)
    if not math.isfinite(number) or below:
        raise ValueError(
            f"{transformation}: {name} must be a finite number{bound}, got {number}{grid}. {remedy}"
        )


def _check_maximum(
    name: str, number: float, transformation: str, maximum: float | None, arg: str = ""
) -> None:
    if maximum is not None and number > maximum:
        raise ValueError(
            f"{transformation}: {name} = {number:g} is above {maximum:g}, the longest radius "
            "accepted: a radius is a length in parameter space (the published ones are "
            "0.01-2), and one this long sends the perturbed point so far that its gradients "
            f"can overflow into NaN updates. Pass a radius <= {maximum:g}, e.g. {arg or name}=0.05."
        )


# The longest ascent radius accepted (rho, rho_prime, sam_rho, hvp_step): 100 is 50 times
# the largest published one, and a length comparable to a whole network's weight norm.
MAX_RADIUS = 100.0


def check_radius(name: str, value: Any, transformation: str, *, strict: bool = False) -> None:
    """:func:`check_number` for an ascent radius (or its schedule): in [0, MAX_RADIUS]
    (``strict``: above 0)."""
    check_number(
        name, value, transformation, minimum=0.0, schedule=True, strict=strict, maximum=MAX_RADIUS
    )


def check_finite(name: str, value: Any, transformation: str, *, schedule: bool = False) -> None:
    """:func:`check_number` for a real number of any sign."""
    check_number(name, value, transformation, schedule=schedule)


def check_nonnegative(
    name: str, value: Any, transformation: str, *, schedule: bool = False
) -> None:
    """:func:`check_number` for a number (or schedule, if allowed) that must be >= 0."""
    check_number(name, value, transformation, minimum=0.0, schedule=schedule)


def check_positive(name: str, value: Any, transformation: str, *, schedule: bool = False) -> None:
    """:func:`check_number` for a number (or schedule, if allowed) that must be > 0."""
    check_number(name, value, transformation, minimum=0.0, schedule=schedule, strict=True)


def check_bool(name: str, value: Any, transformation: str) -> None:
    """Raise TypeError unless ``value`` is a Python (or NumPy) bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"{transformation}: {name} must be a Python bool (True or False), got "
            f"{describe(value)}. With optax.inject_hyperparams, list it in static_args: "
            f"optax.inject_hyperparams({transformation}, static_args=({name!r},))(...)."
        )


def check_transformation(name: str, value: Any, transformation: str, example: str = "") -> None:
    """Raise TypeError unless ``value`` has callable ``init`` and ``update`` (optax's kind)."""
    if not (callable(getattr(value, "init", None)) and callable(getattr(value, "update", None))):
        raise TypeError(
            f"{transformation}: {name} must be an optax GradientTransformation{example}, got "
            f"{describe(value)}."
        )


def check_choice(
    name: str, value: Any, choices: tuple[str, ...], transformation: str, hint: str = ""
) -> None:
    """Raise ValueError unless ``value`` is one of the strings ``choices``."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(
            f"{transformation}: {name} must be one of {choices}, got {describe(value)}.{hint}"
        )


def check_axis_name(axis_name: Any, transformation: str) -> None:
    """At construction: ``axis_name`` is None or a string."""
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(
            f"{transformation}: axis_name must be a string naming the data-parallel axis of "
            f"jax.pmap / jax.shard_map (e.g. axis_name='batch'), or None, got "
            f"{describe(axis_name)}."
        )


def check_axis_bound(axis_name: str | None, transformation: str) -> None:
    """At trace time: ``axis_name`` is bound by an enclosing pmap / shard_map / vmap."""
    if axis_name is None:
        return
    try:
        _compat.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{transformation}: axis_name={axis_name!r} is not bound here. Call update inside "
            f"jax.pmap(..., axis_name={axis_name!r}) or jax.shard_map over a mesh axis named "
            f"{axis_name!r}; under plain jax.jit (a sharded batch, gradients already global) "
            f"construct {transformation} with axis_name=None."
        ) from None


def check_params_whole(params: Params, axis_name: str | None, transformation: str) -> None:
    """At trace time inside ``jax.shard_map`` (with its varying types): no parameter varies
    over a mesh axis other than ``axis_name``. One that does is split (or differs) across
    devices, and the norms and inner products of the step would be each device's part's."""
    allowed = frozenset() if axis_name is None else frozenset({axis_name})
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        split = _compat.varying_axes(leaf) - allowed
        if split:
            axes = ", ".join(repr(a) for a in sorted(split))
            raise ValueError(
                f"{transformation}: inside jax.shard_map, params{jax.tree_util.keystr(path)} "
                f"varies over the mesh axis {axes}: each device holds a part of it, and the "
                "step's norms and inner products would be that part's, not the whole "
                "gradient's. Give shard_map whole parameters (in_specs P() for them; "
                "axis_name= for the batch's axis), or split the parameters with jax.jit and "
                "NamedSharding instead, where the step's norms are global (docs: Scaling out)."
            )


def check_state(state: Any, state_type: type, transformation: str) -> None:
    """Raise TypeError unless ``state`` is this transformation's state type."""
    if not isinstance(state, state_type):
        raise TypeError(
            f"{transformation}.update: state must be the {state_type.__name__} returned by "
            f"{transformation}(...).init(params), got {type(state).__name__} (the state of "
            "another transformation?). Initialise the state with the same transformation "
            "that updates it."
        )


def check_state_like(state: Any, expected: Any, transformation: str) -> None:
    """``state`` has the leaves, at the same paths and of the same shapes, as ``expected``
    (``jax.eval_shape`` of the transformation's ``init`` on these params)."""
    shapes = lambda tree: {
        jax.tree_util.keystr(path): jnp.shape(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
    got, want = shapes(state), shapes(expected)
    same_structure = jax.tree.structure(state) == jax.tree.structure(expected)  # type: ignore[operator]
    if same_structure and got == want:
        return
    differs = [p for p in want if got.get(p) != want[p]] + [p for p in got if p not in want]
    path = differs[0] if differs else ""  # else: the same leaves in other containers
    found = f"an array of shape {got[path]}" if path in got else "nothing"
    wanted = f"one of shape {want[path]}" if path in want else "nothing"
    where = f"state{path} holds {found} where" if differs else "state's containers differ from"
    raise TypeError(
        f"{transformation}.update: {where} {transformation}(...).init(params) puts "
        f"{wanted if differs else 'them'}: the state of another member, optimizer or model? "
        "Initialise the state with the same transformation that updates it, from these params."
    )


def check_has_params(params: Params, transformation: str) -> None:
    """Raise ValueError if ``params`` hold no array: there would be nothing to perturb."""
    if params is not None and not jax.tree.leaves(params):
        raise ValueError(
            f"{transformation}: params hold no array ({describe(params)}), so there is "
            "nothing to perturb. Pass the model's parameters, e.g. tx.init(params) and "
            "tx.update(grads, state, params, ...) with params = model.init(key, x)."
        )


def _check_float(tree: Params, message: Callable[[str, Any], str]) -> None:
    """Raise TypeError, ``message(path, dtype)``, at a leaf that is not real floating point."""
    for path, leaf in jax.tree.leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(message(jax.tree_util.keystr(path), dtype))


def check_float_params(params: Params, transformation: str) -> None:
    """Raise TypeError if a leaf of ``params`` is not a real floating-point array."""
    _check_float(
        params,
        lambda at, dtype: (
            f"{transformation}: params{at} has dtype {dtype}; the parameters are perturbed "
            "and differentiated, so every leaf must be a real floating-point array. Cast "
            "it (e.g. params = jax.tree.map(lambda x: x.astype(jnp.float32), params)) or "
            "keep integer leaves out of the parameters."
        ),
    )


def check_like_params(tree: Params, params: Params, what: str, transformation: str) -> None:
    """``tree`` (a gradient) matches ``params`` leaf by leaf: structure, shape, float dtype."""
    if jax.tree.structure(tree) != jax.tree.structure(params):  # type: ignore[operator]
        raise ValueError(
            f"{transformation}: {what} must have the same tree structure as params.\n"
            f"  {what}: {jax.tree.structure(tree)}\n  params: {jax.tree.structure(params)}"
        )
    for (path, leaf), param in zip(
        jax.tree.leaves_with_path(tree), jax.tree.leaves(params), strict=True
    ):
        if jnp.shape(leaf) != jnp.shape(param):
            at = jax.tree_util.keystr(path)
            raise ValueError(
                f"{transformation}: {what} has shape {jnp.shape(leaf)} at params{at}, where "
                f"params{at} has shape {jnp.shape(param)}. Pass the gradient with respect "
                "to these params, e.g. jax.grad(loss)(params)."
            )
    _check_float(
        tree,
        lambda at, dtype: (
            f"{transformation}: {what} has dtype {dtype} at params{at}; gradients must be "
            "real floating point. Pass jax.grad of a floating-point loss with respect to "
            "floating-point params."
        ),
    )


def check_average(average: Any, transformation: str) -> None:
    if not (isinstance(average, str) and average in AVERAGE_MODES):
        raise ValueError(
            f"{transformation}: average must be one of {AVERAGE_MODES}, got {describe(average)}. "
            "'direction' (default, the released code's behaviour) perturbs each device with "
            "its own gradients and averages only the final direction; 'gradients' averages "
            "every gradient over axis_name (exact large-batch training)."
        )


Mask = Any  # a pytree of bools like the params (or a prefix of it), or params -> such a tree


def resolve_mask(mask: Mask | None, params: Params, transformation: str) -> Params | None:
    """``mask=`` as a tree of Python bools with the structure of ``params`` (None: all).

    Like ``optax.masked``: a pytree of bools with the structure of the params or a prefix of
    it (``{"encoder": False, "head": True}``), or a function ``params -> such a tree``.
    """
    if mask is None:
        return None
    tree = mask(params) if callable(mask) else mask

    def broadcast(flag: Any, subtree: Params) -> Params:
        if isinstance(flag, jax.core.Tracer) or not isinstance(flag, (bool, np.bool_)):
            raise TypeError(
                f"{transformation}: mask must hold Python bools (True: perturb this leaf), "
                f"got {describe(flag)}. Build it from the params' structure, e.g. "
                "mask=lambda params: jax.tree.map(lambda x: x.ndim > 1, params)."
            )
        return jax.tree.map(lambda _: bool(flag), subtree)

    try:
        return jax.tree.map(broadcast, tree, params)
    except ValueError as e:
        raise ValueError(
            f"{transformation}: mask must have the tree structure of params (or a prefix of "
            f"it): {e}"
        ) from None


def check_arity(
    fn: Any, what: str, arguments: tuple[str, ...], transformation: str, example: str
) -> None:
    """``fn`` is callable with ``arguments`` alone, positionally (where its signature shows)."""
    takes = " and ".join(arguments)
    if not callable(fn):
        raise TypeError(
            f"{transformation}: {what} must be a function of {takes}, got {describe(fn)}; "
            f"e.g. {what}={example}."
        )
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: its call decides
        return
    try:
        signature.bind(*[None] * len(arguments))
    except TypeError:
        fewer = _accepts(signature, len(arguments) - 1)  # fn takes fewer than it is given
        remedy = (
            f"e.g. {what}={example}" if fewer else f"close over the rest, e.g. {what}={example}"
        )
        raise TypeError(
            f"{transformation}: {what} must take {takes} alone, but its signature is "
            f"{signature}: {remedy}."
        ) from None


def _accepts(signature: inspect.Signature, n: int) -> bool:
    """Whether ``signature`` takes ``n`` positional arguments."""
    try:
        signature.bind(*[None] * n)
    except TypeError:
        return False
    return True


def check_update(
    transformation: str,
    updates: Params,
    state: Any,
    params: Params,
    state_type: type,
    axis_name: str | None = None,
) -> None:
    """The checks of every ``update`` of the family, when it is traced: the state is this
    transformation's, ``params`` are given, real floating point, like the gradient and,
    inside ``jax.shard_map``, whole on each device."""
    check_state(state, state_type, transformation)
    if params is None:
        raise ValueError(
            f"{transformation}: update needs params, the point the gradient was computed "
            "at: tx.update(grads, state, params, ...)."
        )
    check_has_params(params, transformation)
    check_params_whole(params, axis_name, transformation)
    masked = lambda x: isinstance(x, optax.MaskedNode)
    if any(map(masked, jax.tree.leaves((updates, params), is_leaf=masked))):
        raise TypeError(
            f"{transformation}: the updates hold optax.MaskedNode leaves: it runs inside "
            "optax.masked or optax.partition, whose hidden parameters loss_fn cannot be "
            f"evaluated without. Put {transformation} outside them (first in the chain) and "
            f"pass {transformation}(..., mask=...) to perturb only some parameters; the "
            "gradients stay those of all of them."
        )
    check_float_params(params, transformation)
    check_like_params(updates, params, "updates (g0)", transformation)
