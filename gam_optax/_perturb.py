"""The shared pieces of the sharpness-aware family.

Every transformation in this package is a variation on one idea: move the
parameters a small distance along a normalised direction, evaluate the gradient
there, and combine the gradients. This module holds those pieces:

* :func:`global_norm`, :func:`unit`: one L2 norm over the whole pytree and
  ``v / (||v|| + eps)``;
* :func:`ascent_step`: the perturbation ``r * unit(v)`` or its adaptive
  (ASAM-style) form ``r * v * theta^2 / (||v * |theta| || + eps)``;
* :func:`orthogonal_part`: the part of a vector orthogonal to another (GSAM, GAM);
* :class:`GradientOracle`: the gradient at a perturbed point, from the caller's
  ``loss_fn`` or ``grad_fn``, finite (a new gradient) or exact (a Hessian-vector
  product), with the data-parallel reductions over ``axis_name``;
* :func:`perturbed_gradient`: ``g(theta + e)`` after one ascent step, the
  gradient SAM descends (and GAM's ``g1``, ``g3``); :func:`cast_like`;
* the input checks every entry point shares (:func:`check_number`,
  :func:`check_bool`, :func:`check_axis_bound`, :func:`check_state`,
  :func:`check_like_params`...): one error that names the function and the
  argument, says what was given and what to pass instead.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import types
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gam_optax import _compat

Params = Any
Average = Literal["direction", "gradients"]
AVERAGE_MODES = ("direction", "gradients")


# ----------------------------------------------------------------------------
# Tree maths. Norms and inner products are accumulated in at least float32, so
# that bfloat16 parameters do not lose the perturbation's length.
# ----------------------------------------------------------------------------


def _upcast(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def global_norm(tree: Params) -> jax.Array:
    """``||v||``: one L2 norm over every leaf of the pytree (never per leaf)."""
    return optax.tree.norm(jax.tree.map(_upcast, tree))


def vdot(a: Params, b: Params) -> jax.Array:
    """``<a, b>`` summed over every leaf, in at least float32."""
    return optax.tree.vdot(jax.tree.map(_upcast, a), jax.tree.map(_upcast, b))


def _safe_inverse(norm: jax.Array, eps: jax.Array | float) -> jax.Array:
    """``1 / (norm + eps)``, and 0 where ``norm == 0`` (a zero vector stays zero)."""
    norm_or_one = jnp.where(norm > 0, norm, 1.0)
    return jnp.where(norm > 0, 1.0 / (norm_or_one + eps), 0.0)


def scale(tree: Params, factor: jax.Array | float) -> Params:
    """``factor * tree``, keeping every leaf's dtype."""
    return jax.tree.map(lambda x: (factor * _upcast(x)).astype(x.dtype), tree)


def add_scaled(a: Params, factor: jax.Array | float, b: Params) -> Params:
    """``a + factor * b``, in the dtypes of ``a``."""
    return jax.tree.map(lambda x, y: (_upcast(x) + factor * _upcast(y)).astype(x.dtype), a, b)


def combine(wa: jax.Array | float, a: Params, wb: jax.Array | float, b: Params) -> Params:
    """``wa * a + wb * b``, in the dtypes of ``a``."""
    return jax.tree.map(lambda x, y: (wa * _upcast(x) + wb * _upcast(y)).astype(x.dtype), a, b)


def unit(tree: Params, eps: jax.Array | float) -> Params:
    """``v / (||v|| + eps)``; a zero vector gives zeros (never NaN, even at eps=0)."""
    return scale(tree, _safe_inverse(global_norm(tree), eps))


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
                f"got {_describe(flag)}. Build it from the params' structure, e.g. "
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


def select(tree: Params, mask: Params | None) -> Params:
    """``tree`` with the leaves outside ``mask`` set to zero."""
    if mask is None:
        return tree
    return jax.tree.map(lambda v, keep: v if keep else jnp.zeros_like(v), tree, mask)


