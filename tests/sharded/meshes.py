"""Meshes of 8 devices in either kind, in the spellings of the installed jax
(``jax.set_mesh`` and ``jax.sharding.reshard`` from jax 0.7; ``jax.sharding.use_mesh`` and
``jax.experimental.shard.reshard`` in 0.6)."""

import jax

AxisType = jax.sharding.AxisType
use_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
try:
    from jax.sharding import reshard
except ImportError:  # jax 0.6
    from jax.experimental.shard import reshard  # noqa: F401


def mesh_of(shape, names, kind):
    """A mesh of ``shape`` whose axes are all ``'explicit'`` or all ``'auto'``."""
    axis_type = AxisType.Explicit if kind == "explicit" else AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
