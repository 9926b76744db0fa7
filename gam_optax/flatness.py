r"""Flatness measures of a loss at given parameters.

Everything is computed from Hessian-vector products (``jax.jvp`` of
``jax.grad``), never a dense Hessian, for any parameter pytree:

* :func:`hessian_top_eigenvalue`: :math:`\lambda_{max}(H)` by Lanczos;
* :func:`hessian_trace`: :math:`\mathrm{tr}(H)` by Hutchinson's estimator;
* :func:`zeroth_order_flatness`: the sharpness SAM minimises,
  :math:`R_0 = \max_{\|\delta\|\le\rho} L(\theta+\delta) - L(\theta)`;
* :func:`first_order_flatness`: the flatness GAM minimises,
  :math:`R_1 = \rho\max_{\|\delta\|\le\rho}\|\nabla L(\theta+\delta)\|`;
* :func:`dataset_loss`: the mean loss over a stacked set of batches, so that
  every measure is taken on the data-set loss rather than one mini-batch.

``loss_fn(params) -> scalar`` is the loss to measure (a model in evaluation mode,
closed over its data). Each measure iterates a step (one Hessian-vector product
or gradient, and its bookkeeping) that is compiled with ``jax.jit`` once per
``loss_fn`` object and parameter shapes, whatever the number of iterations; the
loop over the steps runs in Python, because XLA:CPU runs a loop body
(``lax.fori_loop``) that contains convolutions several times slower than the same
body compiled on its own. A measure is deterministic for a given PRNG key.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from gam_optax import flatness
  >>> loss = lambda p: 0.5 * (3.0 * p["w"][0] ** 2 + p["w"][1] ** 2) + jnp.cos(p["b"])
  >>> params = {"w": jnp.array([0.5, -1.0]), "b": jnp.array(0.0)}
  >>> key = jax.random.key(0)
  >>> print(f"{flatness.hessian_top_eigenvalue(loss, params, key):.3f}")
  3.000
  >>> print(f"{flatness.hessian_trace(loss, params, key):.3f}")  # 3 + 1 - cos(0)
  3.000
  >>> print(f"{flatness.first_order_flatness(loss, params, rho=0.1):.4f}")
  0.2064

References:
  Zhang, Xu, Yu, Zou and Cui, "Gradient Norm Aware Minimization Seeks
  First-Order Flatness and Improves Generalization", CVPR 2023,
  https://arxiv.org/abs/2303.03108

  Foret, Kleiner, Mobahi and Neyshabur, "Sharpness-Aware Minimization for
  Efficiently Improving Generalization", ICLR 2021, https://arxiv.org/abs/2010.01412

  Hutchinson, "A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines", 1989; Lanczos, 1950.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from gam_optax import _validation

Params = Any
LossFn = Callable[[Params], jax.Array]

__all__ = [
    "dataset_loss",
    "first_order_flatness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "zeroth_order_flatness",
]


# ----------------------------------------------------------------------------
# Checks, made before anything is compiled.
# ----------------------------------------------------------------------------


def _check_count(name: str, value: Any, measure: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(
            f"{measure}: {name} must be an integer >= 1, got {_validation.describe(value)}. "
            f"Pass e.g. {name}=20."
        )


def _check_rho(rho: Any, measure: str) -> None:
    _validation.check_nonnegative("rho", rho, measure)


def _check_key(key: Any, measure: str) -> None:
    """``key`` is a PRNG key: typed (``jax.random.key``) or raw (``jax.random.PRNGKey``)."""
    if isinstance(key, jax.core.Tracer):
        return
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and jnp.shape(key) == (2,)
    if not ((typed and jnp.shape(key) == ()) or raw):
        raise TypeError(
            f"{measure}: key must be one PRNG key, e.g. key=jax.random.key(0), got "
            f"{_validation.describe(key)}."
        )


def _as_pytree(loss_fn: LossFn, params: Params, measure: str) -> Partial:
    """``loss_fn`` as a pytree (so that arrays it holds are traced), checked to be scalar."""
    _validation.check_arity(
        loss_fn, "loss_fn", ("the params",), measure, "lambda p: loss(p, batch)"
    )
    if not jax.tree.leaves(params):
        raise ValueError(f"{measure}: params has no leaves.")
    _validation.check_float_params(params, measure)
    out = jax.eval_shape(loss_fn, params)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"{measure}: loss_fn(params) must return a scalar loss, got {shape}. Reduce it "
            "(e.g. .mean() over the batch) and drop any auxiliary outputs."
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{measure}: loss_fn must return a floating-point scalar, got {out.dtype}.")
    return loss_fn if isinstance(loss_fn, Partial) else Partial(loss_fn)


def _checked_ball(
    measure: str, loss_fn: LossFn, params: Params, rho: Any, num_steps: Any, key: Any
) -> tuple[Partial, jax.Array]:
    """The checks of a search in the ball of radius ``rho``; ``(loss_fn as a pytree, key)``."""
    _check_rho(rho, measure)
    _check_count("num_steps", num_steps, measure)
    loss_fn = _as_pytree(loss_fn, params, measure)
    key = jax.random.key(0) if key is None else key
    _check_key(key, measure)
    return loss_fn, key


# ----------------------------------------------------------------------------
# The loss on a flat parameter vector.
# ----------------------------------------------------------------------------


def _flat_params(params: Params):
    """``(x0, unravel)``: the parameters as one flat vector (at least float32)."""
    x0, unravel = ravel_pytree(params)
    return x0.astype(jnp.promote_types(x0.dtype, jnp.float32)), unravel


def _flat(loss_fn: LossFn, params: Params):
    """``(x0, loss, grad, hvp)`` on the flattened parameters ``x``."""
    x0, unravel = _flat_params(params)
    loss = lambda x: loss_fn(unravel(x))
    grad = jax.grad(loss)
    hvp = lambda x, v: jax.jvp(grad, (x,), (v,))[1]
    return x0, loss, grad, hvp


def _norm(v: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(v)))


def _unit(v: jax.Array) -> jax.Array:
    """``v / ||v||``, and zeros for a zero vector."""
    norm = _norm(v)
    return jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1.0), 0.0)


def _random_unit(key: jax.Array, like: jax.Array) -> jax.Array:
    """A random unit vector of the shape and dtype of ``like``."""
    return _unit(jax.random.normal(key, like.shape, like.dtype))


# ----------------------------------------------------------------------------
# Hessian spectrum.
# ----------------------------------------------------------------------------


@jax.jit
def _hvp(loss_fn, params, v):
    """``H v`` at ``params``, on flat vectors."""
    x0, _, _, hvp = _flat(loss_fn, params)
    return hvp(x0, v)


def _orthogonalise(w, basis):
    # Full re-orthogonalisation against every stored vector (unfilled rows are
    # zero), twice for numerical stability.
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


@jax.jit
def _lanczos_step(basis, hv, restart, j):
    """Step ``j`` from ``hv = H basis[j]``: ``alpha_j``, ``beta_j`` and basis row ``j + 1``."""
    k = len(basis)
    tiny = 100 * jnp.finfo(basis.dtype).eps
    v = basis[j]
    alpha = jnp.vdot(v, hv)
    w = _orthogonalise(hv, basis)
    beta = _norm(w)
    # Breakdown: the Krylov space is invariant (e.g. a zero or low-rank Hessian).
    # Continue, with no coupling, from a random vector orthogonal to the basis (the
    # j-th rotation of one Gaussian vector: the rotations are independent a.s.).
    broke = beta <= tiny * _norm(hv)
    fresh = _orthogonalise(jnp.roll(restart, j), basis)
    next_v = jnp.where(broke, _unit(fresh), w / jnp.where(broke, 1.0, beta))
    last = j + 1 >= k
    basis = basis.at[jnp.minimum(j + 1, k - 1)].set(jnp.where(last, basis[k - 1], next_v))
    return basis, alpha, jnp.where(broke | last, 0.0, beta)


@jax.jit
def _top_ritz_pair(basis, alphas, betas, by_magnitude):
    alphas, betas = jnp.stack(alphas), jnp.stack(betas)
    tridiagonal = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    ritz_values, ritz_vectors = jnp.linalg.eigh(tridiagonal)
    index = jnp.argmax(jnp.where(by_magnitude, jnp.abs(ritz_values), ritz_values))
    return ritz_values[index], _unit(basis.T @ ritz_vectors[:, index])


def _lanczos(loss_fn, params, key, num_iterations, by_magnitude):
    x0, unravel = _flat_params(params)
    k = min(num_iterations, x0.size)  # k = n spans the whole space: the result is exact.
    start_key, restart_key = jax.random.split(key)
    restart = jax.random.normal(restart_key, x0.shape, x0.dtype)
    basis = jnp.zeros((k, x0.size), x0.dtype).at[0].set(_random_unit(start_key, x0))
    alphas, betas = [], []
    for j in range(k):
        # Two compiled steps: the Hessian-vector product, compiled whatever k is, and
        # the cheap bookkeeping on the (k, n) basis.
        hv = _hvp(loss_fn, params, basis[j])
        basis, alpha, beta = _lanczos_step(basis, hv, restart, j)
        alphas.append(alpha)
        betas.append(beta)
    value, eigenvector = _top_ritz_pair(basis, alphas, betas, by_magnitude)
    return value, unravel(eigenvector)


def hessian_top_eigenvalue(
    loss_fn: LossFn,
    params: Params,
    key: jax.Array,
    num_iterations: int = 20,
    *,
    largest: Literal["algebraic", "magnitude"] = "algebraic",
    return_eigenvector: bool = False,
) -> jax.Array | tuple[jax.Array, Params]:
    r"""The top eigenvalue of the Hessian of ``loss_fn`` at ``params``, by Lanczos.

    ``num_iterations`` steps of the Lanczos iteration with full
    re-orthogonalisation, from a random start, build :math:`V^\top H V` on a
    Krylov space; its largest eigenvalue (a Ritz value) converges to
    :math:`\lambda_{max}(H)` much faster than power iteration, and is exact when
    ``num_iterations`` is at least the number of parameters. Ritz values lie
    inside the spectrum, so the estimate never overshoots: a lower bound of
    :math:`\lambda_{max}` (of :math:`\max|\lambda|` with ``largest='magnitude'``).

    Memory: ``num_iterations`` vectors of the size of ``params``.

    Args:
      loss_fn: ``params -> scalar loss``.
      params: the point, any pytree of floating-point arrays.
      key: a PRNG key for the random start.
      num_iterations: the number of Hessian-vector products (>= 1).
      largest: ``'algebraic'`` (default): the largest eigenvalue
        :math:`\lambda_{max}`, the usual sharpness; ``'magnitude'``: the
        eigenvalue of largest absolute value (what power iteration finds).
      return_eigenvector: also return the unit eigenvector, a pytree like params.

    Returns:
      The eigenvalue, a scalar array (and the eigenvector). A zero Hessian gives 0.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from gam_optax import flatness
      >>> A = jnp.array([[2.0, 1.0], [1.0, 2.0]])
      >>> loss = lambda x: 0.5 * x @ A @ x
      >>> value, vector = flatness.hessian_top_eigenvalue(
      ...     loss, jnp.zeros(2), jax.random.key(0), return_eigenvector=True)
      >>> print(f"{value:.3f}", jnp.round(jnp.abs(vector), 3))
      3.000 [0.707 0.707]
    """
    measure = "hessian_top_eigenvalue"
    _check_count("num_iterations", num_iterations, measure)
    _validation.check_choice("largest", largest, ("algebraic", "magnitude"), measure)
    _validation.check_bool("return_eigenvector", return_eigenvector, measure)
    _check_key(key, measure)
    loss_fn = _as_pytree(loss_fn, params, measure)
    value, vector = _lanczos(loss_fn, params, key, num_iterations, largest == "magnitude")
    return (value, vector) if return_eigenvector else value


@jax.jit
def _hutchinson_sample(loss_fn, params, key, i):
    """``z^T H z`` for the ``i``-th Rademacher probe ``z``."""
    x0, _, _, hvp = _flat(loss_fn, params)
    z = jax.random.rademacher(jax.random.fold_in(key, i), x0.shape, x0.dtype)
    return jnp.vdot(z, hvp(x0, z))


def _hutchinson(loss_fn, params, key, num_samples):
    total = sum(_hutchinson_sample(loss_fn, params, key, i) for i in range(num_samples))
    return total / num_samples


def hessian_trace(
    loss_fn: LossFn, params: Params, key: jax.Array, num_samples: int = 16
) -> jax.Array:
    r"""Hutchinson's estimate of the trace of the Hessian of ``loss_fn`` at ``params``.

    .. math::
      \mathrm{tr}(H) \approx \frac{1}{N} \sum_{i=1}^N z_i^\top H z_i,
      \qquad z_i \in \{-1, +1\}^n \text{ (Rademacher)}

    Unbiased, with variance :math:`2 \sum_{i \ne j} H_{ij}^2 / N`: exact for a
    diagonal Hessian, otherwise the error shrinks as :math:`1/\sqrt{N}`.

    Args:
      loss_fn: ``params -> scalar loss``.
      params: the point, any pytree of floating-point arrays.
      key: a PRNG key for the probe vectors.
      num_samples: ``N``, the number of Hessian-vector products (>= 1).

    Returns:
      The estimate, a scalar array.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from gam_optax import flatness
      >>> loss = lambda x: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * x**2)
      >>> print(f"{flatness.hessian_trace(loss, jnp.ones(3), jax.random.key(0)):.3f}")
      12.000
    """
    measure = "hessian_trace"
    _check_count("num_samples", num_samples, measure)
    _check_key(key, measure)
    loss_fn = _as_pytree(loss_fn, params, measure)
    return _hutchinson(loss_fn, params, key, num_samples)


# ----------------------------------------------------------------------------
# Zeroth- and first-order flatness: maxima over the rho-ball.
# ----------------------------------------------------------------------------


@jax.jit
def _loss_step(loss_fn, params, rho, delta, fallback):
    """``L(x0 + delta)``, and the boundary point that maximises the linearised loss
    there, ``rho u(grad)`` (the SAM step from ``x0 + delta``; ``fallback`` where the
    gradient is zero)."""
    x0, loss, _, _ = _flat(loss_fn, params)
    value, g = jax.value_and_grad(loss)(x0 + delta)
    return value, jnp.where(_norm(g) > 0, rho * _unit(g), fallback)


def _max_loss(loss_fn, params, rho, key, num_steps):
    x0, _ = _flat_params(params)
    rho = jnp.asarray(rho, x0.dtype)
    zero = jnp.zeros_like(x0)
    loss0, delta = _loss_step(loss_fn, params, rho, zero, rho * _random_unit(key, x0))
    best = loss0
    for _ in range(num_steps):
        value, delta = _loss_step(loss_fn, params, rho, delta, delta)
        best = jnp.maximum(best, value)
    return best - loss0


def zeroth_order_flatness(
    loss_fn: LossFn,
    params: Params,
    rho: float | jax.Array,
    num_steps: int = 10,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""Zeroth-order flatness (SAM's sharpness): the largest loss increase in the rho-ball.

    .. math::
      R_0(\theta) = \max_{\|\delta\| \le \rho} L(\theta + \delta) - L(\theta)

    By projected gradient ascent with an unbounded step: from
    :math:`\delta_1 = \rho\,u(\nabla L(\theta))` (SAM's step), each step moves
    to the boundary point that maximises the linearised loss,
    :math:`\delta_{k+1} = \rho\,u(\nabla L(\theta + \delta_k))`. The largest
    loss among :math:`\theta` and the ``num_steps`` visited points is returned,
    so the estimate is a lower bound of :math:`R_0` that never decreases with
    ``num_steps``; for a convex loss every step increases the loss. At an exact
    critical point (zero gradient) the first step is in a random direction.

    Args:
      loss_fn: ``params -> scalar loss``.
      params: the point, any pytree of floating-point arrays.
      rho: the radius (>= 0), one global L2 norm over the pytree.
      num_steps: the number of loss-and-gradient evaluations in the ball (>= 1);
        1 gives SAM's one-step estimate.
      key: a PRNG key, used only at an exact critical point (default: key 0).

    Returns:
      :math:`\max L - L(\theta) \ge 0`, a scalar array.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gam_optax import flatness
      >>> loss = lambda x: 0.5 * jnp.sum(jnp.array([4.0, 1.0]) * x**2)
      >>> # At the minimum: 0.5 * rho^2 * lambda_max = 0.5 * 0.01 * 4.
      >>> print(f"{flatness.zeroth_order_flatness(loss, jnp.zeros(2), rho=0.1, num_steps=30):.4f}")
      0.0200
    """
    loss_fn, key = _checked_ball("zeroth_order_flatness", loss_fn, params, rho, num_steps, key)
    return _max_loss(loss_fn, params, rho, key, num_steps)