def ascent_step(
    direction: Params,
    at: Params,
    radius: jax.Array | float,
    *,
    eps: jax.Array | float,
    adaptive: bool = False,
    mask: Params | None = None,
) -> Params:
    r"""The perturbation ``e`` of length ``radius`` along ``direction``, taken at ``at``.

    .. math::
      e = r \frac{v}{\|v\| + \xi}
      \qquad\text{or, adaptive:}\qquad
      e = r \frac{v \odot \theta_c^2}{\|v \odot |\theta_c|\| + \xi}

    Args:
      direction: ``v``, a pytree like the parameters.
      at: ``theta_c``, the point the step starts from (used only when adaptive).
      radius: ``r``.
      eps: ``xi``.
      adaptive: the ASAM-style step, scaled element-wise by the parameters.
      mask: a tree of bools like ``at`` (:func:`resolve_mask`): the step moves the selected
        leaves only, and its length is measured on them.

    Returns:
      ``e``, in the dtypes of ``at``.
    """
    direction = select(direction, mask)
    if not adaptive:
        inverse = _safe_inverse(global_norm(direction), eps)
        return jax.tree.map(
            lambda v, p: (radius * inverse * _upcast(v)).astype(p.dtype), direction, at
        )
    weighted = jax.tree.map(lambda v, p: _upcast(v) * jnp.abs(_upcast(p)), direction, at)
    inverse = _safe_inverse(global_norm(weighted), eps)
    return jax.tree.map(
        lambda v, p: (radius * inverse * _upcast(v) * jnp.square(_upcast(p))).astype(p.dtype),
        direction,
        at,
    )


def orthogonal_part(v: Params, u: Params, eps: jax.Array | float) -> Params:
    r"""The part of ``v`` orthogonal to ``u`` (GSAM's and GAM's decomposition).

    .. math::
      \cos = \frac{\langle v, u\rangle}{\|u\|\,\|v\| + \xi},\qquad
      v_\perp = v - \cos\,\|v\|\,\frac{u}{\|u\| + \xi}

    Zero vectors give a finite result.
    """
    norm_u, norm_v = global_norm(u), global_norm(v)
    denominator = norm_u * norm_v
    cos = vdot(v, u) * _safe_inverse(denominator, eps)
    return add_scaled(v, -cos * norm_v * _safe_inverse(norm_u, eps), u)


def cast_like(tree: Params, like: Params) -> Params:
    """Each leaf of ``tree`` in the dtype of the matching leaf of ``like``."""
    return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


# ----------------------------------------------------------------------------
# Validation. Hyperparameters are checked at construction where they are
# concrete; traced values (inside optax.inject_hyperparams under jax.jit) cannot
# be, and are not. Gradients, params, states and axis names are checked when
# update is traced (their shapes and dtypes are static then).
# ----------------------------------------------------------------------------


# Schedules are probed at step 0 and on this geometric grid of later steps: a
# schedule that turns negative (or NaN) only between grid points is not caught.
SCHEDULE_PROBE_STEPS = (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)


def _describe(value: Any) -> str:
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
            f"{transformation}: {name} must be a real number, got {_describe(value)}. {remedy}"
        )
    try:
        array = np.asarray(value)
    except Exception:
        if isinstance(value, jax.Array):  # e.g. not addressable from this process
            return None
        raise TypeError(
            f"{transformation}: {name} must be a real number, got {_describe(value)}. {remedy}"
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
) -> None:
    """Check a number-typed hyperparameter, or a schedule of one, where it is concrete.

    Accepted: Python ints and floats, NumPy and JAX real scalars and 0-d arrays,
    and (with ``schedule``) callables of the step count. Rejected with a message
    that names the transformation and the argument: bools, strings, None,
    complex numbers, arrays of other shapes, NaN and infinities, and values
    below ``minimum`` (with ``strict``: not above it). A schedule is probed at
    :data:`SCHEDULE_PROBE_STEPS` (step 0 and a geometric grid up to 10^7), so one
    that goes negative later is caught if it is negative at a grid point. Tracers (values inside
    ``optax.inject_hyperparams`` under ``jax.jit``) cannot be checked and are not.

    Raises:
      TypeError: a value of the wrong type.
      ValueError: a value out of range, or an array of the wrong shape.
    """
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
                f"({_describe(value)}). Pass a number; to vary it during training, wrap the "
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
        return
    number = _scalar(name, value, transformation, remedy)
    if number is not None:
        _check_range(name, number, transformation, minimum, remedy, strict)


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
            f"{_describe(value)}. With optax.inject_hyperparams, list it in static_args: "
            f"optax.inject_hyperparams({transformation}, static_args=({name!r},))(...)."
        )


