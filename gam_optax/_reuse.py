"""Amortised sharpness-aware steps: reuse the inner direction between refreshes (LookSAM)."""

from __future__ import annotations

import numbers
import sys
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gam_optax._frame import PerturbationState
from gam_optax._oracle import Averaging
from gam_optax._sam import sam
from gam_optax._tree_math import add_scaled, cast_like, global_norm, orthogonal_part, safe_inverse
from gam_optax._validation import (
    Average,
    Mask,
    check_average,
    check_axis_bound,
    check_axis_name,
    check_bool,
    check_nonnegative,
    check_state_like,
    check_transformation,
    check_update,
)

CPU_CONDITIONAL_WARNING = (
    "reuse: the refresh steps are chosen on device with jax.lax.cond. XLA:CPU compiles "
    "convolutions inside a conditional branch (or a loop) to plain loop nests, not its "
    "convolution kernels, so a convolutional model's step runs several times slower than "
    "GAM's own step. Choose them on the host instead: pass refresh=(step % every == 0), a "
    "Python bool, to update, and compile the step with "
    "jax.jit(step, static_argnames='refresh'): two programs, no conditional."
)


class ReuseState(NamedTuple):
    """State of :func:`reuse`.

    Attributes:
      count: the number of updates so far (int32); ``count % every == 0`` refreshes. The
        inner transformation's own count (its schedules') is this one.
      v: the part of the last refresh direction orthogonal to its ``g0``, in the
        parameters' dtypes.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    v: optax.Params


def _check_options(inner, every, alpha, rescale, eps, axis_name, average) -> None:
    """The checks of :func:`reuse`'s arguments, at construction."""
    name = "reuse"
    check_transformation("inner", inner, name, " such as gam_optax.gam()")
    if not isinstance(every, jax.core.Tracer):  # inside optax.inject_hyperparams
        if isinstance(every, (jax.Array, np.ndarray)) and np.ndim(every) == 0:
            every = int(every) if np.issubdtype(np.asarray(every).dtype, np.integer) else every
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(
                f"reuse: every must be a positive integer (the refresh period in steps, e.g. "
                f"5), got {every!r}."
            )
    check_nonnegative("alpha", alpha, name, schedule=True)
    check_bool("rescale", rescale, name)
    check_nonnegative("eps", eps, name)
    check_axis_name(axis_name, name)
    check_average(average, name)


def _check_inner_state(inner_state) -> None:
    """``inner`` is a member of the family (alone, or in :func:`every_gradient`)."""
    if not isinstance(inner_state, PerturbationState):
        raise TypeError(
            "reuse: inner must be a sharpness-aware member of gam_optax (sam, gsam, gam, "
            "gam_penalty, sam_gam, or every_gradient of one), whose state is the step count; "
            f"its init gave {type(inner_state).__name__}. Put the base optimizer after reuse in "
            "the chain: optax.chain(gam_optax.reuse(gam_optax.gam()), optax.sgd(0.1))."
        )