@jax.jit
def _gradient_norm_step(loss_fn, params, rho, delta, fallback):
    """``||g||`` at ``x0 + delta``, and ``rho u(f)``, ``f = H u(g)`` the gradient of
    ``||g||`` there (``fallback`` where ``f`` is zero)."""
    x0, _, grad, hvp = _flat(loss_fn, params)
    x = x0 + delta
    g = grad(x)
    f = hvp(x, _unit(g))
    return _norm(g), jnp.where(_norm(f) > 0, rho * _unit(f), fallback)


def _max_gradient_norm(loss_fn, params, rho, key, num_steps):
    x0, _ = _flat_params(params)
    rho = jnp.asarray(rho, x0.dtype)
    zero = jnp.zeros_like(x0)
    # theta_adv of GAM's Algorithm 1 (a random direction where f = 0 at theta).
    best, delta = _gradient_norm_step(loss_fn, params, rho, zero, rho * _random_unit(key, x0))
    for _ in range(num_steps):
        norm, delta = _gradient_norm_step(loss_fn, params, rho, delta, delta)
        best = jnp.maximum(best, norm)
    return rho * best


def first_order_flatness(
    loss_fn: LossFn,
    params: Params,
    rho: float | jax.Array,
    num_steps: int = 10,
    *,
    key: jax.Array | None = None,
) -> jax.Array:
    r"""First-order flatness (GAM's :math:`R_1`): rho times the largest gradient norm in the ball.

    .. math::
      R_1(\theta) = \rho \max_{\|\delta\| \le \rho} \|\nabla L(\theta + \delta)\|

    By the same ascent as :func:`zeroth_order_flatness`, on :math:`\|\nabla L\|`,
    whose gradient is the Hessian-vector product :math:`f = H u(\nabla L)`: from
    GAM's :math:`\delta_1 = \rho\,u(f(\theta))`, :math:`\delta_{k+1} = \rho\,
    u(f(\theta + \delta_k))`. The largest gradient norm among :math:`\theta` and
    the visited points is used: a lower bound of :math:`R_1`, never decreasing
    with ``num_steps``. Where :math:`f(\theta) = 0` (an exact critical point, or
    a zero Hessian) the first step is in a random direction.

    Args:
      loss_fn: ``params -> scalar loss``.
      params: the point, any pytree of floating-point arrays.
      rho: the radius (>= 0).
      num_steps: the number of (gradient, Hessian-vector product) evaluations in
        the ball (>= 1).
      key: a PRNG key, used only where :math:`f(\theta) = 0` (default: key 0).

    Returns:
      :math:`R_1 \ge \rho\|\nabla L(\theta)\|`, a scalar array.

    Examples:
      >>> import jax.numpy as jnp
      >>> from gam_optax import flatness
      >>> loss = lambda x: jnp.sum(x) + 0.5 * jnp.sum(x**2)  # gradient 1 + x
      >>> # max ||1 + x + delta|| over the ball is ||1|| + rho = sqrt(2) + 0.1.
      >>> print(f"{flatness.first_order_flatness(loss, jnp.zeros(2), rho=0.1):.4f}")
      0.1514
    """
    loss_fn, key = _checked_ball("first_order_flatness", loss_fn, params, rho, num_steps, key)
    return _max_gradient_norm(loss_fn, params, rho, key, num_steps)