def check_choice(
    name: str, value: Any, choices: tuple[str, ...], transformation: str, hint: str = ""
) -> None:
    """Raise ValueError unless ``value`` is one of the strings ``choices``."""
    if not (isinstance(value, str) and value in choices):
        raise ValueError(
            f"{transformation}: {name} must be one of {choices}, got {_describe(value)}.{hint}"
        )


def check_axis_name(axis_name: Any, transformation: str) -> None:
    """At construction: ``axis_name`` is None or a string."""
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(
            f"{transformation}: axis_name must be a string naming the data-parallel axis of "
            f"jax.pmap / jax.shard_map (e.g. axis_name='batch'), or None, got "
            f"{_describe(axis_name)}."
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


def check_state(state: Any, state_type: type, transformation: str) -> None:
    """Raise TypeError unless ``state`` is this transformation's state type."""
    if not isinstance(state, state_type):
        raise TypeError(
            f"{transformation}.update: state must be the {state_type.__name__} returned by "
            f"{transformation}(...).init(params), got {type(state).__name__} (the state of "
            "another transformation?). Initialise the state with the same transformation "
            "that updates it."
        )


def _leaf_paths(tree: Params) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree.leaves_with_path(tree)]


def check_float_params(params: Params, transformation: str) -> None:
    """Raise TypeError if a leaf of ``params`` is not a real floating-point array."""
    for path, leaf in zip(_leaf_paths(params), jax.tree.leaves(params), strict=True):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{transformation}: params{path} has dtype {dtype}; the parameters are perturbed "
                "and differentiated, so every leaf must be a real floating-point array. Cast "
                "it (e.g. params = jax.tree.map(lambda x: x.astype(jnp.float32), params)) or "
                "keep integer leaves out of the parameters."
            )


def check_like_params(tree: Params, params: Params, what: str, transformation: str) -> None:
    """``tree`` (a gradient) matches ``params`` leaf by leaf: structure, shape, float dtype."""
    check_same_structure(tree, params, what, transformation)
    for path, leaf, param in zip(
        _leaf_paths(params), jax.tree.leaves(tree), jax.tree.leaves(params), strict=True
    ):
        if jnp.shape(leaf) != jnp.shape(param):
            raise ValueError(
                f"{transformation}: {what} has shape {jnp.shape(leaf)} at params{path}, where "
                f"params{path} has shape {jnp.shape(param)}. Pass the gradient with respect "
                "to these params, e.g. jax.grad(loss)(params)."
            )
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{transformation}: {what} has dtype {dtype} at params{path}; gradients must be "
                "real floating point. Pass jax.grad of a floating-point loss with respect to "
                "floating-point params."
            )


def check_average(average: Any, transformation: str) -> None:
    if not (isinstance(average, str) and average in AVERAGE_MODES):
        raise ValueError(
            f"{transformation}: average must be one of {AVERAGE_MODES}, got {_describe(average)}. "
            "'direction' (default, the released code's behaviour) perturbs each device with "
            "its own gradients and averages only the final direction; 'gradients' averages "
            "every gradient over axis_name (exact large-batch training)."
        )


def check_common(
    transformation: str,
    *,
    eps: Any,
    has_aux: Any,
    axis_name: Any,
    average: Any,
    **flags: Any,
) -> None:
    """The checks every transformation shares: ``eps``, the flags, ``axis_name``, ``average``."""
    check_nonnegative("eps", eps, transformation)
    for flag, value in {"has_aux": has_aux, **flags}.items():
        check_bool(flag, value, transformation)
    check_axis_name(axis_name, transformation)
    check_average(average, transformation)


