"""The gradient oracle: where a transformation's extra gradients come from.

:class:`GradientOracle` gives the gradient at a perturbed point from the caller's
``loss_fn`` or ``grad_fn``, finite (a new gradient) or exact (a Hessian-vector product),
with the data-parallel reductions over ``axis_name`` (:class:`Averaging`);
:func:`perturbed_gradient` is ``g(theta + e)`` after one ascent step, the gradient SAM
descends (and GAM's ``g1``, ``g3``).
"""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gam_optax import _compat
from gam_optax._tree_math import Params, ascent_step, cast_like
from gam_optax._validation import (
    Average,
    check_axis_bound,
    check_float_params,
    check_like_params,
)


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


@dataclasses.dataclass(frozen=True)
class Averaging:
    """The data-parallel reductions over ``axis_name`` (none when it is None).

    ``'gradients'``: every gradient is averaged over devices as it is computed
    (:meth:`reduce`); ``'direction'``: each device computes its own direction from its own
    gradients, and only the direction is averaged (:meth:`finish`).
    """

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
    """Gradients at perturbed points, for one call of a transformation's ``update``.

    Attributes:
      axis_name: the data-parallel axis, or None.
      average: 'direction' or 'gradients' (see :func:`make_oracle`).
      gradient: ``(params, i) -> grads``, the caller's ``grad_fn`` or ``jax.grad`` of
        its ``loss_fn``; ``i`` numbers the extra evaluation (1, 2, 3...).
      exact: replace ``g(theta + e)`` by its first-order Taylor expansion
        ``g(theta) + H(theta) e``, computed exactly by forward-over-reverse.
      transformation: the calling transformation's name, for error messages.
    """

    gradient: Callable[[Params, int | jax.Array], Params]  # i is traced under unroll=False
    exact: bool
    transformation: str

    def _local(self, params: Params) -> Params:
        if self.axis_name is not None and _vma_checked(self.axis_name):
            return _to_varying(params, self.axis_name)
        return params

    def at(self, params: Params, i: int) -> Params:
        """``g(params)``: a new gradient evaluation."""
        return self.reduce(self.gradient(self._local(params), i))

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
        return jax.tree.map(jnp.add, grads, self.reduce(hessian_step))

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
        return self.reduce(grads), self.reduce(hessian_step)

    def hessian_product(self, params: Params, vector: Params, i: int) -> Params:
        """``H(params) vector``: one exact Hessian-vector product (forward-over-reverse).

        Reduced over ``axis_name`` in 'gradients' mode, like every gradient.
        """
        _, product = jax.jvp(
            lambda p: self.gradient(p, i),
            (self._local(params),),
            (self._local(cast_like(vector, params)),),
        )
        return self.reduce(product)

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
        return self.reduce(updates)


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
    return GradientOracle(axis_name, average, gradient, exact, transformation)


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
