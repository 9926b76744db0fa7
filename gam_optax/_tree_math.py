"""Tree maths: one L2 norm over the whole pytree, ascent steps, running sums.

Every transformation of the family moves the parameters a small distance along a
normalised direction and combines gradients. Norms and inner products are accumulated
in at least float32, so that bfloat16 parameters do not lose the perturbation's length;
each result comes back in the dtypes of the tree it is like.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = Any


def upcast(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def vdot(a: Params, b: Params) -> jax.Array:
    """``<a, b>`` summed over every leaf, in at least float32: a sum of per-leaf sums of
    products, so a sharded leaf gives a scalar all-reduce, never a gather (no ravel)."""
    products = jax.tree.map(lambda x, y: jnp.sum(upcast(x) * upcast(y)), a, b)
    return sum(jax.tree.leaves(products), jnp.zeros([], jnp.float32))


def global_norm(tree: Params) -> jax.Array:
    """``||v||``: one L2 norm over every leaf of the pytree (never per leaf)."""
    return jnp.sqrt(vdot(tree, tree))


def safe_inverse(norm: jax.Array, eps: jax.Array | float) -> jax.Array:
    """``1 / (norm + eps)``, and 0 where ``norm == 0`` (a zero vector stays zero)."""
    norm_or_one = jnp.where(norm > 0, norm, 1.0)
    return jnp.where(norm > 0, 1.0 / (norm_or_one + eps), 0.0)


def scale(tree: Params, factor: jax.Array | float) -> Params:
    """``factor * tree``, keeping every leaf's dtype."""
    return jax.tree.map(lambda x: (factor * upcast(x)).astype(x.dtype), tree)


def add_scaled(a: Params, factor: jax.Array | float, b: Params) -> Params:
    """``a + factor * b``, in the dtypes of ``a``."""
    return jax.tree.map(lambda x, y: (upcast(x) + factor * upcast(y)).astype(x.dtype), a, b)


def select(tree: Params, mask: Params | None) -> Params:
    """``tree`` with the entries outside ``mask`` set to zero: ``mask`` is like ``tree``, its
    leaves Python bools (a whole leaf) or constant bool arrays (a flat view's rows)."""
    if mask is None:
        return tree

    def keep(v, flag):
        if isinstance(flag, np.ndarray):
            return jnp.where(flag, v, jnp.zeros_like(v))
        return v if flag else jnp.zeros_like(v)

    return jax.tree.map(keep, tree, mask)


def ascent_step(
    direction: Params,
    at: Params,
    radius: jax.Array | float,
    *,
    eps: jax.Array | float,
    adaptive: bool = False,
    mask: Params | None = None,
) -> Params:
    r"""The perturbation ``e`` of length ``radius`` along ``direction``, taken at ``at``.

    .. math::
      e = r \frac{v}{\|v\| + \xi}
      \qquad\text{or, adaptive:}\qquad
      e = r \frac{v \odot \theta_c^2}{\|v \odot |\theta_c|\| + \xi}

    Args:
      direction: ``v``, a pytree like the parameters.
      at: ``theta_c``, the point the step starts from (used only when adaptive).
      radius: ``r``.
      eps: ``xi``.
      adaptive: the ASAM-style step, scaled element-wise by the parameters.
      mask: a tree of bools like ``at`` (``resolve_mask``): the step moves the selected
        leaves only, and its length is measured on them.

    Returns:
      ``e``, in the dtypes of ``at``.
    """
    direction = select(direction, mask)
    if not adaptive:
        inverse = safe_inverse(global_norm(direction), eps)
        return jax.tree.map(
            lambda v, p: (radius * inverse * upcast(v)).astype(p.dtype), direction, at
        )
    weighted = jax.tree.map(lambda v, p: upcast(v) * jnp.abs(upcast(p)), direction, at)
    inverse = safe_inverse(global_norm(weighted), eps)
    return jax.tree.map(
        lambda v, p: (radius * inverse * upcast(v) * jnp.square(upcast(p))).astype(p.dtype),
        direction,
        at,
    )


def orthogonal_part(v: Params, u: Params, eps: jax.Array | float) -> Params:
    r"""The part of ``v`` orthogonal to ``u`` (GSAM's and GAM's decomposition).

    .. math::
      \cos = \frac{\langle v, u\rangle}{\|u\|\,\|v\| + \xi},\qquad
      v_\perp = v - \cos\,\|v\|\,\frac{u}{\|u\| + \xi}

    Zero vectors give a finite result.
    """
    norm_u, norm_v = global_norm(u), global_norm(v)
    denominator = norm_u * norm_v
    cos = vdot(v, u) * safe_inverse(denominator, eps)
    return add_scaled(v, -cos * norm_v * safe_inverse(norm_u, eps), u)


def cast_like(tree: Params, like: Params) -> Params:
    """Each leaf of ``tree`` in the dtype of the matching leaf of ``like``."""
    return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def add(a: Params, b: Params) -> Params:
    """``a + b``, leaf by leaf."""
    return jax.tree.map(jnp.add, a, b)


def subtract(a: Params, b: Params) -> Params:
    """``a - b``, leaf by leaf."""
    return jax.tree.map(jnp.subtract, a, b)


def axpy(a: Any, x: Params, y: Params | None = None) -> Params:
    """``a * x (+ y)`` in at least float32: a running sum of gradients."""
    if y is None:
        return jax.tree.map(lambda u: a * upcast(u), x)
    return jax.tree.map(lambda u, v: v + a * upcast(u), x, y)