def value_at(hyperparameter: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """A hyperparameter's value at step ``count``: ``v(count) if callable(v) else v``."""
    return hyperparameter(count) if callable(hyperparameter) else hyperparameter


# ----------------------------------------------------------------------------
# The gradient oracle: where the extra gradients come from.
# ----------------------------------------------------------------------------


def _is_varying(x: Any, axis_name: str) -> bool:
    return axis_name in _compat.varying_axes(x)


def _vma_checked(axis_name: str) -> bool:
    """True inside ``jax.shard_map(..., check_vma=True)`` over ``axis_name``."""
    return _compat.vma_checked(axis_name)


def _to_varying(tree: Params, axis_name: str) -> Params:
    """Mark replicated leaves as per-device, so jax.grad does not sum them over devices."""
    return jax.tree.map(
        lambda x: x if _is_varying(x, axis_name) else _compat.to_varying(x, axis_name),
        tree,
    )


def _checked_scalar_loss(loss_fn: Callable, has_aux: bool, transformation: str) -> Callable:
    """``params -> scalar loss``, with a clear error for a wrong return value."""

    def scalar_loss(params):
        out = loss_fn(params)
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"{transformation}: has_aux=True, so loss_fn must return a pair "
                    f"(loss, aux); it returned {type(out).__name__}."
                )
            out = out[0]
        elif isinstance(out, (tuple, list)):
            raise TypeError(
                f"{transformation}: loss_fn returned a {type(out).__name__} of length {len(out)}. "
                f"If it returns (loss, aux), construct the transformation with has_aux=True."
            )
        if jnp.ndim(out) != 0:
            raise ValueError(
                f"{transformation}: loss_fn must return a scalar loss, got shape {jnp.shape(out)}. "
                "Reduce it, e.g. with .mean() over the batch."
            )
        if not jnp.issubdtype(jnp.result_type(out), jnp.floating):
            raise TypeError(
                f"{transformation}: loss_fn must return a floating-point scalar, "
                f"got {jnp.result_type(out)}."
            )
        return out

    return scalar_loss


def check_same_structure(tree: Params, params: Params, what: str, transformation: str) -> None:
    if jax.tree.structure(tree) != jax.tree.structure(params):  # type: ignore[operator]
        raise ValueError(
            f"{transformation}: {what} must have the same tree structure as params.\n"
            f"  {what}: {jax.tree.structure(tree)}\n  params: {jax.tree.structure(params)}"
        )


