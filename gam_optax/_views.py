"""Where the arithmetic of a step lives: the trees themselves, or a few flat arrays.

:class:`TreeView` leaves gradients, sums and steps as trees like the parameters (leaf by
leaf). :class:`FlatView` joins the leaves into one vector per *sharding group*, so that each
norm, inner product and sum is a few kernels whatever the number of leaves:

* leaves that no mesh splits (one device, ``jax.pmap``, replicated parameters) form one
  vector, as on one device;
* leaves whose type shows them split over Explicit mesh axes (``jax.sharding.AxisType``) are
  grouped by those axes; each group is one array ``[n_1, ..., n_k, local]`` whose row
  ``(i_1, ..., i_k)`` holds the shards device ``(i_1, ..., i_k)`` already has. Building it
  reshapes and transposes within each device: no gather, no collective;
* a leaf on a mesh with Auto axes, whose type does not show how it is split, stays a group of
  its own, in its own shape (the arithmetic is then leaf by leaf for it, and the compiler
  keeps its sharding).

Each point ``theta + e`` is computed leaf by leaf from the flat step (``view.tree``), so no
flat copy of ``theta`` is made. Norms and inner products are sums of per-array reductions
(``_tree_math``): a scalar all-reduce for each sharded group, never a gather.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gam_optax import _compat
from gam_optax._tree_math import Params, cast_like


class TreeView:
    """The arithmetic leaf by leaf, on the trees themselves (``flat=False``, transparent)."""

    def flat(self, tree: Params) -> Params:
        return tree

    def tree(self, v: Params, like: Params) -> Params:
        """``v`` in the dtypes of ``like``."""
        return cast_like(v, like)

    def mask(self, mask: Params | None) -> Params | None:
        return mask


LEAF_BY_LEAF = TreeView()


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one leaf enters its group's array: its shape split into the mesh axes' blocks.

    Attributes:
      shape: the leaf's shape.
      group: the mesh axes splitting it, in mesh order (``()``: unsplit), or None: its split
        is hidden (an Auto mesh), and it stays in its own shape.
      blocks: the leaf's shape with each split dimension ``s`` over axes ``a_1..a_j`` written
        ``(n_1, ..., n_j, s / prod n)``; ``block_axes`` names each block's axis (or None).
      order: the permutation of ``blocks`` putting the group's axes first, in group order.
      sharding: the leaf's own sharding (to put it back), where the group is not ``()``.
    """

    shape: tuple[int, ...]
    group: tuple[str, ...] | None
    blocks: tuple[int, ...] = ()
    block_axes: tuple[str | None, ...] = ()
    order: tuple[int, ...] = ()
    sharding: Any = None

    @property
    def local_size(self) -> int:
        """The number of this leaf's entries on each device of its group."""
        if not self.group:  # unsplit, or hidden: the whole leaf
            return int(np.prod(self.shape))
        blocks = zip(self.blocks, self.block_axes, strict=True)
        return int(np.prod([b for b, axis in blocks if axis is None]))

    def rows(self, x: jax.Array, dtype: Any, mesh: Any) -> jax.Array:
        """The leaf as its group's rows ``[n_1, ..., n_k, local]`` (or as it is, hidden)."""
        x = x.astype(dtype)
        if self.group is None:
            return x
        if not self.group:
            return jnp.ravel(x)
        x = _reshape(x, self.blocks, mesh, self.block_axes)
        x = jnp.transpose(x, self.order)
        sizes = tuple(self.blocks[i] for i in self.order[: len(self.group)])
        return _reshape(x, (*sizes, self.local_size), mesh, (*self.group, None))

    def unrows(self, v: jax.Array, like: jax.Array, mesh: Any) -> jax.Array:
        """The inverse of :meth:`rows`, in the shape, sharding and dtype of ``like``."""
        if self.group is None:
            return v.astype(like.dtype)
        if not self.group:
            return v.reshape(self.shape).astype(like.dtype)
        permuted = tuple(self.blocks[i] for i in self.order)
        v = _reshape(v, permuted, mesh, tuple(self.block_axes[i] for i in self.order))
        v = jnp.transpose(v, tuple(int(i) for i in np.argsort(self.order)))
        return _reshape(v, self.shape, mesh, None, self.sharding).astype(like.dtype)


