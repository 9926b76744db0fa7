"""Tree maths: one L2 norm over the whole pytree, ascent steps, running sums, flat views.

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
import optax

Params = Any


def upcast(x: jax.Array) -> jax.Array:
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def global_norm(tree: Params) -> jax.Array:
    """``||v||``: one L2 norm over every leaf of the pytree (never per leaf)."""
    return optax.tree.norm(jax.tree.map(upcast, tree))


def vdot(a: Params, b: Params) -> jax.Array:
    """``<a, b>`` summed over every leaf, in at least float32."""
    return optax.tree.vdot(jax.tree.map(upcast, a), jax.tree.map(upcast, b))


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
    """``tree`` with the leaves outside ``mask`` set to zero."""
    if mask is None:
        return tree
    if isinstance(mask, np.ndarray):  # a flat mask (FlatView)
        return jnp.where(mask, tree, jnp.zeros_like(tree))
    return jax.tree.map(lambda v, keep: v if keep else jnp.zeros_like(v), tree, mask)


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


class TreeView:
    """The arithmetic leaf by leaf, on the trees themselves (``flat=False``, transparent)."""

    def flat(self, tree: Params) -> Params:
        return tree

    def tree(self, v: Params, like: Params) -> Params:
        """``v`` in the dtypes of ``like``."""
        return cast_like(v, like)

    def mask(self, mask: Params | None) -> Params | None:
        return mask


class FlatView(TreeView):
    """The leaves of a params-like tree as one vector (in at least float32), and back.

    Gradients, running sums and ascent steps live on the vector, so each norm, inner
    product and sum is one kernel whatever the number of leaves; a point ``theta + e`` is
    computed leaf by leaf from the slices of ``e``, so no flat copy of ``theta`` is made
    (except by adaptive steps, which weigh by the flattened point).
    """

    def __init__(self, like: Params):
        leaves, self.treedef = jax.tree.flatten(like)
        self.shapes = [jnp.shape(x) for x in leaves]
        self.splits = np.cumsum([int(np.prod(shape)) for shape in self.shapes])[:-1]
        self.dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)

    def flat(self, tree: Params) -> jax.Array:
        leaves = jax.tree.leaves(tree)
        return jnp.concatenate([jnp.ravel(x).astype(self.dtype) for x in leaves])

    def tree(self, v: jax.Array, like: Params) -> Params:
        parts = zip(jnp.split(v, self.splits), jax.tree.leaves(like), strict=True)
        return jax.tree.unflatten(
            self.treedef, [p.reshape(x.shape).astype(x.dtype) for p, x in parts]
        )

    def mask(self, mask: Params | None) -> np.ndarray | None:
        """A tree of Python bools as one flat bool vector (a constant)."""
        if mask is None:
            return None
        flags = zip(jax.tree.leaves(mask), self.shapes, strict=True)
        return np.concatenate([np.full(int(np.prod(shape)), flag) for flag, shape in flags])


LEAF_BY_LEAF = TreeView()


def view_of(params: Params, flat: bool) -> TreeView:
    """A :class:`FlatView` of ``params`` (``flat``, and they have leaves) or the tree itself."""
    return FlatView(params) if flat and jax.tree.leaves(params) else LEAF_BY_LEAF
