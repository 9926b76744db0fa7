"""The gradient of the GAM penalty (the paper's Algorithm 1) and SAM + GAM.

The public names are :func:`gam_optax.gam_penalty` and :func:`gam_optax.sam_gam`
(``gam_optax/_penalty.py``); ``gam_hessian`` here is their implementation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gam_optax import _perturb
from gam_optax._perturb import (
    add_scaled,
    ascent_step,
    cast_like,
    perturbed_gradient,
    scale,
    unit,
)


class GAMPenaltyState(NamedTuple):
    """State of :func:`gam_penalty` and :func:`sam_gam`.

    Attributes:
      count: the number of updates so far (int32); a schedule of ``rho`` is
        evaluated at it.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


GAMHessianState = GAMPenaltyState  # the name before 0.1.0 (deprecated: gam_optax/__init__.py)


def gam_hessian(
    rho: optax.ScalarOrSchedule,
    penalty: float | jax.Array,
    *,
    eps: float | jax.Array = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: _perturb.Average = "direction",
    mask: _perturb.Mask | None = None,
    sam_rho: optax.ScalarOrSchedule | None = None,
    hvp_step: optax.ScalarOrSchedule | None = None,
    unroll: bool = True,
    _name: str = "gam_hessian",
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient norm Aware Minimization, the original form (Algorithm 1).

    The implementation of :func:`gam_penalty` (``sam_rho=None``) and :func:`sam_gam`;
    ``_name`` is the public name that error messages give.

    The gradient of :math:`L + \text{penalty}\cdot R_1`, where the first-order
    flatness :math:`R_1(\theta) = \rho \max_{\|\delta\| \le \rho}
    \|\nabla L(\theta + \delta)\|` is maximised by one ascent step on the
    gradient norm, with exact Hessian-vector products (forward-over-reverse,
    ``jax.jvp`` of ``jax.grad``). With :math:`u(v) = v / (\|v\| + \xi)`:

    .. math::
      f &= H(\theta)\,u(g_0) \;(= \nabla \|\nabla L\|(\theta)), &
      \theta_{adv} &= \theta + \rho\,u(f) \\
      h_{norm} &= \rho\,H(\theta_{adv})\,u(\nabla L(\theta_{adv})), &
      d &= g_0 + \text{penalty}\cdot h_{norm}

    Place it first in a chain, like :func:`gam` (the accelerated Algorithm 2,
    which replaces each :math:`H v` by a finite difference of gradients; its
    ``hessian=True`` mode is a first-order Taylor version of Algorithm 2, not
    this algorithm). One update costs one gradient and two Hessian-vector
    products (each about two gradients) beyond the caller's :math:`g_0`.
    The authors published no hyperparameters for this form.

    **SAM + GAM** (``sam_rho``). The authors' README says "GAM can help SAM find
    flatter minima", but their released code holds no such combination; this is our
    reading of it: minimise SAM's loss plus the same penalty,
    :math:`L^{SAM}_{\rho_s}(\theta) + \text{penalty}\cdot R_1(\theta)` with
    :math:`L^{SAM}_{\rho_s}(\theta) = L(\theta + \rho_s\,u(g_0))`, whose gradient
    (SAM's, the ascent step held fixed) replaces :math:`g_0` in :math:`d`:

    .. math::
      g_s = \nabla L(\theta + \rho_s\,u(g_0)), \qquad
      d = g_s + \text{penalty}\cdot h_{norm}

    ``penalty=0`` is :func:`sam` with ``rho=sam_rho``.

    **Finite differences** (``hvp_step``). Each :math:`H(x)\,v` (:math:`v` a unit
    vector) becomes :math:`(\nabla L(x + r v) - \nabla L(x)) / r`, as in the
    accelerated Algorithm 2; only the direction of :math:`f` is used, so

    .. math::
      f = \nabla L(\theta + r\,u(g_0)) - g_0, \qquad
      h_{norm} = \frac{\rho}{r}\,\big(\nabla L(\theta_{adv} + r\,u(g_{adv}))
        - g_{adv}\big), \quad g_{adv} = \nabla L(\theta_{adv})

    (three gradients beyond :math:`g_0`; error :math:`O(r)`). These steps stand in
    for :math:`H v` and move every parameter, whatever ``mask`` says. With
    ``sam_rho`` the same value as ``hvp_step`` (the same object, or equal concrete
    numbers) and no ``mask`` (or one that selects everything), SAM's point
    :math:`\theta + r\,u(g_0)` is the first finite-difference point: SAM + GAM then
    costs three gradients beyond :math:`g_0`, as :func:`gam` does; otherwise SAM's
    gradient is one more (e.g. under ``optax.inject_hyperparams``, whose values are
    separate arrays).

    Args:
      rho: the radius of the flatness ball, a number or an optax schedule.
      penalty: the weight of :math:`R_1` (the paper's :math:`\alpha`).
      eps: ``xi``, added to every norm denominator.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is discarded.
      axis_name: the data-parallel axis inside ``jax.pmap`` / ``jax.shard_map``.
      average: with ``axis_name``: ``'direction'`` (default) computes ``d`` per
        device and averages it; ``'gradients'`` averages every gradient and
        Hessian-vector product (exact large-batch Algorithm 1).
      mask: the parameters the perturbations may move: a pytree of bools like the
        params (or a prefix of it), or ``params -> such a tree``, as ``optax.masked``.
        The gradients are still taken, and ``d`` returned, for every parameter; the
        ascent steps move the selected leaves only, their length measured on them
        (e.g. SAM-ON: perturb only the normalisation layers). None: all.
      (Here the ascent on the gradient norm, and SAM's step, move the selected
      leaves; the penalty's gradient covers all parameters.)
      sam_rho: SAM + GAM: the radius of SAM's step, a number or an optax schedule.
        None (default): the loss part of ``d`` is ``g0``.
      hvp_step: None (default): exact Hessian-vector products. A number ``r > 0``
        (or a schedule): first-order finite differences of gradients with step ``r``.
      unroll: True (default): the model's gradient is traced once per evaluation. False:
        once, in a ``jax.lax.scan`` over the three evaluations (each point computed from
        the one before), the same arithmetic, as :func:`gam`'s ``unroll`` (keep the default
        on XLA:CPU). SAM's own gradient, when not shared, stays outside the loop.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
      keyword argument ``loss_fn`` (or ``grad_fn(params, i)``, differentiated
      once more by ``jax.jvp`` in the exact mode). ``i``: 1 for :math:`f` (and SAM's
      gradient when shared), 2 for :math:`g_{adv}`, 3 for :math:`h_{norm}`, 4 for
      SAM's gradient when not shared.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, gam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
      >>> tx = optax.chain(gam_optax.gam_penalty(rho=0.1, penalty=0.5), optax.sgd(0.05))
      >>> params = jnp.array([2.0, -1.0])
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...   grads = jax.grad(loss)(params)
      ...   updates, state = tx.update(grads, state, params, loss_fn=loss)
      ...   return optax.apply_updates(params, updates), state
      >>> for _ in range(200):
      ...   params, state = step(params, state)
      >>> print(f"{loss(params):.2f}")  # the minimum of the loss alone is 0.578
      0.58

      SAM + GAM, with finite differences (three gradients beyond ``g0``):

      >>> sam_gam = gam_optax.sam_gam(0.1, 0.5, sam_rho=0.05, hvp_step=0.05)
      >>> tx2 = optax.chain(sam_gam, optax.sgd(0.05))
      >>> @jax.jit
      ... def step2(params, state):
      ...   grads = jax.grad(loss)(params)
      ...   updates, state = tx2.update(grads, state, params, loss_fn=loss)
      ...   return optax.apply_updates(params, updates), state
      >>> params = jnp.array([2.0, -1.0])
      >>> state = tx2.init(params)
      >>> for _ in range(200):
      ...   params, state = step2(params, state)
      >>> print(f"{loss(params):.2f}")
      0.58

    References:
      Zhang, Xu, Yu, Zou and Cui, "Gradient Norm Aware Minimization Seeks
      First-Order Flatness and Improves Generalization", CVPR 2023,
      https://arxiv.org/abs/2303.03108
    """
    name = _name
    _perturb.check_nonnegative("rho", rho, name, schedule=True)
    _perturb.check_nonnegative("penalty", penalty, name)
    if sam_rho is not None:
        _perturb.check_nonnegative("sam_rho", sam_rho, name, schedule=True)
    if hvp_step is not None:
        _perturb.check_positive("hvp_step", hvp_step, name, schedule=True)
    _perturb.check_common(
        name, eps=eps, has_aux=has_aux, axis_name=axis_name, average=average, unroll=unroll
    )
    same_step = sam_rho is not None and _same_value(sam_rho, hvp_step)

    def init_fn(params: optax.Params) -> GAMHessianState:
        del params
        return GAMHessianState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, loss_fn=None, grad_fn=None, **extra_args):
        del extra_args
        _perturb.check_state(state, GAMHessianState, name)
        oracle = _perturb.make_oracle(
            name,
            loss_fn=loss_fn,
            grad_fn=grad_fn,
            has_aux=has_aux,
            axis_name=axis_name,
            average=average,
        )
        r = _perturb.value_at(rho, state.count)
        g0 = oracle.incoming(updates, params)
        m = _perturb.resolve_mask(mask, params, name)
        r_fd = None if hvp_step is None else _perturb.value_at(hvp_step, state.count)
        if unroll:
            g_fd, h_norm = _unrolled(oracle, params, g0, r, r_fd, eps, m)
        else:
            g_fd, h_norm = _scanned(oracle, params, g0, r, r_fd, eps, m)
        # The loss part: g0, or SAM's gradient g(theta + sam_rho u(g0)).
        if sam_rho is None:
            loss_gradient = g0
        elif same_step and (m is None or all(jax.tree.leaves(m))):
            loss_gradient = g_fd  # the same point: theta + r_fd u(g0)
        else:
            r_sam = _perturb.value_at(sam_rho, state.count)
            loss_gradient = perturbed_gradient(
                oracle, params, g0, r_sam, eps=eps, adaptive=False, i=4, mask=m
            )
        direction = add_scaled(loss_gradient, penalty, h_norm)
        direction = cast_like(oracle.finish(direction), updates)
        return direction, GAMHessianState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unrolled(oracle, params, g0, r, r_fd, eps, m):
    """``(g_fd, h_norm)`` (``g_fd``: None in the exact mode), one trace per evaluation."""
    if r_fd is None:
        # f = H(theta) u(g0): the gradient of the gradient norm.
        g_fd, f = None, oracle.hessian_product(params, unit(g0, eps), 1)
    else:
        # f = g(theta + r_fd u(g0)) - g0 = r_fd H(theta) u(g0) + O(r_fd^2).
        g_fd = oracle.at(jax.tree.map(jnp.add, params, ascent_step(g0, params, r_fd, eps=eps)), 1)
        f = jax.tree.map(jnp.subtract, g_fd, g0)
    # theta_adv = theta + rho u(f): one ascent step on ||grad L||.
    theta_adv = jax.tree.map(jnp.add, params, ascent_step(f, params, r, eps=eps, mask=m))
    g_adv = oracle.at(theta_adv, 2)
    # h_norm = rho H(theta_adv) u(g_adv): the gradient of R1.
    if r_fd is None:
        return g_fd, scale(oracle.hessian_product(theta_adv, unit(g_adv, eps), 3), r)
    step = ascent_step(g_adv, theta_adv, r_fd, eps=eps)
    g_fd_adv = oracle.at(jax.tree.map(jnp.add, theta_adv, step), 3)
    return g_fd, scale(jax.tree.map(jnp.subtract, g_fd_adv, g_adv), r / r_fd)


def _where(pred, a, b):
    return jax.tree.map(lambda u, v: jnp.where(pred, u, v), a, b)


def _scanned(oracle, params, g0, r, r_fd, eps, m):
    """:func:`_unrolled` with the model's gradient traced once: a ``jax.lax.scan`` over the
    three evaluations ``i = 0, 1, 2``, the transitions chosen with ``jnp.where``.

    Exact: the carry ``(x, v)`` runs ``(theta, u(g0)) -> (theta_adv, 0) -> (theta_adv,
    u(g_adv))``; each pass gives ``g(x)`` and ``H(x) v``. Finite: the carry holds the point,
    ``theta + r_fd u(g0) -> theta_adv -> theta_adv + r_fd u(g_adv)``, and the gradient before.
    """
    add = lambda a, b: jax.tree.map(jnp.add, a, b)
    subtract = lambda a, b: jax.tree.map(jnp.subtract, a, b)

    def theta_adv(f):
        return add(params, ascent_step(f, params, r, eps=eps, mask=m))

    if r_fd is None:

        def body(carry, i):
            x, v, _ = carry
            g_x, hessian_v = oracle.gradient_and_hessian_product(x, cast_like(v, x), i + 1)
            zero = jax.tree.map(jnp.zeros_like, v)
            x_next = _where(i == 0, theta_adv(hessian_v), x)  # i = 0: hessian_v = f
            v_next = _where(i == 0, zero, unit(g_x, eps))  # i = 1: g_x = g_adv
            return (x_next, v_next, hessian_v), None

        carry = (params, unit(g0, eps), g0)
        (_, _, hessian_v), _ = jax.lax.scan(body, carry, jnp.arange(3, dtype=jnp.int32))
        return None, scale(hessian_v, r)

    def body(carry, i):
        point, before, g_fd, _ = carry
        g = oracle.at(point, i + 1)
        difference = subtract(g, before)  # i = 0: f; i = 2: g_fd_adv - g_adv
        step = ascent_step(g, point, r_fd, eps=eps)  # i = 1: from theta_adv along g_adv
        point = _where(i == 0, theta_adv(difference), add(point, step))
        return (point, g, _where(i == 0, g, g_fd), difference), None

    theta_fd = add(params, ascent_step(g0, params, r_fd, eps=eps))
    carry = (theta_fd, g0, g0, g0)
    (_, _, g_fd, difference), _ = jax.lax.scan(body, carry, jnp.arange(3, dtype=jnp.int32))
    return g_fd, scale(difference, r / r_fd)


def _same_value(a: optax.ScalarOrSchedule, b: optax.ScalarOrSchedule | None) -> bool:
    """``a`` and ``b`` are the same object, or equal concrete numbers (never tracers)."""
    if a is b:
        return True
    if b is None or callable(a) or callable(b):
        return False
    if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        return False
    try:
        return float(a) == float(b)  # type: ignore[arg-type]
    except Exception:  # e.g. an array not addressable from this process
        return False
