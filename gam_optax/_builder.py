"""The frame every perturbation shares: its state, its checks, its gradients and its casts.

A perturbation (:func:`gam_optax.sam`, :func:`gam_optax.gam`...) is a function
``direction(step) -> d`` that reads like its equations; :func:`perturbation` turns it into
an optax transformation. The frame checks the options at construction and, in ``update``,
the state, the incoming gradient ``g0`` and the mask; builds the :class:`GradientOracle`
from ``loss_fn`` or ``grad_fn``; averages ``d`` over devices in 'direction' mode; and casts
it back to the dtypes of the incoming updates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gam_optax._oracle import GradientOracle, make_oracle, perturbed_gradient
from gam_optax._tree_math import Params, cast_like
from gam_optax._validation import Mask, check_common, check_state, resolve_mask


class PerturbationState(NamedTuple):
    """State of :func:`sam`, :func:`gsam`, :func:`gam`, :func:`gam_penalty` and
    :func:`sam_gam`, also named ``SAMState``, ``GAMState`` and ``GAMPenaltyState``.

    Attributes:
      count: the number of updates so far (int32); schedules of the radii are evaluated
        at it.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def value_at(hyperparameter: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """A hyperparameter's value at step ``count``: ``v(count) if callable(v) else v``."""
    return hyperparameter(count) if callable(hyperparameter) else hyperparameter


@dataclasses.dataclass(frozen=True)
class Step:
    """What a direction reads in one ``update``.

    Attributes:
      oracle: the gradients at other points (:class:`GradientOracle`).
      params: ``theta``, the point ``g0`` was computed at.
      g0: the caller's gradient, checked (and averaged in 'gradients' mode).
      mask: the leaves the ascent steps may move (a tree of bools), or None: all.
      count: the number of updates before this one.
    """

    oracle: GradientOracle
    params: Params
    g0: Params
    mask: Params | None
    count: jax.Array

    def value(self, hyperparameter: optax.ScalarOrSchedule) -> jax.Array:
        """A hyperparameter (a number or a schedule) at this step."""
        return value_at(hyperparameter, self.count)

    def sam_gradient(
        self, radius: jax.Array | float, *, eps: Any, adaptive: bool = False, i: int = 1
    ) -> Params:
        """SAM's gradient ``g(theta + e)``, ``e`` the ascent step of length ``radius`` along
        ``g0`` (:func:`perturbed_gradient`); ``i`` numbers the evaluation for ``grad_fn``."""
        return perturbed_gradient(
            self.oracle,
            self.params,
            self.g0,
            radius,
            eps=eps,
            adaptive=adaptive,
            i=i,
            mask=self.mask,
        )


def perturbation(
    name: str,
    direction: Callable[[Step], Params],
    *,
    eps: Any,
    has_aux: Any,
    axis_name: Any,
    average: Any,
    mask: Mask | None,
    exact: bool = False,
    **flags: Any,
) -> optax.GradientTransformationExtraArgs:
    """The transformation ``name`` whose ``update`` returns ``direction(step)``.

    Args:
      name: the public name, which every error message gives.
      direction: ``Step -> d``, the algorithm.
      eps, has_aux, axis_name, average, mask: the options every perturbation takes,
        checked here (``mask`` when ``update`` is traced, against the params).
      exact: the oracle's exact mode (Hessian-vector products for ``g(theta + e)``).
      **flags: the algorithm's other bool options, checked to be bools.
    """
    check_common(name, eps=eps, has_aux=has_aux, axis_name=axis_name, average=average, **flags)

    def init_fn(params: optax.Params) -> PerturbationState:
        del params
        return PerturbationState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, loss_fn=None, grad_fn=None, **extra_args):
        del extra_args
        check_state(state, PerturbationState, name)
        oracle = make_oracle(
            name,
            loss_fn=loss_fn,
            grad_fn=grad_fn,
            has_aux=has_aux,
            axis_name=axis_name,
            average=average,
            exact=exact,
        )
        g0 = oracle.incoming(updates, params)
        step = Step(oracle, params, g0, resolve_mask(mask, params, name), state.count)
        d = cast_like(oracle.finish(direction(step)), updates)
        return d, PerturbationState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
