"""Clip (or otherwise transform) every gradient a sharpness-aware transformation uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from gam_optax import _validation
from gam_optax._oracle import call_loss, scalar_loss_of


def every_gradient(
    transform: optax.GradientTransformation, inner: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    r"""Apply a stateless ``transform`` (e.g. clipping) to every gradient ``inner`` uses.

    ``inner`` (:func:`gam`, :func:`sam`, :func:`gsam`, :func:`gam_penalty`,
    :func:`reuse`...) combines your ``g0`` with the gradients it evaluates at perturbed
    points. A transformation placed *before* it in a chain changes ``g0`` alone: GAM's
    finite difference ``g1 - g0`` then compares a clipped gradient with an unclipped one
    and its direction is wrong, silently. ``every_gradient(transform, inner)`` applies
    ``transform`` to ``g0`` and to each gradient ``inner`` evaluates (at the point it is
    evaluated at), so that ``inner`` runs on one gradient field: with
    ``transform = optax.clip_by_global_norm(c)``, GAM of the clipped gradient
    :math:`c\,g / \max(c, \|g\|)`.

    Where clipping goes: to clip the step you take (the usual meaning, and what the
    released code would do), clip ``d`` after the sharpness-aware transformation:
    ``optax.chain(gam(), optax.clip_by_global_norm(1.0), optax.sgd(0.1))``. Use
    ``every_gradient`` where single gradients must be bounded, e.g. against spikes at
    the perturbed points. While a global-norm clip is active at every point, the
    gradients all have the norm ``c``: GAM's ``g1 - g0`` then follows how the
    gradient's direction turns, not how its norm grows, so prefer a threshold that is
    active only on rare spikes.

    Args:
      transform: a stateless gradient transformation (its state holds no array):
        ``optax.clip_by_global_norm``, ``optax.clip``, ``optax.scale``, a chain of them.
        It is called as ``transform.update(g, transform.init(params), point)``.
      inner: the sharpness-aware transformation. It gets ``grad_fn=`` in place of your
        ``loss_fn=`` (the gradient of your loss, transformed), so its ``has_aux``
        setting does not matter: a ``loss_fn`` returning ``(loss, aux)`` is recognised.

    Returns:
      A ``GradientTransformationExtraArgs`` with ``inner``'s state, whose ``update``
      takes ``loss_fn=`` or ``grad_fn=`` like ``inner``'s. Put it first in the chain.

    In ``average='gradients'`` mode each device's gradient is transformed before the
    gradients are averaged.

    Examples:
      SAM of the clipped gradient, on ``L = ||theta||^2`` (whose gradients here are longer
      than 1):

      >>> import jax, jax.numpy as jnp, optax, gam_optax
      >>> tx = gam_optax.every_gradient(optax.clip_by_global_norm(1.0), gam_optax.sam(0.5))
      >>> loss = lambda p: jnp.sum(p**2)
      >>> params = jnp.array([3.0, 4.0])
      >>> d, state = tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)
      >>> print(f"{optax.tree.norm(d):.2f}")
      1.00
    """
    name = "every_gradient"
    for what, value in (("transform", transform), ("inner", inner)):
        _validation.check_transformation(what, value, name)
    inner = optax.with_extra_args_support(inner)

    def apply(grads: Any, point: Any) -> Any:
        state = transform.init(point)
        if jax.tree.leaves(state):
            raise ValueError(
                f"{name}: transform must be stateless (clipping, scaling), but its state "
                f"holds arrays ({type(state).__name__}). A stateful transformation (momentum, "
                "Adam...) belongs after the sharpness-aware one in the chain, where it "
                "receives the direction once per step."
            )
        return transform.update(grads, state, point)[0]

    def init_fn(params: optax.Params) -> optax.OptState:
        apply(params, params)  # the statelessness check, at once
        return inner.init(params)

    def update_fn(updates, state, params=None, *, loss_fn=None, grad_fn=None, **extra_args):
        if (
            params is None
            or (loss_fn is None) == (grad_fn is None)
            or not callable(loss_fn or grad_fn)
        ):  # inner says what is missing or wrong, in its own terms
            return inner.update(
                updates, state, params, loss_fn=loss_fn, grad_fn=grad_fn, **extra_args
            )
        if loss_fn is not None:
            _validation.check_arity(loss_fn, "loss_fn", ("the params",), name, "lambda p: ...")
            gradient = jax.grad(_loss_only(loss_fn))
            transformed = lambda point, i: apply(gradient(point), point)
        else:
            _validation.check_arity(
                grad_fn, "grad_fn", ("the params", "i"), name, "lambda p, i: ..."
            )
            transformed = lambda point, i: apply(grad_fn(point, i), point)
        return inner.update(
            apply(updates, params), state, params, grad_fn=transformed, **extra_args
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _loss_only(loss_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``params -> loss`` for a ``loss_fn`` that returns the loss or a tuple ``(loss, aux)``."""
    name = "every_gradient"
    return lambda params: scalar_loss_of(call_loss(loss_fn, params, name), None, name)
