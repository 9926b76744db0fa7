"""A radius that follows the learning rate (the released GAM/GSAM schedule)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gam_optax import _validation


def proportional_schedule(
    lr_schedule: optax.Schedule,
    lr_max: float,
    lr_min: float,
    max_value: float,
    min_value: float,
) -> optax.Schedule:
    r"""A schedule proportional to the learning rate.

    .. math::
      v(t) = v_{min} + (v_{max} - v_{min})\,\frac{lr(t) - lr_{min}}{lr_{max} - lr_{min}}

    This is ``ProportionScheduler`` of the GSAM and GAM releases (which ship
    ``max_value == min_value``, a constant). When ``lr_max == lr_min`` the value
    is ``max_value``.

    Every value must be a finite number >= 0 (``v`` is a radius). Where
    ``lr(t)`` leaves ``[lr_min, lr_max]`` the value is extrapolated; the
    transformation that receives the schedule probes it (step 0 and a geometric
    grid of later steps) and rejects it if it turns negative there.

    Args:
      lr_schedule: the learning-rate schedule ``lr(t)``.
      lr_max: the learning rate at which the value is ``max_value``.
      lr_min: the learning rate at which the value is ``min_value``.
      max_value: ``v_max``.
      min_value: ``v_min``.

    Returns:
      An optax schedule, e.g. for the ``rho`` of :func:`gam_optax.gam`.

    Examples:
      >>> import optax, gam_optax
      >>> lr = optax.cosine_decay_schedule(0.1, decay_steps=100)
      >>> rho = gam_optax.proportional_schedule(lr, 0.1, 0.0, max_value=0.2, min_value=0.02)
      >>> print(f"{rho(0):.3f} {rho(50):.3f} {rho(100):.3f}")
      0.200 0.110 0.020
    """
    name = "proportional_schedule"
    if not callable(lr_schedule):
        raise TypeError(
            f"{name}: lr_schedule must be a schedule (a callable of the step count, e.g. "
            f"optax.cosine_decay_schedule(0.1, 1000)), got {_validation.describe(lr_schedule)}."
        )
    for arg, value in (
        ("lr_max", lr_max),
        ("lr_min", lr_min),
        ("max_value", max_value),
        ("min_value", min_value),
    ):
        _validation.check_nonnegative(arg, value, name)
    lr_max, lr_min = float(lr_max), float(lr_min)
    max_value, min_value = float(max_value), float(min_value)
    if lr_max < lr_min:
        raise ValueError(
            f"{name}: lr_max ({lr_max}) must be >= lr_min ({lr_min}); pass the largest and "
            "the smallest learning rate of lr_schedule."
        )
    span = lr_max - lr_min

    def schedule(count: jax.Array) -> jax.Array:
        if span == 0:
            return jnp.asarray(max_value, dtype=jnp.result_type(float))
        fraction = (lr_schedule(count) - lr_min) / span
        return min_value + (max_value - min_value) * fraction

    return schedule
