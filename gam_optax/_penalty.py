r"""GAM's original form, the paper's Algorithm 1, and SAM + GAM.

One name per algorithm:

* :func:`gam` -- Algorithm 2 as released (finite differences); ``gam(hessian=True)`` is
  the same algorithm with exact Hessian-vector products (label: ``gam_exact_hvp``);
* :func:`gam_penalty` -- Algorithm 1, the gradient of :math:`L + \text{penalty}\cdot R_1`;
* :func:`sam_gam` -- SAM + GAM, the gradient of :math:`L^{SAM} + \text{penalty}\cdot R_1`.

``gam_hessian`` (Algorithm 1, or SAM + GAM with ``sam_rho``) is the name before 0.1.0,
kept for one release with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gam_optax._frame import (
    Algorithm,
    Options,
    Perturbation,
    PerturbationState,
    Probe,
    perturbation,
)
from gam_optax._tree_math import Params, add_scaled, scale
from gam_optax._validation import Average, Mask, check_nonnegative, check_radius

GAMPenaltyState = PerturbationState  # the state of gam_penalty and sam_gam: the step count
GAMHessianState = GAMPenaltyState  # the name before 0.1.0 (deprecated: gam_optax/__init__.py)


def gam_penalty(
    rho: optax.ScalarOrSchedule,
    penalty: float | jax.Array,
    *,
    eps: float | jax.Array = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: Average = "direction",
    mask: Mask | None = None,
    hvp_step: optax.ScalarOrSchedule | None = None,
    unroll: bool = True,
    flat: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""GAM's original form, the paper's Algorithm 1: the gradient of :math:`L + \text{penalty}
    \cdot R_1`.

    The first-order flatness :math:`R_1(\theta) = \rho \max_{\|\delta\| \le \rho}
    \|\nabla L(\theta + \delta)\|` is maximised by one ascent step on the gradient norm,
    with exact Hessian-vector products (forward-over-reverse, ``jax.jvp`` of ``jax.grad``).
    With :math:`u(v) = v / (\|v\| + \xi)`:

    .. math::
      f &= H(\theta)\,u(g_0) \;(= \nabla \|\nabla L\|(\theta)), &
      \theta_{adv} &= \theta + \rho\,u(f) \\
      h_{norm} &= \rho\,H(\theta_{adv})\,u(\nabla L(\theta_{adv})), &
      d &= g_0 + \text{penalty}\cdot h_{norm}

    Place it first in a chain, like :func:`gam` (the accelerated Algorithm 2, which
    replaces each :math:`H v` by a finite difference of gradients; ``gam(hessian=True)``
    is a first-order Taylor version of Algorithm 2, not this algorithm). One update costs
    one gradient and two Hessian-vector products (each about two gradients) beyond the
    caller's :math:`g_0`. The authors published no hyperparameters for this form.

    **Finite differences** (``hvp_step=r``). Each :math:`H(x)\,v` (:math:`v` a unit
    vector) becomes :math:`(\nabla L(x + r v) - \nabla L(x)) / r`, as in Algorithm 2:
    three gradients beyond :math:`g_0`, error :math:`O(r)`. These steps stand in for
    :math:`H v` and move every parameter, whatever ``mask`` says.

    Args:
      rho: the radius of the flatness ball, a number or an optax schedule.
      penalty: the weight of :math:`R_1` (the paper's :math:`\alpha`).
      eps: ``xi``, added to every norm denominator.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is discarded.
      axis_name: the data-parallel axis inside ``jax.pmap`` / ``jax.shard_map``.
      average: with ``axis_name``: ``'direction'`` (default) computes ``d`` per device
        and averages it; ``'gradients'`` averages every gradient and Hessian-vector
        product (exact large-batch Algorithm 1).
      mask: the parameters the ascent step may move: a pytree of bools like the params
        (or a prefix of it), or ``params -> such a tree``, as ``optax.masked``. The
        gradients are still taken, and ``d`` returned, for every parameter. None: all.
      hvp_step: None (default): exact Hessian-vector products. A number ``r > 0`` (or a
        schedule): first-order finite differences of gradients with step ``r``.
      unroll: True (default): the gradient is traced once per evaluation. False: once, in
        a ``jax.lax.scan`` over the evaluations, the same arithmetic (see
        :func:`gam`'s ``unroll``).
      flat: True (default): the arithmetic on one flat vector of the gradients; False: leaf
        by leaf, no flat copy (see :func:`gam`'s ``flat``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the keyword
      argument ``loss_fn`` (or ``grad_fn(params, i)``, differentiated once more by
      ``jax.jvp`` in the exact mode; ``i``: 1 for :math:`f`, 2 for
      :math:`\nabla L(\theta_{adv})`, 3 for :math:`h_{norm}`). Its state is a
      :class:`GAMPenaltyState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, gam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
      >>> tx = optax.chain(gam_optax.gam_penalty(rho=0.1, penalty=0.5), optax.sgd(0.05))
      >>> update = jax.jit(lambda g, s, p: tx.update(g, s, p, loss_fn=loss))
      >>> params = jnp.array([2.0, -1.0])
      >>> state = tx.init(params)
      >>> for _ in range(200):
      ...   updates, state = update(jax.grad(loss)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(f"{loss(params):.2f}")  # the minimum of the loss alone is 0.578
      0.58

    References:
      Zhang, Xu, Yu, Zou and Cui, "Gradient Norm Aware Minimization Seeks First-Order
      Flatness and Improves Generalization", CVPR 2023, https://arxiv.org/abs/2303.03108
    """
    options = Options("gam_penalty", eps, False, has_aux, axis_name, average, mask, unroll, flat)
    return _algorithm_1(options, rho, penalty, None, hvp_step)


