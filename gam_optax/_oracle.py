"""Where a perturbation's extra gradients come from.

A :class:`Probe` names a point (and, for an exact Hessian-vector product, a step from it);
the :class:`GradientOracle` evaluates it from the caller's ``loss_fn`` or ``grad_fn`` and
returns an :class:`Evaluation`, with the data-parallel reductions over ``axis_name``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gam_optax import _compat
from gam_optax._tree_math import Params, add, add_scaled
from gam_optax._validation import Average, check_arity, check_axis_bound, check_like_params
from gam_optax._views import LEAF_BY_LEAF, TreeView


class Probe(NamedTuple):
    """Where the next gradient is taken: ``g(point + step)`` (``step`` None: ``g(point)``).

    In the exact mode a probe with a step is linearised, ``g(point) + H(point) step``: one
    forward-over-reverse pass (``jax.jvp`` of the gradient) gives both terms.
    """

    point: Params
    step: Params | None = None


class Evaluation(NamedTuple):
    """The gradient a probe asked for.

    Attributes:
      gradient: ``g(point + step)``, or ``g(point) + H(point) step`` in the exact mode.
      point: where it was taken (the probe's point when it had no step).
      hessian_step: ``H(point) step`` in the exact mode, else None.
    """

    gradient: Params
    point: Params
    hessian_step: Params | None = None

    def change(self, before: Params) -> Params:
        """``g(point + step) - g(point)``, ``before`` being ``g(point)``: a finite
        difference, or exactly ``H(point) step`` in the exact mode."""
        if self.hessian_step is not None:
            return self.hessian_step
        return add_scaled(self.gradient, -1.0, before)


def _to_varying(tree: Params, axis_name: str) -> Params:
    """Mark replicated leaves as per-device, so jax.grad does not sum them over devices."""
    varying = lambda x: axis_name in _compat.varying_axes(x)
    return jax.tree.map(lambda x: x if varying(x) else _compat.to_varying(x, axis_name), tree)


@dataclasses.dataclass(frozen=True)
class Averaging:
    """The data-parallel reductions over ``axis_name`` (none when it is None): every
    gradient (``'gradients'``, :meth:`reduce`) or only the direction (:meth:`finish`)."""

    axis_name: str | None
    average: Average

    def reduce(self, grads: Params) -> Params:
        """Average a gradient over devices in 'gradients' mode."""
        if self.axis_name is not None and self.average == "gradients":
            return jax.lax.pmean(grads, self.axis_name)
        return grads

    def finish(self, direction: Params) -> Params:
        """Average the final direction over devices in 'direction' mode."""
        if self.axis_name is not None and self.average == "direction":
            return jax.lax.pmean(direction, self.axis_name)
        return direction


@dataclasses.dataclass(frozen=True)
class GradientOracle(Averaging):
    """Gradients at the probes of one ``update`` call.

    Attributes:
      gradient: ``(params, i) -> grads``, the caller's ``grad_fn`` or ``jax.grad`` of its
        ``loss_fn``; ``i`` numbers the extra evaluation (1, 2, 3...).
      exact: linearise the probes that have a step (Hessian-vector products).
    """

    gradient: Callable[[Params, int | jax.Array], Params]  # i is traced under unroll=False
    exact: bool
    view: TreeView = LEAF_BY_LEAF  # gradients and steps on one flat vector, or the trees

    def _gradient(self, point: Params, i: int | jax.Array) -> Params:
        return self.view.flat(self.gradient(point, i))

    def _local(self, params: Params) -> Params:
        if self.axis_name is not None and _compat.vma_checked(self.axis_name):
            return _to_varying(params, self.axis_name)
        return params

    def per_device(self, tree: Params) -> Params:
        """``tree`` typed as per-device in 'direction' mode inside ``jax.shard_map``, where
        every value computed from the device's own gradients is: a scan's carry must be so
        from its start."""
        return self._local(tree) if self.average == "direction" else tree

    def evaluate(self, probe: Probe, i: int | jax.Array) -> Evaluation:
        """The gradient ``probe`` asks for; ``i`` numbers it for ``grad_fn``."""
        point, step = probe
        if step is None or not self.exact:
            at = point_of(probe, self.view)
            return Evaluation(self.reduce(self._gradient(self._local(at), i)), at)
        step = self.view.tree(step, point)
        grads, hessian_step = jax.jvp(
            lambda p: self._gradient(p, i), (self._local(point),), (self._local(step),)
        )
        grads, hessian_step = self.reduce(grads), self.reduce(hessian_step)
        return Evaluation(add(grads, hessian_step), point, hessian_step)

    def incoming(self, updates: Params, name: str) -> Params:
        """The caller's ``g0``, averaged in 'gradients' mode."""
        if self.axis_name is not None and _compat.vma_checked(self.axis_name):
            leaves = jax.tree.leaves(updates)
            if leaves and not all(self.axis_name in _compat.varying_axes(g) for g in leaves):
                raise ValueError(
                    f"{name}: inside jax.shard_map (check_vma=True) the incoming gradient does "
                    f"not vary over axis {self.axis_name!r}. jax.grad of a per-device loss with "
                    "respect to replicated params is ALREADY SUMMED over devices there (N "
                    "times the mean). Pass the per-device gradient instead: jax.grad(loss)("
                    f"{_compat.to_varying_spelling(self.axis_name)}); {name} averages it."
                )
        return self.reduce(self.view.flat(updates))


def _returned(out: Any) -> str:
    """What a ``loss_fn`` returned, for an error message: a pair, a list, an array..."""
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of length {len(out)}"
    if hasattr(out, "shape") and hasattr(out, "dtype"):
        return f"one array ({jnp.result_type(out)}{list(jnp.shape(out))})"
    return type(out).__name__


def scalar_loss_of(out: Any, has_aux: bool | None, name: str) -> Any:
    """The scalar loss in ``loss_fn``'s return value ``out``: the loss itself, or the first
    of a pair ``(loss, aux)`` (``has_aux``: True, False, or None for either form), with a
    clear error for anything else."""
    pair = isinstance(out, tuple) and len(out) == 2
    if has_aux and not pair:
        raise TypeError(
            f"{name}: has_aux=True, so loss_fn must return a tuple (loss, aux); it "
            f"returned {_returned(out)}."
        )
    if has_aux is False and isinstance(out, (tuple, list)):
        raise TypeError(
            f"{name}: loss_fn returned {_returned(out)}. If it returns (loss, aux), "
            "construct the transformation with has_aux=True."
        )
    if has_aux is None and isinstance(out, (tuple, list)) and not pair:
        raise TypeError(
            f"{name}: loss_fn must return the loss or a tuple (loss, aux); it returned "
            f"{_returned(out)}. Return a tuple: loss_fn=lambda p: (loss, aux)."
        )
    out = out[0] if pair else out
    if jnp.ndim(out) != 0:
        raise ValueError(
            f"{name}: loss_fn must return a scalar loss, got shape {jnp.shape(out)}. "
            "Reduce it, e.g. with .mean() over the batch."
        )
    if not jnp.issubdtype(jnp.result_type(out), jnp.floating):
        raise TypeError(
            f"{name}: loss_fn must return a floating-point scalar, got {jnp.result_type(out)}."
        )
    return out


def call_loss(loss_fn: Callable, params: Any, name: str) -> Any:
    """``loss_fn(params)``. A TypeError on params that hold None, where a filter such as
    Equinox's ``eqx.filter(model, eqx.is_array)`` left out the model's non-array parts, says
    that ``loss_fn`` receives those params and how to keep the model whole."""
    try:
        return loss_fn(params)
    except TypeError as error:
        holes = jax.tree.leaves(params, is_leaf=lambda x: x is None)
        if not any(x is None for x in holes):
            raise
        raise TypeError(
            f"{name}: loss_fn failed on the params ({type(error).__name__}: {error}). They "
            "hold None where a filter (e.g. eqx.filter(model, eqx.is_array)) left out the "
            "model's other parts, such as its activation functions, and loss_fn receives "
            "these params. Keep the model whole: params, static = eqx.partition(model, "
            "eqx.is_array), pass params, and loss_fn=lambda p: loss(eqx.combine(p, static), "
            "batch)."
        ) from error


def _checked_scalar_loss(loss_fn: Callable, has_aux: bool, name: str) -> Callable:
    """``params -> scalar loss``, with a clear error for a wrong return value."""
    return lambda params: scalar_loss_of(call_loss(loss_fn, params, name), has_aux, name)


_TRACED_INDEX_ERRORS = (
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.ConcretizationTypeError,
)


def _checked_grad_fn(grad_fn: Callable, name: str) -> Callable:
    """``grad_fn(params, i)``, its result checked, and a traced ``i`` named in its errors."""

    def gradient(params, i):
        try:
            grads = grad_fn(params, i)
        except _TRACED_INDEX_ERRORS as error:
            if not isinstance(i, jax.core.Tracer):
                raise
            raise TypeError(
                f"{name}: grad_fn(params, i) needed a concrete value, but with unroll=False "
                "i is a traced int32 (1, 2, 3...: one traced gradient serves every "
                "evaluation). Choose with jnp.where / jax.lax.switch on i instead of Python "
                f"`if`/indexing, or construct {name} with unroll=True (i is then a Python "
                f"int). JAX said: {type(error).__name__}."
            ) from error
        check_like_params(grads, params, f"grad_fn(params, {i})", name)
        return grads

    return gradient


def missing_loss_fn_message(name: str, *, both: bool = False, exact: bool = False) -> str:
    """The error for an ``update`` given neither (or both) of ``loss_fn`` and ``grad_fn``:
    the fix for every kind of loop, since the error cannot know which one called."""
    finite = ("hessian=False" if name == "gam" else "hvp_step=0.01") if exact else "..."
    return "\n".join(
        [
            f"{name} evaluates extra gradients, so update needs exactly one of loss_fn or "
            f"grad_fn; {'both were' if both else 'neither was'} given. The fix, by loop:",
            "  your own step: tx.update(grads, state, params, loss_fn=lambda p: loss(p, batch))"
            " (or grad_fn=lambda p, i: grads at p);",
            "  Flax Linen: Flax's own TrainState.apply_gradients drops loss_fn; use "
            "gam_optax.flax.TrainState.create(...) (the same class, whose apply_gradients "
            "forwards it: state.apply_gradients(grads=grads, loss_fn=loss_fn));",
            "  Flax NNX: optimizer.update(model, grads, loss_fn=gam_optax.flax.nnx_loss_fn("
            "model, loss)), the loss_fn taken before your own pass;",
            "  a loop that cannot pass loss_fn at all: gam_optax.transparent("
            f"gam_optax.{name}({finite}), optimizer), which takes one gradient per update call"
            + (" (finite differences: no Hessian-vector products)." if exact else "."),
        ]
    )


def make_oracle(
    name: str,
    *,
    loss_fn: Callable | None,
    grad_fn: Callable | None,
    has_aux: bool,
    axis_name: str | None,
    average: Average,
    exact: bool,
    view: TreeView = LEAF_BY_LEAF,
) -> GradientOracle:
    """The oracle of one ``update`` call: exactly one of ``loss_fn(params) -> loss`` (or
    ``(loss, aux)`` with ``has_aux``) and ``grad_fn(params, i) -> grads``."""
    if (loss_fn is None) == (grad_fn is None):
        raise ValueError(missing_loss_fn_message(name, both=loss_fn is not None, exact=exact))
    if loss_fn is not None:
        check_arity(loss_fn, "loss_fn", ("the params",), name, "lambda p: loss(p, batch)")
        grad_of_loss = jax.grad(_checked_scalar_loss(loss_fn, has_aux, name))
        gradient = lambda params, i: grad_of_loss(params)
    elif grad_fn is not None:
        check_arity(grad_fn, "grad_fn", ("the params", "i"), name, "lambda p, i: grad(p, batch)")
        gradient = _checked_grad_fn(grad_fn, name)
    check_axis_bound(axis_name, name)
    return GradientOracle(axis_name, average, gradient, exact, view)


def point_of(probe: Probe, view: TreeView = LEAF_BY_LEAF) -> Params:
    """Where a probe's gradient is taken outside the exact mode: ``point + step``."""
    point, step = probe
    return point if step is None else add(point, view.tree(step, point))
