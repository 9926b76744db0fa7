"""GAM: Gradient norm Aware Minimization (Zhang et al., CVPR 2023)."""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from gam_optax._builder import PerturbationState, Step, perturbation
from gam_optax._tree_math import (
    Params,
    add,
    add_scaled,
    ascent_step,
    cast_like,
    orthogonal_part,
    upcast,
    where,
)
from gam_optax._validation import Average, Mask, check_choice, check_finite, check_nonnegative

HMinusWeighting = Literal["released", "paper"]

GAMState = PerturbationState  # the state of gam: the step count


def gam(
    rho: optax.ScalarOrSchedule = 0.2,
    rho_prime: optax.ScalarOrSchedule = 0.02,
    alpha: float | jax.Array = 0.6,
    beta: float | jax.Array = 0.5,
    gamma: float | jax.Array = 0.03,
    *,
    eps: float | jax.Array = 1e-12,
    adaptive: bool = False,
    h_minus_weighting: HMinusWeighting = "released",
    hessian: bool = False,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: Average = "direction",
    mask: Mask | None = None,
    unroll: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Gradient norm Aware Minimization, the accelerated form (Algorithm 2).

  Place it first in a chain. The incoming updates are the caller's gradient
  :math:`g_0 = \nabla L(\theta)`; the transformation evaluates three more
  gradients of the same mini-batch loss and returns the direction :math:`d`,
  which the rest of the chain (weight decay, momentum, learning rate) treats as
  the gradient. With :math:`u(v) = v / (\|v\| + \xi)` and one global norm:

  .. math::
    \theta_1 &= \theta + \rho'\,u(g_0), & g_1 &= \nabla L(\theta_1) \\
    h_0 &= g_1 - g_0, \quad \theta_2 = \theta + \rho\,u(h_0), & g_2 &= \nabla L(\theta_2) \\
    \theta_3 &= \theta_2 + \rho'\,u(g_2), & g_3 &= \nabla L(\theta_3) \\
    h_+ &= \alpha g_1 + (1 - \alpha) g_3, & h_- &= w_0 g_0 + w_2 g_2 \\
    h_\perp &= h_- - \cos(h_-, h_+)\,\|h_-\|\,u(h_+), & d &= h_+ - \gamma h_\perp

  with :math:`w_0 = 1, w_2 = |1 - \beta|` (the released code, which produced
  the published results) or :math:`w_0 = \beta, w_2 = 1 - \beta` (the paper's
  Algorithm 2). The two ``w_2`` differ only for ``beta > 1``. Here
  :math:`h_0/\rho'` estimates :math:`\nabla\|\nabla L\| = H u(g_0)`, so
  :math:`\theta_2` ascends the gradient norm, and :math:`g_3` is a SAM gradient
  taken there.

  Hyperparameters and the released code's names (``main_cifar.py``):

  ============  =================  ==========================================
  argument      released name      meaning
  ============  =================  ==========================================
  rho           ``grad_norm_rho``  radius of the gradient-norm ascent (large)
  rho_prime     ``grad_rho``       radius of the two SAM-like steps (small)
  alpha         ``grad_beta_1``    weight of g1 in h_plus (1 - alpha on g3)
  beta          ``grad_beta_0``    weight of g2 in h_minus is ``|1 - beta|``
  gamma         ``grad_gamma``     strength of the orthogonal correction
  eps           ``perturb_eps``    added to every norm denominator
  ============  =================  ==========================================

  The defaults are the released CIFAR-100 ResNet setting; :func:`gam_preset`
  gives the others.

  Args:
    rho: radius of the gradient-norm ascent, a number or an optax schedule of
      the step count (see :func:`proportional_schedule`).
    rho_prime: radius of the two SAM-like steps, a number or a schedule.
    alpha: weight of ``g1`` in ``h_plus``.
    beta: ``h_minus`` weights ``g2`` by ``|1 - beta|`` (released) or
      ``1 - beta`` (paper); any finite value is accepted.
    gamma: strength of the orthogonal correction.
    eps: ``xi``, added to every norm denominator.
    adaptive: ASAM-style steps: ``e = r v theta_c^2 / (||v |theta_c| || + xi)``
      for the three perturbations (steps 5-7 keep plain norms).
    h_minus_weighting: ``'released'`` (``w0 = 1``, ``w2 = |1 - beta|``: the
      released ``gam.py`` weights g2 by ``abs(grad_beta_2)``, ``grad_beta_2 =
      1 - grad_beta_0``) or ``'paper'`` (``w0 = beta``, ``w2 = 1 - beta``).
    hessian: exact mode: ``g1`` and ``g3`` become first-order Taylor expansions
      ``g(theta) + H(theta) e`` computed with exact Hessian-vector products
      (forward-over-reverse), instead of finite differences of gradients. As
      ``rho_prime -> 0`` both modes agree.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` (e.g. BatchNorm
      statistics of the extra passes) is discarded.
    axis_name: the data-parallel axis inside ``jax.pmap`` / ``jax.shard_map``.
      Not needed under ``jax.jit`` with a sharded batch, where gradients are
      already global.
    average: with ``axis_name``: ``'direction'`` (default, the released code)
      perturbs each device with its own shard's gradients (m-sharpness) and
      averages only ``d``; ``'gradients'`` averages every gradient (exact
      large-batch GAM, three more all-reduces). Pass the per-device ``g0``
      in both modes.
    mask: the parameters the perturbations may move: a pytree of bools like the
      params (or a prefix of it), or ``params -> such a tree``, as ``optax.masked``.
      The gradients are still taken, and ``d`` returned, for every parameter; the
      ascent steps move the selected leaves only, their length measured on them
      (e.g. SAM-ON: perturb only the normalisation layers). None: all.
    unroll: True (default): the model's gradient is traced, and compiled, once per extra
      gradient. False: once, in a ``jax.lax.scan`` over the three points (each computed from
      the gradients before it), the same arithmetic: a program about a third the size. On
      XLA:CPU keep the default: it canonicalises convolutions only outside loops, and a
      convolutional model's step runs ~10x slower in one (``experiments/RESULTS.md``,
      "Compile once"). With ``grad_fn``, ``i`` is then a traced int32 (1, 2, 3).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    keyword argument ``loss_fn(params) -> loss`` (or ``grad_fn(params, i) ->
    grads``, the convention of ``optax.contrib.sam``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax, gam_optax
    >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
    >>> tx = optax.chain(gam_optax.gam(rho=0.1, rho_prime=0.01), optax.sgd(0.1))
    >>> params = jnp.array([2.0, -1.0])
    >>> state = tx.init(params)
    >>> @jax.jit
    ... def step(params, state):
    ...     grads = jax.grad(loss)(params)
    ...     updates, state = tx.update(grads, state, params, loss_fn=loss)
    ...     return optax.apply_updates(params, updates), state
    >>> for _ in range(100):
    ...     params, state = step(params, state)
    >>> print(f"{loss(params):.2f}")  # the minimum is 0.578
    0.58

  References:
    Zhang, Xu, Yu, Zou and Cui, "Gradient Norm Aware Minimization Seeks
    First-Order Flatness and Improves Generalization", CVPR 2023,
    https://arxiv.org/abs/2303.03108
  """
    for arg, value in (("rho", rho), ("rho_prime", rho_prime)):
        check_nonnegative(arg, value, "gam", schedule=True)
    for arg, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        check_finite(arg, value, "gam")
    check_choice(
        "h_minus_weighting",
        h_minus_weighting,
        ("released", "paper"),
        "gam",
        " 'released': h_minus = g0 + |1 - beta| g2 (the published runs); 'paper': "
        "h_minus = beta g0 + (1 - beta) g2 (Algorithm 2).",
    )
    # h_minus = w0 g0 + w2 g2: g0 + |1 - beta| g2 as released, beta g0 + (1 - beta) g2 in the paper.
    w0, w2 = (1.0, abs(1.0 - beta)) if h_minus_weighting == "released" else (beta, 1.0 - beta)

    def direction(step: Step) -> optax.Updates:
        ascend = functools.partial(ascent_step, eps=eps, adaptive=adaptive, mask=step.mask)
        h_plus, h_minus = (_unrolled if unroll else _scanned)(
            step, step.value(rho), step.value(rho_prime), alpha=alpha, w0=w0, w2=w2, ascend=ascend
        )
        h_perp = orthogonal_part(h_minus, h_plus, eps)
        return add_scaled(h_plus, -gamma, h_perp)

    frame: dict[str, Any] = dict(
        eps=eps, has_aux=has_aux, axis_name=axis_name, average=average, mask=mask
    )
    flags = dict(adaptive=adaptive, hessian=hessian, unroll=unroll)
    return perturbation("gam", direction, exact=hessian, **flags, **frame)


# ----------------------------------------------------------------------------
# The three extra gradients, two formulations of the same arithmetic: each gradient is
# folded into the running sums h_+ and h_- (kept in at least float32) as it arrives. The
# scan's carry holds three parameter-sized vectors while a gradient is evaluated: the
# point, h_+ (or g0) and h_- (or g0). The unrolled program is scheduled by XLA (ordering
# it with optimization barriers did not lower its temporary memory).
# ----------------------------------------------------------------------------


def _up(tree: Params) -> Params:
    return jax.tree.map(upcast, tree)


def _axpy(a, x: Params, y: Params | None = None) -> Params:
    """``a * x (+ y)``, in at least float32 (the running sums)."""
    if y is None:
        return jax.tree.map(lambda u: a * upcast(u), x)
    return jax.tree.map(lambda u, v: v + a * upcast(u), x, y)


def _finish(h_plus: Params, h_minus: Params, step: Step) -> tuple[Params, Params]:
    """The sums in the dtypes of the gradients they add up: ``g1, g3`` (params'), ``g0``."""
    return cast_like(h_plus, step.params), cast_like(h_minus, step.g0)


def _unrolled(step, r, r_prime, *, alpha, w0, w2, ascend):
    """``(h_+, h_-)`` with the model's gradient traced three times (``unroll=True``)."""
    oracle, params, g0 = step.oracle, step.params, step.g0
    # theta1 = theta + rho' u(g0): a SAM step.
    g1 = oracle.after_step(params, g0, ascend(g0, params, r_prime), 1)
    # h0 = g1 - g0 ~ rho' H u(g0): theta2 ascends the gradient norm.
    theta2 = add(params, ascend(add_scaled(g1, -1.0, g0), params, r))
    h_plus = _axpy(alpha, g1)
    g2 = oracle.at(theta2, 2)
    h_minus = _axpy(w2, g2, _axpy(w0, g0))
    # theta3 = theta2 + rho' u(g2): a SAM step from theta2 (exact mode: g2 + H(theta2) e3).
    g3 = oracle.after_step(theta2, g2, ascend(g2, theta2, r_prime), 3)
    return _finish(_axpy(1.0 - alpha, g3, h_plus), h_minus, step)


def _scanned(step, r, r_prime, *, alpha, w0, w2, ascend):
    """``(h_+, h_-)`` with the model's gradient traced once (``unroll=False``).

    A ``jax.lax.scan`` over ``i = 0, 1, 2`` evaluates ``g_{i+1}`` at the point in its carry,
    then computes the next point and folds ``g_{i+1}`` into the sums, each of the three
    transitions chosen with ``jnp.where`` (the same arithmetic as :func:`_unrolled`). The
    carry ``(point, a, b)``: ``(theta1, g0, g0) -> (theta2, alpha g1, w0 g0) ->
    (theta3, alpha g1, w0 g0 + w2 g2) -> (-, h_+, h_-)``. In the exact mode the point is
    ``(x, e)`` and the pass gives ``g(x)`` and ``H(x) e``: ``(theta, e1)``, ``(theta2, 0)``,
    ``(theta2, e3)``; ``g1 = g0 + H e1``, ``g3 = g2 + H e3``.
    """
    oracle, params, g0 = step.oracle, step.params, step.g0
    g0_up = _up(g0)

    def transition(i, g, a, b, at):
        """The next point (from ``at``, the current base point), and the next sums."""
        theta2 = add(params, ascend(add_scaled(g, -1.0, a), params, r))  # i = 0: g = g1
        e3 = ascend(g, at, r_prime)  # i = 1: g = g2, at = theta2
        a = where(i == 0, _axpy(alpha, g), where(i == 2, _axpy(1.0 - alpha, g, a), a))
        b = where(i == 0, _axpy(w0, b), where(i == 1, _axpy(w2, g, b), b))
        return theta2, e3, a, b

    if not oracle.exact:

        def body(carry, i):
            point, a, b = carry
            g = oracle.at(point, i + 1)
            theta2, e3, a, b = transition(i, g, a, b, point)
            return (where(i == 0, theta2, add(point, e3)), a, b), None

        carry = (add(params, ascend(g0, params, r_prime)), g0_up, g0_up)
    else:

        def body(carry, i):
            x, e, a, b = carry
            g_x, hessian_e = oracle.gradient_and_hessian_product(x, e, i + 1)
            base = where(i == 0, cast_like(a, g0), g_x)  # g0 at i = 0, else g(x) = g2
            g = where(i == 1, g_x, add(base, hessian_e))
            theta2, e3, a, b = transition(i, g, a, b, x)
            zero = jax.tree.map(jnp.zeros_like, e3)
            return (where(i == 0, theta2, x), where(i == 0, zero, e3), a, b), None

        carry = (params, ascend(g0, params, r_prime), g0_up, g0_up)
    carry, _ = jax.lax.scan(body, carry, jnp.arange(3, dtype=jnp.int32))
    return _finish(carry[-2], carry[-1], step)