def sam_gam(
    rho: optax.ScalarOrSchedule,
    penalty: float | jax.Array,
    sam_rho: optax.ScalarOrSchedule,
    *,
    eps: float | jax.Array = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: Average = "direction",
    mask: Mask | None = None,
    hvp_step: optax.ScalarOrSchedule | None = None,
    unroll: bool = True,
    flat: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""SAM + GAM: the gradient of SAM's loss plus GAM's penalty,
    :math:`L^{SAM}_{\rho_s} + \text{penalty}\cdot R_1`.

    The authors' README says "GAM can help SAM find flatter minima", but their released
    code holds no such combination; this is our reading of it. With
    :math:`L^{SAM}_{\rho_s}(\theta) = L(\theta + \rho_s\,u(g_0))`, SAM's gradient (the
    ascent step held fixed) takes the place of :math:`g_0` in :func:`gam_penalty`'s
    direction:

    .. math::
      g_s = \nabla L(\theta + \rho_s\,u(g_0)), \qquad
      d = g_s + \text{penalty}\cdot h_{norm}

    ``penalty=0`` is :func:`sam` with ``rho=sam_rho``; :math:`h_{norm}` is
    :func:`gam_penalty`'s.

    With ``hvp_step=r``, each :math:`H v` becomes :math:`(\nabla L(x + r v) -
    \nabla L(x)) / r`. With ``sam_rho`` the same value as ``hvp_step`` (the same object, or
    equal concrete numbers) and no ``mask`` (or a tree of bools that selects everything),
    SAM's point :math:`\theta + r\,u(g_0)` is the first finite-difference point: a step costs
    three gradients beyond :math:`g_0`, as :func:`gam` does; otherwise SAM's gradient is
    one more (e.g. under ``optax.inject_hyperparams``, whose values are separate arrays).

    Args:
      rho: the radius of the flatness ball, a number or an optax schedule.
      penalty: the weight of :math:`R_1`.
      sam_rho: the radius of SAM's step, a number or an optax schedule.
      eps: ``xi``, added to every norm denominator.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is discarded.
      axis_name: the data-parallel axis inside ``jax.pmap`` / ``jax.shard_map``.
      average: with ``axis_name``: ``'direction'`` (default) or ``'gradients'``, as in
        :func:`gam_penalty`.
      mask: the parameters the ascent on the gradient norm and SAM's step may move, as
        in :func:`gam_penalty`; the penalty's gradient covers all parameters.
      hvp_step: None (default): exact Hessian-vector products. A number ``r > 0`` (or a
        schedule): finite differences with step ``r``.
      unroll: as in :func:`gam_penalty`.
      flat: as in :func:`gam_penalty`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``loss_fn`` (or
      ``grad_fn(params, i)``; ``i``: 1 for :math:`f` (and SAM's gradient when shared), 2
      for :math:`\nabla L(\theta_{adv})`, 3 for :math:`h_{norm}`, 4 for SAM's gradient
      when not shared). Its state is a :class:`GAMPenaltyState`.

    Examples:
      ``penalty=0`` is SAM:

      >>> import jax, jax.numpy as jnp, gam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
      >>> params = jnp.array([2.0, -1.0])
      >>> def direction(tx):
      ...   return tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)[0]
      >>> sam_gam = gam_optax.sam_gam(0.1, penalty=0.0, sam_rho=0.05, hvp_step=0.05)
      >>> bool(jnp.allclose(direction(sam_gam), direction(gam_optax.sam(0.05))))
      True
    """
    if sam_rho is None:
        raise TypeError(
            "sam_gam: sam_rho must be a real number, got NoneType None. Pass a finite Python "
            "float >= 0 (SAM's radius, e.g. sam_rho=0.05) or an optax schedule; for GAM's "
            "penalty without SAM's step use gam_optax.gam_penalty(rho, penalty)."
        )
    options = Options("sam_gam", eps, False, has_aux, axis_name, average, mask, unroll, flat)
    return _algorithm_1(options, rho, penalty, sam_rho, hvp_step)


def gam_hessian(
    rho: optax.ScalarOrSchedule,
    penalty: float | jax.Array,
    *,
    sam_rho: optax.ScalarOrSchedule | None = None,
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    """Deprecated: :func:`gam_penalty`, or :func:`sam_gam` when ``sam_rho`` is given.

    ``gam_hessian(rho, penalty)`` is ``gam_penalty(rho, penalty)`` and
    ``gam_hessian(rho, penalty, sam_rho=s)`` is ``sam_gam(rho, penalty, sam_rho=s)``; the
    other arguments are the same. Calling it warns (``DeprecationWarning``); it will be
    removed in the release after 0.1.0.
    """
    new = "gam_penalty(rho, penalty, ...)" if sam_rho is None else "sam_gam(rho, penalty, sam_rho)"
    warnings.warn(
        f"gam_optax.gam_hessian is deprecated and will be removed after 0.1.0; use "
        f"gam_optax.{new} (the same transformation).",
        DeprecationWarning,
        stacklevel=2,
    )
    if sam_rho is None:
        return gam_penalty(rho, penalty, **options)
    return sam_gam(rho, penalty, sam_rho, **options)


class PenaltySums(NamedTuple):
    """Algorithm 1's running values: ``d = loss_gradient + penalty * h_norm``.

    Attributes:
      loss_gradient: ``g0``, or SAM's gradient ``g(theta + sam_rho u(g0))``.
      g_adv: the gradient at ``theta_adv``, the base of the last Hessian-vector product.
      h_norm: the penalty's gradient, ``rho H(theta_adv) u(g_adv)``.
    """

    loss_gradient: Params
    g_adv: Params
    h_norm: Params


def _algorithm_1(
    options: Options,
    rho: optax.ScalarOrSchedule,
    penalty: float | jax.Array,
    sam_rho: optax.ScalarOrSchedule | None,
    hvp_step: optax.ScalarOrSchedule | None,
) -> Perturbation:
    r"""The transformation behind the three public names (``options.name`` in errors).

    .. math::
      f = H(\theta)\,u(g_0), \quad \theta_{adv} = \theta + \rho\,u(f), \quad
      h_{norm} = \rho\,H(\theta_{adv})\,u(\nabla L(\theta_{adv})), \quad
      d = g + \text{penalty}\cdot h_{norm}

    Each :math:`H(x)\,u(v)` is a probe at :math:`x` with the step :math:`s\,u(v)`: exact
    (:math:`s = 1`, a Hessian-vector product) or, with ``hvp_step``, the finite difference
    :math:`(g(x + s\,u(v)) - g(x)) / s`. ``g`` is :math:`g_0`, or SAM's gradient
    :math:`\nabla L(\theta + \rho_s\,u(g_0))`, the first probe's when it is the same point.
    """
    name = options.name
    check_radius("rho", rho, name)
    check_nonnegative("penalty", penalty, name)
    if sam_rho is not None:
        check_radius("sam_rho", sam_rho, name)
    if hvp_step is not None:
        check_radius("hvp_step", hvp_step, name, strict=True)
    exact = hvp_step is None
    selects_all = options.mask is None or (
        not callable(options.mask) and all(jax.tree.leaves(options.mask))
    )  # a mask function is known only once it sees the params: SAM's point is then apart
    shared = sam_rho is not None and selects_all and _same_value(sam_rho, hvp_step)
    separate = sam_rho is not None and not shared

    def s(c):  # the step of each H v: 1 (exact), or the finite difference's
        return 1.0 if exact else c.value(hvp_step)

    def hessian_probe(c, x, v):  # H(x) u(v) ~ change / s
        return Probe(x, c.plain_step(v, s(c)))

    def first(c):
        zeros = jax.tree.map(jnp.zeros_like, c.g0)
        return PenaltySums(c.g0, zeros, zeros), hessian_probe(c, c.theta, c.g0)

    # g0 lives in the carry (loss_gradient) until it is needed no more: a scan keeps no
    # other copy of it.
    def at_theta(c, sums, g):  # f = H(theta) u(g0): theta_adv ascends ||grad L||
        theta_adv = c.moved(c.theta, c.ascend(g.change(sums.loss_gradient), c.theta, c.value(rho)))
        if shared:  # theta + s u(g0) is SAM's point: g is SAM's gradient
            sums = sums._replace(loss_gradient=g.gradient)
        return sums, Probe(theta_adv)

    def at_theta_adv(c, sums, g_adv):
        return sums._replace(g_adv=g_adv.gradient), hessian_probe(c, g_adv.point, g_adv.gradient)

    def after_theta_adv(c, sums, g):  # h_norm = rho H(theta_adv) u(g_adv)
        h_norm = scale(g.change(sums.g_adv), c.value(rho) / s(c))
        if not separate:
            return sums._replace(h_norm=h_norm), None
        sam_point = c.moved(c.theta, c.ascend(sums.loss_gradient, c.theta, c.value(sam_rho)))
        return sums._replace(h_norm=h_norm), Probe(sam_point)  # a gradient, never linearised

    def at_sam_point(c, sums, g_sam):
        return sums._replace(loss_gradient=g_sam.gradient), None

    def direction(c, sums):
        return add_scaled(sums.loss_gradient, penalty, sums.h_norm)

    steps = (at_theta, at_theta_adv, after_theta_adv) + ((at_sam_point,) if separate else ())
    return perturbation(Algorithm(first, steps, direction, exact=exact), options)


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