# ----------------------------------------------------------------------------
# The data-set loss.
# ----------------------------------------------------------------------------


def _mean_over_batches(loss_fn, batches, params):
    # jax.checkpoint: differentiating through the map keeps one batch's
    # activations at a time, not all of them.
    per_batch = jax.lax.map(jax.checkpoint(lambda batch: loss_fn(params, batch)), batches)
    return jnp.mean(per_batch)


def dataset_loss(loss_fn: Callable[[Params, Any], jax.Array], batches: Any) -> LossFn:
    r"""The mean loss over a stacked set of equal-sized batches, as ``params -> loss``.

    .. math::
      L(\theta) = \frac{1}{B} \sum_{b=1}^{B} \ell(\theta, \text{batch}_b)

    which is the data-set loss when ``loss_fn`` is the batch mean. The batches
    are visited one at a time with ``jax.lax.map`` (memory of one batch), and
    the returned function is a pytree, so the batches are arguments of the
    compiled steps of a measure, not constants folded into it.

    Args:
      loss_fn: ``(params, batch) -> scalar`` mean loss of one batch.
      batches: a pytree whose leaves have a leading axis of length ``B``
        (e.g. ``{'x': [B, batch, ...], 'y': [B, batch]}``).

    Returns:
      ``params -> scalar``, for any measure of this module.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from gam_optax import flatness
      >>> x = jnp.arange(12.0).reshape(3, 4)  # 3 batches of 4 points
      >>> loss = flatness.dataset_loss(lambda w, xb: jnp.mean((w * xb - 1.0) ** 2), x)
      >>> bool(jnp.allclose(loss(0.5), jnp.mean((0.5 * x - 1.0) ** 2)))
      True
      >>> print(f"{flatness.hessian_top_eigenvalue(loss, 0.5, jax.random.key(0)):.3f}")
      84.333
    """
    _validation.check_arity(
        loss_fn,
        "loss_fn",
        ("the params", "a batch"),
        "dataset_loss",
        "lambda p, batch: loss(p, batch)",
    )
    leaves = jax.tree.leaves(batches)
    if not leaves:
        raise ValueError("dataset_loss: batches has no leaves.")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            "dataset_loss: every leaf of batches needs the same leading (batch-index) axis of "
            f"length >= 1; got leading sizes {sorted(s for s in sizes if s is not None)}"
            f"{' and scalars' if None in sizes else ''}."
        )
    inner = loss_fn if isinstance(loss_fn, Partial) else Partial(loss_fn)
    return Partial(_mean_over_batches, inner, batches)