def reuse(
    inner: optax.GradientTransformation,
    every: int = 5,
    alpha: optax.ScalarOrSchedule = 0.7,
    *,
    rescale: bool = True,
    eps: float | jax.Array = 1e-12,
    axis_name: str | None = None,
    average: Average = "direction",
) -> optax.GradientTransformationExtraArgs:
    r"""Run ``inner`` every ``every`` steps; in between, reuse its orthogonal component.

    LookSAM's amortisation (Liu et al., 2022), for any member of the family
    (:func:`gam`, :func:`sam`, :func:`gsam`..., alone or in :func:`every_gradient`).
    Place it first in a chain. With the caller's gradient :math:`g_0` and :math:`t` the
    step count:

    .. math::
      t \bmod k = 0:&\quad d = \mathrm{inner}(g_0),
        \qquad v = d - \cos(d, g_0)\,\|d\|\,\frac{g_0}{\|g_0\| + \xi} \\
      \text{otherwise}:&\quad d = g_0 + \alpha_t\,\frac{\|g_0\|}{\|v\| + \xi}\,v
        \quad\text{(LookSAM)}
        \qquad\text{or, with } \texttt{rescale=False}:\quad d = g_0 + \alpha_t\,v

    Refresh steps cost what ``inner`` costs; the others evaluate no gradient, so an
    inner step of ``n`` gradients costs about ``(n + k - 1) / k``. LookSAM's rule gives
    the reused component the length :math:`\alpha\|g_0\|`: far more than GAM's own
    orthogonal part adds at ``alpha = 0.7``. ``rescale=False`` with ``alpha = 1`` repeats
    exactly what the last refresh added orthogonally to its :math:`g_0`.

    Which steps refresh: by default ``jax.lax.cond`` on the count. XLA:CPU compiles a
    convolutional model's gradients inside a conditional as plain loop nests (several
    times slower; it warns on the CPU backend): there pass ``refresh=step % every == 0``,
    a Python bool, to ``update``, with ``jax.jit(step, static_argnames="refresh")``.

    Data parallel: build ``inner`` with the same ``axis_name`` and ``average``. ``v`` is
    taken against the device-averaged :math:`g_0` (the state stays replicated); skip
    steps average :math:`g_0` (``'gradients'``) or the directions (``'direction'``).

    Args:
      inner: the member to amortise; its ``update`` gets every extra argument
        (``loss_fn``, ``grad_fn``...) on refresh steps, and its count is ``reuse``'s.
      every: ``k``, the refresh period: steps ``0, k, 2k, ...`` run ``inner``.
      alpha: the weight of the reused component, a number or an optax schedule
        of the step count (LookSAM: 0.7).
      rescale: LookSAM's rule, the reused component rescaled to the length
        ``alpha ||g0||``; False: ``alpha v``, the length it had at the refresh.
      eps: ``xi``, added to the norm denominators.
      axis_name: the data-parallel axis, or None.
      average: ``'direction'`` or ``'gradients'``, as ``inner`` (see above).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes what
      ``inner``'s takes (``loss_fn=`` or ``grad_fn=``).

    Examples:
      The refresh steps chosen on the host (two programs, no conditional):

      >>> import functools, jax, jax.numpy as jnp, optax, gam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
      >>> inner = gam_optax.gam(rho=0.1, rho_prime=0.01)
      >>> tx = optax.chain(gam_optax.reuse(inner, every=5, alpha=1.0, rescale=False),
      ...                  optax.sgd(0.1))
      >>> @functools.partial(jax.jit, static_argnames="refresh")
      ... def train_step(params, state, refresh):
      ...     g = jax.grad(loss)(params)
      ...     updates, state = tx.update(g, state, params, loss_fn=loss, refresh=refresh)
      ...     return optax.apply_updates(params, updates), state
      >>> params = jnp.array([2.0, -1.0])
      >>> state = tx.init(params)
      >>> for t in range(100):
      ...     params, state = train_step(params, state, refresh=t % 5 == 0)
      >>> print(f"{loss(params):.2f}")  # the minimum is 0.578
      0.58

    References:
      Liu, Mai, Chen, Hsieh and You, "Towards Efficient and Scalable
      Sharpness-Aware Minimization", CVPR 2022, https://arxiv.org/abs/2203.02714
    """
    _check_options(inner, every, alpha, rescale, eps, axis_name, average)
    inner = optax.with_extra_args_support(inner)
    # The refresh takes v against the device-averaged g0 in both modes (a replicated state).
    averaged = Averaging(axis_name, "gradients")
    averaging = Averaging(axis_name, average)

    def init_fn(params: optax.Params) -> ReuseState:
        _check_inner_state(inner.init(params))
        return ReuseState(count=jnp.zeros([], jnp.int32), v=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None, *, refresh=None, **extra_args):
        if refresh is not None and not isinstance(refresh, (bool, np.bool_)):
            raise TypeError(
                f"reuse.update: refresh must be a Python bool (True: run the inner "
                f"transformation), chosen outside jax.jit, or None; got {refresh!r}. Pass it "
                f"as a static argument: jax.jit(step, static_argnames='refresh')."
            )
        check_update("reuse", updates, state, params, ReuseState, axis_name)
        check_state_like(state, jax.eval_shape(init_fn, params), "reuse")
        check_axis_bound(axis_name, "reuse")
        a = alpha(state.count) if callable(alpha) else alpha

        def do_refresh(_):
            inner_state = PerturbationState(count=state.count)  # inner counts every step
            direction, _ = inner.update(updates, inner_state, params, **extra_args)
            v = orthogonal_part(direction, averaged.reduce(updates), eps)
            return cast_like(direction, updates), cast_like(v, params)

        def do_skip(_):
            g0 = averaging.reduce(updates)
            if rescale:  # LookSAM: the length alpha ||g0||
                c = a * global_norm(g0) * safe_inverse(global_norm(state.v), eps)
            else:  # the length it had at the refresh, times alpha
                c = a
            return averaging.finish(add_scaled(g0, c, state.v)), state.v

        if refresh is None:  # chosen on device from the count
            if jax.default_backend() == "cpu":
                warnings.warn(CPU_CONDITIONAL_WARNING, stacklevel=_user_frame())
            direction, v = jax.lax.cond(state.count % every == 0, do_refresh, do_skip, None)
        else:  # chosen by the caller: one branch is compiled, no conditional
            direction, v = (do_refresh if refresh else do_skip)(None)
        return direction, ReuseState(count=optax.safe_increment(state.count), v=v)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _user_frame() -> int:
    """The ``stacklevel`` of the first caller outside the libraries (gam_optax, optax, jax,
    flax): a warning then points at the user's line, not at optax.chain's."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").split(".")[0] in (
        "gam_optax",
        "optax",
        "jax",
        "flax",
    ):
        frame, level = frame.f_back, level + 1
    return level


def looksam(
    rho: optax.ScalarOrSchedule = 0.05,
    every: int = 5,
    alpha: optax.ScalarOrSchedule = 0.7,
    *,
    rescale: bool = True,
    adaptive: bool = False,
    eps: float | jax.Array = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: Average = "direction",
    mask: Mask | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM: SAM every ``every`` steps, its orthogonal component reused in between.

    ``reuse(sam(rho, ...), every, alpha)``; see :func:`reuse` and :func:`sam`.
    The SAM gradient :math:`g_s = \nabla L(\theta + \rho\,g_0/(\|g_0\| + \xi))`
    is taken on refresh steps and :math:`g_v`, its part orthogonal to
    :math:`g_0`, is kept; the other steps return
    :math:`g_0 + \alpha\,\|g_0\|\,g_v / (\|g_v\| + \xi)`.

    Examples:
      >>> import jax, jax.numpy as jnp, gam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
      >>> params = jnp.array([2.0, -1.0])
      >>> g0 = jax.grad(loss)(params)
      >>> looksam = gam_optax.looksam(rho=0.05, every=5, alpha=0.7)
      >>> same = gam_optax.reuse(gam_optax.sam(rho=0.05), every=5, alpha=0.7)
      >>> a, b = (tx.update(g0, tx.init(params), params, loss_fn=loss, refresh=True)[0]
      ...         for tx in (looksam, same))
      >>> bool(jnp.array_equal(a, b))
      True

    References:
      Liu, Mai, Chen, Hsieh and You, "Towards Efficient and Scalable
      Sharpness-Aware Minimization", CVPR 2022, https://arxiv.org/abs/2203.02714
    """
    frame: dict[str, Any] = dict(eps=eps, axis_name=axis_name, average=average)
    inner = sam(rho, adaptive=adaptive, has_aux=has_aux, mask=mask, **frame)
    return reuse(inner, every, alpha, rescale=rescale, **frame)
