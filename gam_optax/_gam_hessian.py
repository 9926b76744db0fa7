"""GAM with exact Hessian-vector products: the paper's Algorithm 1."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gam_optax import _perturb
from gam_optax._perturb import add_scaled, ascent_step, cast_like, scale, unit


class GAMHessianState(NamedTuple):
    """State of :func:`gam_hessian`.

    Attributes:
      count: the number of updates so far (int32); a schedule of ``rho`` is
        evaluated at it.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def gam_hessian(
    rho: optax.ScalarOrSchedule,
    penalty: float | jax.Array,
    *,
    eps: float | jax.Array = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: _perturb.Average = "direction",
    mask: _perturb.Mask | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient norm Aware Minimization, the original form (Algorithm 1).

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
      (Here the ascent on the gradient norm moves the selected leaves; the
      penalty's gradient covers all parameters.)

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
      keyword argument ``loss_fn`` (or ``grad_fn(params, i)``, differentiated
      once more by ``jax.jvp``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, gam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
      >>> tx = optax.chain(gam_optax.gam_hessian(rho=0.1, penalty=0.5), optax.sgd(0.05))
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
      Zhang, Xu, Yu, Zou and Cui, "Gradient Norm Aware Minimization Seeks
      First-Order Flatness and Improves Generalization", CVPR 2023,
      https://arxiv.org/abs/2303.03108
    """
    name = "gam_hessian"
    _perturb.check_nonnegative("rho", rho, name, schedule=True)
    _perturb.check_nonnegative("penalty", penalty, name)
    _perturb.check_common(name, eps=eps, has_aux=has_aux, axis_name=axis_name, average=average)

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
        # f = H(theta) u(g0): the gradient of the gradient norm.
        f = oracle.hessian_product(params, unit(g0, eps), 1)
        # theta_adv = theta + rho u(f): one ascent step on ||grad L||.
        m = _perturb.resolve_mask(mask, params, name)
        theta_adv = jax.tree.map(jnp.add, params, ascent_step(f, params, r, eps=eps, mask=m))
        g_adv = oracle.at(theta_adv, 2)
        # h_norm = rho H(theta_adv) u(g_adv): the gradient of R1.
        h_norm = scale(oracle.hessian_product(theta_adv, unit(g_adv, eps), 3), r)
        direction = add_scaled(g0, penalty, h_norm)
        direction = cast_like(oracle.finish(direction), updates)
        return direction, GAMHessianState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