@dataclasses.dataclass(frozen=True)
class GradientOracle:
    """Gradients at perturbed points, for one call of a transformation's ``update``.

    Attributes:
      gradient: ``(params, i) -> grads``, the caller's ``grad_fn`` or ``jax.grad`` of
        its ``loss_fn``; ``i`` numbers the extra evaluation (1, 2, 3...).
      axis_name: the data-parallel axis, or None.
      average: 'direction' or 'gradients' (see :func:`make_oracle`).
      exact: replace ``g(theta + e)`` by its first-order Taylor expansion
        ``g(theta) + H(theta) e``, computed exactly by forward-over-reverse.
      transformation: the calling transformation's name, for error messages.
    """

    gradient: Callable[[Params, int | jax.Array], Params]  # i is traced under unroll=False
    axis_name: str | None
    average: Average
    exact: bool
    transformation: str

    def _reduce(self, grads: Params) -> Params:
        if self.axis_name is not None and self.average == "gradients":
            return jax.lax.pmean(grads, self.axis_name)
        return grads

    def _local(self, params: Params) -> Params:
        if self.axis_name is not None and _vma_checked(self.axis_name):
            return _to_varying(params, self.axis_name)
        return params

    def at(self, params: Params, i: int) -> Params:
        """``g(params)``: a new gradient evaluation."""
        return self._reduce(self.gradient(self._local(params), i))

    def after_step(self, params: Params, grads: Params, step: Params, i: int) -> Params:
        """``g(params + step)``, given ``grads = g(params)``.

        Finite mode evaluates the gradient at the moved point; exact mode returns
        ``grads + H(params) step`` with one Hessian-vector product.
        """
        if not self.exact:
            return self.at(jax.tree.map(jnp.add, params, step), i)
        _, hessian_step = jax.jvp(
            lambda p: self.gradient(p, i), (self._local(params),), (self._local(step),)
        )
        return jax.tree.map(jnp.add, grads, self._reduce(hessian_step))

    def gradient_and_hessian_product(
        self, params: Params, step: Params, i: int | jax.Array
    ) -> tuple[Params, Params]:
        """``(g(params), H(params) step)``, both reduced: one forward-over-reverse pass.

        :meth:`after_step`'s exact mode is ``grads + (the second)``; the first is the
        gradient at ``params`` that the same pass computes.
        """
        grads, hessian_step = jax.jvp(
            lambda p: self.gradient(p, i), (self._local(params),), (self._local(step),)
        )
        return self._reduce(grads), self._reduce(hessian_step)

    def hessian_product(self, params: Params, vector: Params, i: int) -> Params:
        """``H(params) vector``: one exact Hessian-vector product (forward-over-reverse).

        Reduced over ``axis_name`` in 'gradients' mode, like every gradient.
        """
        _, product = jax.jvp(
            lambda p: self.gradient(p, i),
            (self._local(params),),
            (self._local(cast_like(vector, params)),),
        )
        return self._reduce(product)

    def incoming(self, updates: Params, params: Params) -> Params:
        """The caller's ``g0``, checked, and averaged in 'gradients' mode."""
        if params is None:
            raise ValueError(
                f"{self.transformation}: update needs params, the point g0 was computed at: "
                "tx.update(grads, state, params, loss_fn=loss_fn)."
            )
        masked = lambda x: isinstance(x, optax.MaskedNode)
        if any(map(masked, jax.tree.leaves((updates, params), is_leaf=masked))):
            raise TypeError(
                f"{self.transformation}: the updates hold optax.MaskedNode leaves: it runs inside "
                f"optax.masked or optax.partition, whose hidden parameters loss_fn cannot be "
                f"evaluated without. Put {self.transformation} outside them (first in the "
                f"chain) and pass {self.transformation}(..., mask=...) to perturb only some "
                "parameters; the gradients stay those of all of them."
            )
        check_float_params(params, self.transformation)
        check_like_params(updates, params, "updates (g0)", self.transformation)
        if self.axis_name is not None and _vma_checked(self.axis_name):
            leaves = jax.tree.leaves(updates)
            if leaves and not all(_is_varying(g, self.axis_name) for g in leaves):
                raise ValueError(
                    f"{self.transformation}: inside jax.shard_map (check_vma=True) the incoming "
                    f"gradient does not vary over axis {self.axis_name!r}. jax.grad of a "
                    "per-device loss with respect to replicated params is ALREADY SUMMED over "
                    "devices there (N times the mean). Pass the per-device gradient instead: "
                    f"jax.grad(loss)({_compat.to_varying_spelling(self.axis_name)}); "
                    f"{self.transformation} averages it."
                )
        return self._reduce(updates)

    def finish(self, direction: Params) -> Params:
        """Average the final direction over devices in 'direction' mode."""
        if self.axis_name is not None and self.average == "direction":
            return jax.lax.pmean(direction, self.axis_name)
        return direction


def _flax_caller() -> str | None:
    """Which Flax training API called ``tx.update`` ('linen', 'nnx'), if one did."""
    callers = {
        ("apply_gradients", "flax/training/train_state.py"): "linen",
        ("update", "flax/nnx/training/optimizer.py"): "nnx",
    }
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        path = code.co_filename.replace("\\", "/")
        for (function, suffix), api in callers.items():
            if code.co_name == function and path.endswith(suffix):
                return api
        frame = frame.f_back
    return None