def _reshape(x, shape, mesh, axes, sharding=None):
    """``x.reshape(shape)`` with the output's sharding spelled out (Explicit meshes need it
    where a reshape joins or splits a sharded dimension)."""
    if sharding is None:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))
    return jax.lax.reshape(x, tuple(shape), out_sharding=sharding)


def layout_of(x: jax.Array) -> tuple[Layout, Any]:
    """The :class:`Layout` of a (traced) leaf, and its mesh, as its type shows them."""
    shape = tuple(jnp.shape(x))
    mesh, spec, sharding = _compat.mesh_and_spec(x)
    if mesh is None:
        return Layout(shape, ()), None
    if _compat.hidden_axes(mesh):
        return Layout(shape, None), mesh
    explicit = _compat.explicit_axes(mesh)
    blocks: list[int] = []
    block_axes: list[str | None] = []
    for size, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        names = tuple(a for a in names if a in explicit and mesh.shape[a] > 1)
        counts = [mesh.shape[a] for a in names]
        blocks += [*counts, size // int(np.prod(counts))]
        block_axes += [*names, None]
    if not any(block_axes):
        return Layout(shape, ()), None
    group = tuple(a for a in mesh.axis_names if a in block_axes)
    lead = [block_axes.index(a) for a in group]
    order = (*lead, *(i for i, a in enumerate(block_axes) if a is None))
    return Layout(shape, group, tuple(blocks), tuple(block_axes), order, sharding), mesh


class FlatView(TreeView):
    """The leaves of a params-like tree as a few arrays, one per sharding group (see the
    module), in at least float32; and back, in each leaf's shape, sharding and dtype.

    On one device (or with replicated parameters) the view is one vector. A point
    ``theta + e`` is computed leaf by leaf from the slices of ``e``, so no flat copy of
    ``theta`` is made (except by adaptive steps, which weigh by the flattened point).
    """

    def __init__(self, like: Params):
        leaves, self.treedef = jax.tree.flatten(like)
        self.dtype = jnp.promote_types(jnp.result_type(*leaves), jnp.float32)
        layouts = [layout_of(x) for x in leaves]
        self.layouts = [layout for layout, _ in layouts]
        self.mesh = next((mesh for _, mesh in layouts if mesh is not None), None)
        groups: dict[Any, list[int]] = {}
        for i, layout in enumerate(self.layouts):
            key = ("hidden", i) if layout.group is None else layout.group
            groups.setdefault(key, []).append(i)
        self.groups = list(groups.values())  # leaf indices, the groups in order of appearance

    def flat(self, tree: Params) -> tuple[jax.Array, ...]:
        leaves = jax.tree.leaves(tree)
        rows = lambda i: self.layouts[i].rows(leaves[i], self.dtype, self.mesh)
        return tuple(
            rows(g[0]) if len(g) == 1 else jnp.concatenate([rows(i) for i in g], axis=-1)
            for g in self.groups
        )

    def tree(self, v: tuple[jax.Array, ...], like: Params) -> Params:
        likes = jax.tree.leaves(like)
        out: list[Any] = [None] * len(likes)
        for group, array in zip(self.groups, v, strict=True):
            sizes = np.cumsum([self.layouts[i].local_size for i in group])[:-1]
            parts = [array] if len(group) == 1 else jnp.split(array, sizes, axis=-1)
            for i, part in zip(group, parts, strict=True):
                out[i] = self.layouts[i].unrows(part, likes[i], self.mesh)
        return jax.tree.unflatten(self.treedef, out)

    def mask(self, mask: Params | None) -> tuple[Any, ...] | None:
        """A tree of Python bools as one constant per group: a bool vector along the rows
        (a Python bool for a leaf in its own shape)."""
        if mask is None:
            return None
        flags = jax.tree.leaves(mask)
        return tuple(
            flags[g[0]]
            if self.layouts[g[0]].group is None
            else np.concatenate([np.full(self.layouts[i].local_size, flags[i]) for i in g])
            for g in self.groups
        )


def view_of(params: Params, flat: bool) -> TreeView:
    """A :class:`FlatView` of ``params`` (``flat``, and they have leaves) or the tree itself."""
    return FlatView(params) if flat and jax.tree.leaves(params) else LEAF_BY_LEAF
