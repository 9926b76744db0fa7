"""GAM: Gradient norm Aware Minimization (Zhang et al., CVPR 2023)."""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import optax

from gam_optax._frame import Algorithm, Options, PerturbationState, Probe, perturbation
from gam_optax._tree_math import Params, add_scaled, axpy, cast_like, orthogonal_part
from gam_optax._validation import (
    Average,
    Mask,
    check_bool,
    check_choice,
    check_finite,
    check_radius,
)

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
    flat: bool = True,
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
      the gradients before it), the same arithmetic: half the model's convolutions in the
      program. On XLA:CPU keep the default: it canonicalises convolutions only outside
      loops, and a small convolutional model's step was measured 41x slower in one (a
      quiet 2-core Xeon). With ``grad_fn``, ``i`` is then a traced
      int32 (1, 2, 3).
    flat: True (default): the arithmetic (norms, inner products, ascent steps, running
      sums) runs on one flat vector of the gradients, a few kernels whatever the number of
      parameter leaves; each point is computed leaf by leaf from it. Flattening a gradient
      holds it twice for a moment: where the parameters, not the activations, set the peak
      memory (a dense model on a small batch), the inline step then holds one more
      parameter copy, and False (leaf by leaf, a few kernels per leaf and operation) avoids
      it. Parameters sharded across devices (FSDP, tensor parallel): on an Explicit mesh
      the leaves split the same way are joined, each device's row its own shards (no
      gather); on an Auto mesh, whose types do not say the split, the step goes leaf by
      leaf (``tests/sharded``). Measured in ``experiments/RESULTS.md``.

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
        check_radius(arg, value, "gam")
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
    check_bool("hessian", hessian, "gam")
    # h_minus = w0 g0 + w2 g2: g0 + |1 - beta| g2 as released, beta g0 + (1 - beta) g2 in the paper.
    w0, w2 = (1.0, abs(1.0 - beta)) if h_minus_weighting == "released" else (beta, 1.0 - beta)

    # Each gradient is folded into h_+ and h_- (kept in at least float32) as it arrives.
    # h_+ holds g0 until g1 arrives: a scan then keeps no other copy of g0.
    def first(c):  # theta1 = theta + rho' u(g0)
        sums = Sums(h_plus=axpy(1.0, c.g0), h_minus=axpy(w0, c.g0))
        return sums, Probe(c.theta, c.ascend(c.g0, c.theta, c.value(rho_prime)))

    def at_theta1(c, sums, g1):  # h0 = g1 - g0 ~ rho' H u(g0): theta2 ascends ||grad L||
        theta2 = c.moved(c.theta, c.ascend(g1.change(sums.h_plus), c.theta, c.value(rho)))
        return sums._replace(h_plus=axpy(alpha, g1.gradient)), Probe(theta2)

    def at_theta2(c, sums, g2):  # theta3 = theta2 + rho' u(g2): a SAM step from theta2
        theta2 = g2.point
        e3 = c.ascend(g2.gradient, theta2, c.value(rho_prime))
        return sums._replace(h_minus=axpy(w2, g2.gradient, sums.h_minus)), Probe(theta2, e3)

    def at_theta3(c, sums, g3):
        return sums._replace(h_plus=axpy(1.0 - alpha, g3.gradient, sums.h_plus)), None

    def direction(c, sums):  # d = h_+ - gamma h_perp
        h_plus, h_minus = cast_like(sums.h_plus, c.g0), cast_like(sums.h_minus, c.g0)
        return add_scaled(h_plus, -gamma, orthogonal_part(h_minus, h_plus, eps))

    algorithm = Algorithm(first, (at_theta1, at_theta2, at_theta3), direction, exact=hessian)
    options = Options("gam", eps, adaptive, has_aux, axis_name, average, mask, unroll, flat)
    return perturbation(algorithm, options)


class Sums(NamedTuple):
    """GAM's running sums: ``h_+ = alpha g1 + (1 - alpha) g3``, ``h_- = w0 g0 + w2 g2``."""

    h_plus: Params
    h_minus: Params