def missing_loss_fn_message(transformation: str, *, both: bool = False) -> str:
    """The error for an ``update`` given neither (or both) of ``loss_fn`` and ``grad_fn``.

    It names the fix for the loops that cannot pass ``loss_fn``, Flax's stock
    ``TrainState`` first: its ``apply_gradients`` calls ``tx.update(grads, opt_state,
    params)`` and drops a ``loss_fn=`` keyword.
    """
    given = "both" if both else "neither"
    lines = [
        f"{transformation} evaluates extra gradients, so update needs exactly one of "
        f"loss_fn or grad_fn; {given} was given."
    ]
    flax_linen = (
        "gam_optax.flax.TrainState.create(...) in place of Flax's TrainState (the same class, "
        "whose apply_gradients forwards it: state.apply_gradients(grads=grads, "
        "loss_fn=loss_fn))"
    )
    flax_nnx = "optimizer.update(model, grads, loss_fn=gam_optax.flax.nnx_loss_fn(model, loss))"
    caller = None if both else _flax_caller()
    if caller == "linen":
        lines.append(
            "It was called by Flax's flax.training.train_state.TrainState.apply_gradients, "
            "which calls tx.update(grads, opt_state, params) and drops loss_fn. Use "
            f"{flax_linen}, or Flax NNX: {flax_nnx}."
        )
    elif caller == "nnx":
        lines.append(
            "It was called by nnx.Optimizer.update, which forwards keyword arguments to "
            f"tx.update: pass the loss there, taken before your own pass: {flax_nnx}."
        )
    else:
        lines += [
            "Pass the loss as a function of the params, closed over the batch:",
            "  updates, state = tx.update(grads, state, params,",
            "                             loss_fn=lambda p: loss(p, batch))",
            "or a gradient function grad_fn(params, i) -> grads.",
            f"With Flax Linen: {flax_linen}; Flax's own TrainState drops loss_fn. "
            f"With Flax NNX: {flax_nnx}.",
        ]
    if not both:
        alternative = {
            "gam": "gam_optax.transparent_gam(optimizer, ...), which takes one gradient per "
            "update call (four calls per GAM step)",
            "sam": "optax.contrib.sam(optimizer, adv_optimizer), whose default mode takes one "
            "gradient per update call",
        }.get(transformation)
        if alternative is not None:
            lines.append(f"A loop that cannot pass loss_fn at all: {alternative}.")
    return "\n".join(lines)


def make_oracle(
    transformation: str,
    *,
    loss_fn: Callable | None,
    grad_fn: Callable | None,
    has_aux: bool,
    axis_name: str | None,
    average: Average,
    exact: bool = False,
) -> GradientOracle:
    """Build the oracle from the extra arguments of ``update``.

    Exactly one of ``loss_fn(params) -> loss`` (or ``(loss, aux)`` with
    ``has_aux``) and ``grad_fn(params, i) -> grads`` (the convention of
    ``optax.contrib.sam``) must be given.
    """
    if (loss_fn is None) == (grad_fn is None):
        raise ValueError(missing_loss_fn_message(transformation, both=loss_fn is not None))
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(
                f"{transformation}: loss_fn must be callable, got {type(loss_fn).__name__}."
            )
        grad_of_loss = jax.grad(_checked_scalar_loss(loss_fn, has_aux, transformation))
        gradient = lambda params, i: grad_of_loss(params)
    else:
        if not callable(grad_fn):
            raise TypeError(
                f"{transformation}: grad_fn must be callable, got {type(grad_fn).__name__}."
            )

        def gradient(params, i):
            grads = grad_fn(params, i)
            check_like_params(grads, params, f"grad_fn(params, {i})", transformation)
            return grads

    check_axis_bound(axis_name, transformation)
    return GradientOracle(gradient, axis_name, average, exact, transformation)


def perturbed_gradient(
    oracle: GradientOracle,
    params: Params,
    grads: Params,
    radius: jax.Array | float,
    *,
    eps: jax.Array | float,
    adaptive: bool,
    i: int,
    mask: Params | None = None,
) -> Params:
    r"""The gradient after one ascent step along ``grads``: SAM's gradient.

    .. math::
      g(\theta + e), \qquad e = \mathrm{ascent\_step}(g(\theta), \theta, r)

    Args:
      oracle: where the gradient comes from (finite or exact, reductions).
      params: ``theta``.
      grads: ``g(theta)``.
      radius: ``r``.
      eps: ``xi``.
      adaptive: the ASAM-style step (see :func:`ascent_step`).
      i: the number of this extra evaluation, passed to ``grad_fn``.
      mask: the leaves the step may move (:func:`resolve_mask`); None: all.

    Returns:
      ``g(theta + e)`` (exact mode: ``g(theta) + H(theta) e``).
    """
    step = ascent_step(grads, params, radius, eps=eps, adaptive=adaptive, mask=mask)
    return oracle.after_step(params, grads, step, i)
