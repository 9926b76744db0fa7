r"""The public names of the paper's Algorithm 1 and of SAM + GAM.

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

import jax
import optax

from gam_optax import _gam_hessian, _perturb


def gam_penalty(
    rho: optax.ScalarOrSchedule,
    penalty: float | jax.Array,
    *,
    eps: float | jax.Array = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: _perturb.Average = "direction",
    mask: _perturb.Mask | None = None,
    hvp_step: optax.ScalarOrSchedule | None = None,
    unroll: bool = True,
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

    References:
      Zhang, Xu, Yu, Zou and Cui, "Gradient Norm Aware Minimization Seeks First-Order
      Flatness and Improves Generalization", CVPR 2023, https://arxiv.org/abs/2303.03108
    """
    return _gam_hessian.gam_hessian(
        rho,
        penalty,
        eps=eps,
        has_aux=has_aux,
        axis_name=axis_name,
        average=average,
        mask=mask,
        hvp_step=hvp_step,
        unroll=unroll,
        _name="gam_penalty",
    )


def sam_gam(
    rho: optax.ScalarOrSchedule,
    penalty: float | jax.Array,
    sam_rho: optax.ScalarOrSchedule,
    *,
    eps: float | jax.Array = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: _perturb.Average = "direction",
    mask: _perturb.Mask | None = None,
    hvp_step: optax.ScalarOrSchedule | None = None,
    unroll: bool = True,
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
    equal concrete numbers) and no ``mask`` (or one that selects everything), SAM's point
    :math:`\theta + r\,u(g_0)` is the first finite-difference point: a step then costs
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

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes ``loss_fn`` (or
      ``grad_fn(params, i)``; ``i``: 1 for :math:`f` (and SAM's gradient when shared), 2
      for :math:`\nabla L(\theta_{adv})`, 3 for :math:`h_{norm}`, 4 for SAM's gradient
      when not shared). Its state is a :class:`GAMPenaltyState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, gam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
      >>> tx = optax.chain(
      ...     gam_optax.sam_gam(0.1, 0.5, sam_rho=0.05, hvp_step=0.05), optax.sgd(0.05))
      >>> params = jnp.array([2.0, -1.0])
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...   grads = jax.grad(loss)(params)
      ...   updates, state = tx.update(grads, state, params, loss_fn=loss)
      ...   return optax.apply_updates(params, updates), state
      >>> for _ in range(200):
      ...   params, state = step(params, state)
      >>> print(f"{loss(params):.2f}")
      0.58
    """
    if sam_rho is None:
        raise TypeError(
            "sam_gam: sam_rho must be a real number, got NoneType None. Pass a finite Python "
            "float >= 0 (SAM's radius, e.g. sam_rho=0.05) or an optax schedule; for GAM's "
            "penalty without SAM's step use gam_optax.gam_penalty(rho, penalty)."
        )
    return _gam_hessian.gam_hessian(
        rho,
        penalty,
        eps=eps,
        has_aux=has_aux,
        axis_name=axis_name,
        average=average,
        mask=mask,
        sam_rho=sam_rho,
        hvp_step=hvp_step,
        unroll=unroll,
        _name="sam_gam",
    )


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
    return _gam_hessian.gam_hessian(
        rho,
        penalty,
        eps=eps,
        has_aux=has_aux,
        axis_name=axis_name,
        average=average,
        mask=mask,
        sam_rho=sam_rho,
        hvp_step=hvp_step,
        unroll=unroll,
    )
