"""SAM, ASAM and GSAM: the sharpness-aware family GAM is compared with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gam_optax._frame import Algorithm, Options, PerturbationState, Probe, perturbation
from gam_optax._schedules import proportional_schedule
from gam_optax._tree_math import add_scaled, orthogonal_part
from gam_optax._validation import Average, Mask, check_finite, check_radius

SAMState = PerturbationState  # the state of sam and gsam: the step count


def sam(
    rho: optax.ScalarOrSchedule = 0.05,
    *,
    adaptive: bool = False,
    eps: float | jax.Array = 1e-12,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: Average = "direction",
    mask: Mask | None = None,
    unroll: bool = True,
    flat: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-Aware Minimization (SAM), and ASAM with ``adaptive=True``.

    Place it first in a chain. The incoming updates are the caller's gradient
    :math:`g_0 = \nabla L(\theta)`; the transformation evaluates one more
    gradient of the same mini-batch loss and returns it as the direction:

    .. math::
      e = \rho\,\frac{g_0}{\|g_0\| + \xi}
      \quad\text{or (ASAM)}\quad
      e = \rho\,\frac{g_0 \odot \theta^2}{\|g_0 \odot |\theta|\| + \xi},
      \qquad d = \nabla L(\theta + e)

    with one global norm over the whole pytree.

    Compared with ``optax.contrib.sam``: ``transparent(sam(rho, eps=0), opt)`` is its
    default mode with the adversarial optimizer ``chain(contrib.normalize(), sgd(rho))``
    (tested); here ``eps`` keeps a zero gradient finite (optax divides by the bare norm),
    ``rho`` may be a schedule, ``loss_fn`` may replace ``grad_fn`` (called with ``i = 1``,
    optax: ``i = 0``), ``adaptive`` gives ASAM and ``average='gradients'`` exact
    large-batch SAM.

    Args:
      rho: the radius, a number or an optax schedule of the step count (see
        :func:`proportional_schedule`).
      adaptive: ASAM's element-wise step, scaled by the parameters. Use a
        larger ``rho`` (ASAM's authors suggest about 10x, e.g. 2.0 on CIFAR).
      eps: ``xi``, added to the norm denominator.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is discarded.
      axis_name: the data-parallel axis inside ``jax.pmap`` / ``jax.shard_map``.
        Not needed under ``jax.jit`` with a sharded batch.
      average: with ``axis_name``: ``'direction'`` (default, the SAM paper's
        m-sharpness) perturbs each device with its own shard's gradient and
        averages only ``d``; ``'gradients'`` averages ``g0`` and ``g1`` (exact
        large-batch SAM). Pass the per-device ``g0`` in both modes.
      mask: the parameters the perturbations may move: a pytree of bools like the
        params (or a prefix of it), or ``params -> such a tree``, as ``optax.masked``.
        The gradients are still taken, and ``d`` returned, for every parameter; the
        ascent steps move the selected leaves only, their length measured on them
        (e.g. SAM-ON: perturb only the normalisation layers). None: all.
      unroll: True (default): the gradient is traced inline. False: in a one-step
        ``jax.lax.scan``, as every member's ``unroll=False`` (see :func:`gam`).
      flat: False (default): the arithmetic leaf by leaf. True: on one flat vector of the
        gradients, a few kernels whatever the number of leaves, for one more parameter copy
        at a moment (see :func:`gam`'s ``flat``); SAM's arithmetic is one norm and a step,
        so the copy rarely pays.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
      keyword argument ``loss_fn(params) -> loss`` (or ``grad_fn(params, i) ->
      grads``).

    Examples:
      One update on ``L = ||theta||^2``: ``g0 = 2 theta = (6, 8)``, ``e = 0.5 g0 / ||g0|| =
      (0.3, 0.4)``, and the direction is the gradient at ``theta + e``:

      >>> import jax, jax.numpy as jnp, gam_optax
      >>> loss = lambda p: jnp.sum(p**2)
      >>> params = jnp.array([3.0, 4.0])
      >>> tx = gam_optax.sam(rho=0.5)
      >>> d, state = tx.update(jax.grad(loss)(params), tx.init(params), params, loss_fn=loss)
      >>> print(d)
      [6.6 8.8]

      Place it first in a chain: ``optax.chain(gam_optax.sam(0.05), optax.sgd(0.1))``.

    References:
      Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for
      Efficiently Improving Generalization", ICLR 2021,
      https://arxiv.org/abs/2010.01412

      Kwon, Kim, Park and Choi, "ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks", ICML 2021,
      https://arxiv.org/abs/2102.11600
    """
    check_radius("rho", rho, "sam")
    algorithm = Algorithm(sam_probe(rho), (keep_gradient,), lambda c, g1: g1)
    options = Options("sam", eps, adaptive, has_aux, axis_name, average, mask, unroll, flat)
    return perturbation(algorithm, options)


def sam_probe(rho: optax.ScalarOrSchedule):
    """``c -> (carry, probe)``: the point ``theta + e`` of SAM's gradient ``g1``."""

    def first(c):
        g1 = jax.tree.map(jnp.zeros_like, c.g0)  # not taken yet
        return g1, Probe(c.theta, c.ascend(c.g0, c.theta, c.value(rho)))

    return first


def keep_gradient(c, carry, g1):
    """The step that keeps the gradient it receives, ``g1``, as the carry."""
    del c, carry
    return g1.gradient, None


def gsam(
    rho: optax.ScalarOrSchedule = 0.05,
    alpha: float | jax.Array = 0.1,
    *,
    eps: float | jax.Array = 1e-12,
    adaptive: bool = False,
    has_aux: bool = False,
    axis_name: str | None = None,
    average: Average = "direction",
    mask: Mask | None = None,
    unroll: bool = True,
    flat: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Surrogate Gap guided Sharpness-Aware Minimization (GSAM).

    SAM's gradient :math:`g_1`, minus ``alpha`` times the part of the plain
    gradient :math:`g_0` orthogonal to it (which descends the surrogate gap
    :math:`L(\theta + e) - L(\theta)` without changing the SAM loss to first
    order):

    .. math::
      g_1 &= \nabla L(\theta + e), \qquad e = \rho_t\,\frac{g_0}{\|g_0\| + \xi}
        \quad(\text{ASAM step if adaptive}) \\
      g_\perp &= g_0 - \cos(g_0, g_1)\,\|g_0\|\,\frac{g_1}{\|g_1\| + \xi},
      \qquad d = g_1 - \alpha\,g_\perp

    ``alpha = 0`` is :func:`sam`. The defaults (SAM's radius, a moderate
    correction) are a starting point, not a published setting. The paper ties
    :math:`\rho_t` to the learning rate: pass ``rho=gam_optax.proportional_schedule(
    lr, lr_max, lr_min, rho_max, rho_min)``. :func:`gsam_preset` gives the
    published settings.

    Args:
      rho: the radius of the SAM step, a number or an optax schedule.
      alpha: the strength of the surrogate-gap correction.
      eps: ``xi``, added to every norm denominator.
      adaptive: ASAM's element-wise perturbation (the decomposition keeps plain
        norms, as in the authors' PyTorch code).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is discarded.
      axis_name: the data-parallel axis inside ``jax.pmap`` / ``jax.shard_map``.
      average: with ``axis_name``: ``'direction'`` (default, the released code)
        decomposes per device and averages only ``d``; ``'gradients'``
        averages ``g0`` and ``g1`` (exact large-batch GSAM).
      mask: the parameters the SAM step may move, as in :func:`sam`. None: all.
      unroll: as in :func:`sam`.
      flat: as in :func:`sam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` takes
      ``loss_fn`` (or ``grad_fn``) like :func:`sam`.

    Examples:
      >>> import optax, gam_optax
      >>> lr = optax.cosine_decay_schedule(0.1, decay_steps=100)
      >>> rho = gam_optax.proportional_schedule(lr, 0.1, 0.0, max_value=0.1, min_value=0.01)
      >>> print(f"{rho(0):.2f} {rho(100):.2f}")  # rho follows the learning rate
      0.10 0.01
      >>> tx = optax.chain(gam_optax.gsam(rho, alpha=0.3), optax.sgd(lr))

    References:
      Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan and Liu,
      "Surrogate Gap Minimization Improves Sharpness-Aware Training", ICLR 2022,
      https://arxiv.org/abs/2203.08065
    """
    check_radius("rho", rho, "gsam")
    check_finite("alpha", alpha, "gsam")

    def direction(c, g1):  # the part of g0 orthogonal to g1 descends the surrogate gap
        return add_scaled(g1, -alpha, orthogonal_part(c.g0, g1, eps))

    algorithm = Algorithm(sam_probe(rho), (keep_gradient,), direction)
    options = Options("gsam", eps, adaptive, has_aux, axis_name, average, mask, unroll, flat)
    return perturbation(algorithm, options)


# ----------------------------------------------------------------------------
# Published settings.
# ----------------------------------------------------------------------------

# name -> keyword arguments of sam().
SAM_PRESETS: Mapping[str, Mapping[str, Any]] = {
    # SAM paper (arXiv 2010.01412), CIFAR WideResNet/PyramidNet.
    "sam_cifar10": dict(rho=0.05),
    "sam_cifar100": dict(rho=0.1),
    # ASAM, as suggested by its authors for CIFAR-10 WRN-16-8 (davda54/sam,
    # whose element-wise step is the one implemented here, without ASAM's eta).
    "asam_cifar10": dict(rho=2.0, adaptive=True),
}

# name -> GSAM settings. rho_max/rho_min: rho follows the learning rate between
# lr_min and lr_max (proportional_schedule); equal values mean a constant rho.
GSAM_PRESETS: Mapping[str, Mapping[str, Any]] = {
    # big_vision configs/proj/gsam/vit_i1k_gsam_no_aug.py: ViT-B/32, Adam,
    # lr 0.003 linearly decayed to 0.01 * lr.
    "gsam_imagenet_vit": dict(rho_max=0.6, rho_min=0.1, alpha=0.6, adaptive=False),
    # The authors' PyTorch example (WRN-16-8, CIFAR-10, ASAM-style step),
    # juntang-zhuang/GSAM example/train.py: its --alpha default was 0.2 until commit
    # 704942d (2022-03-30) changed it to 0.4, the current default followed here.
    "gsam_cifar10": dict(rho_max=2.0, rho_min=2.0, alpha=0.4, adaptive=True),
}


def sam_preset(name: str) -> dict[str, Any]:
    """Published settings of SAM / ASAM, as keyword arguments of :func:`sam`.

    Examples:
      >>> import gam_optax
      >>> gam_optax.sam_preset("asam_cifar10")
      {'rho': 2.0, 'adaptive': True}
      >>> tx = gam_optax.sam(**gam_optax.sam_preset("sam_cifar100"))
    """
    if not (isinstance(name, str) and name in SAM_PRESETS):
        raise ValueError(
            f"sam_preset: unknown SAM preset {name!r}; pass one of {sorted(SAM_PRESETS)} as name."
        )
    return dict(SAM_PRESETS[name])


def gsam_preset(
    name: str,
    lr_schedule: optax.Schedule | None = None,
    lr_max: float | None = None,
    lr_min: float | None = None,
) -> dict[str, Any]:
    """Published settings of GSAM, as keyword arguments of :func:`gsam`.

    Where the preset's ``rho`` follows the learning rate, pass the learning-rate
    schedule and its extreme values; ``rho`` is then a
    :func:`proportional_schedule`.

    Examples:
      >>> import optax, gam_optax
      >>> gam_optax.gsam_preset("gsam_cifar10")
      {'rho': 2.0, 'alpha': 0.4, 'adaptive': True}
      >>> lr = optax.linear_schedule(3e-3, 3e-5, transition_steps=1000)
      >>> kwargs = gam_optax.gsam_preset("gsam_imagenet_vit", lr, lr_max=3e-3, lr_min=3e-5)
      >>> print(f"{kwargs['rho'](0):.2f} {kwargs['rho'](1000):.2f}")
      0.60 0.10
      >>> tx = gam_optax.gsam(**kwargs)
    """
    if not (isinstance(name, str) and name in GSAM_PRESETS):
        raise ValueError(
            f"gsam_preset: unknown GSAM preset {name!r}; "
            f"pass one of {sorted(GSAM_PRESETS)} as name."
        )
    preset = dict(GSAM_PRESETS[name])
    rho_max, rho_min = preset.pop("rho_max"), preset.pop("rho_min")
    if rho_max == rho_min:
        return {"rho": rho_max, **preset}
    if lr_schedule is None or lr_max is None or lr_min is None:
        raise ValueError(
            f"gsam_preset({name!r}): rho follows the learning rate from {rho_max} at lr_max to "
            f"{rho_min} at lr_min; pass lr_schedule, lr_max and lr_min."
        )
    rho = proportional_schedule(lr_schedule, lr_max, lr_min, max_value=rho_max, min_value=rho_min)
    return {"rho": rho, **preset}
