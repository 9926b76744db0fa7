"""The few JAX and Flax APIs whose spelling changed within the supported versions.

The tested range is in the README ("Supported versions"). Each function here uses the
newest spelling where the installed version has it and the older one otherwise:

* ``jax.lax.axis_size`` (jax >= 0.6.1): before it, ``jax.lax.psum(1, axis_name)``, which
  raises the same ``NameError`` for an unbound axis name.
* The varying-manual-axes types of ``jax.shard_map(..., check_vma=True)``: the axes a
  value varies over are ``jax.typeof(x).manual_axis_type.varying`` from jax 0.10 and
  ``jax.typeof(x).vma`` before; a value is marked as varying with
  ``jax.lax.pcast(x, axis, to="varying")`` from jax 0.8.2 and ``jax.lax.pvary(x, axis)``
  before. Under ``jax.pmap``, jax 0.9's ``pcast`` fails an assertion instead of marking.
* The sharding in a traced value's type (``jax.typeof(x).sharding``): its mesh and, on
  Explicit mesh axes (``jax.sharding.AxisType``), its spec. Where the installed jax has no
  axis types, every mesh axis counts as Auto (the spec is not in the type).
* ``nnx.merge(..., copy=True)`` (flax >= 0.11.2), which gives the merged module its own
  variables; older Flax always did.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Looked up once, at import: what the installed jax provides (None where it lacks it).
_AXIS_SIZE = getattr(jax.lax, "axis_size", None)
_PCAST = getattr(jax.lax, "pcast", None)
_PVARY = getattr(jax.lax, "pvary", None)
_TYPEOF = getattr(jax, "typeof", None)
_AXIS_TYPE = getattr(jax.sharding, "AxisType", None)
_RESHARD: Any = getattr(jax.sharding, "reshard", None)  # jax >= 0.7
if _RESHARD is None:  # pragma: no cover - jax 0.6 has it in jax.experimental.shard
    try:
        _RESHARD = importlib.import_module("jax.experimental.shard").reshard
    except (ImportError, AttributeError):
        _RESHARD = None


def axis_size(axis_name: str) -> Any:
    """The size of the bound ``axis_name``; ``NameError`` if no enclosing map binds it."""
    if _AXIS_SIZE is not None:
        return _AXIS_SIZE(axis_name)
    return jax.lax.psum(1, axis_name)


def varying_axes(x: Any) -> frozenset:
    """The manual axes ``x`` varies over inside ``jax.shard_map`` (empty elsewhere)."""
    if _TYPEOF is None:
        return frozenset()
    aval = _TYPEOF(x)
    manual = getattr(aval, "manual_axis_type", None)
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def to_varying(x: Any, axis_name: str) -> Any:
    """``x`` marked as varying over ``axis_name`` (per-device values, not replicated)."""
    if _PCAST is not None:
        return _PCAST(x, axis_name, to="varying")
    if _PVARY is not None:
        return _PVARY(x, axis_name)
    return x  # no varying-axes types: nothing to mark


def vma_checked(axis_name: str) -> bool:
    """True inside ``jax.shard_map(..., check_vma=True)`` over ``axis_name``: there a value
    marked as varying carries the axis in its type."""
    try:
        probe = to_varying(jnp.zeros(()), axis_name)
    except AssertionError:  # jax 0.9's pcast under jax.pmap, which has no such types
        return False
    except ValueError:  # "pvary should be called under jax.shard_map": eager jax.vmap
        return False
    return axis_name in varying_axes(probe)


def to_varying_spelling(axis_name: str) -> str:
    """How a user marks params as varying in the installed jax, for error messages."""
    if _PCAST is not None or _PVARY is None:
        return f"jax.lax.pcast(params, {axis_name!r}, to='varying')"
    return f"jax.lax.pvary(params, {axis_name!r})"


def mesh_and_spec(x: Any) -> tuple[Any, Any, Any]:
    """``(mesh, spec, sharding)`` of ``x``'s type where a mesh of several devices types it;
    ``(None, None, None)`` elsewhere (one device, ``jax.pmap``, a jax without the types)."""
    sharding: Any = getattr(_TYPEOF(x), "sharding", None) if _TYPEOF is not None else None
    mesh = getattr(sharding, "mesh", None)
    if (
        sharding is None
        or mesh is None
        or getattr(mesh, "empty", False)
        or int(np.prod(mesh.axis_sizes)) == 1
    ):
        return None, None, None
    return mesh, sharding.spec, sharding


def _axes_of_type(mesh: Any, kind: str) -> frozenset:
    types = getattr(mesh, "axis_types", None)
    if _AXIS_TYPE is None or types is None:
        types = ("Auto",) * len(mesh.axis_names)  # no axis types: the spec is not in the type
    names = zip(mesh.axis_names, mesh.axis_sizes, types, strict=True)
    return frozenset(name for name, size, t in names if size > 1 and kind in str(t))


def hidden_axes(mesh: Any) -> frozenset:
    """The Auto axes of ``mesh`` (of more than one device): how a value is split over them is
    the compiler's choice, not in its type."""
    return _axes_of_type(mesh, "Auto")


def explicit_axes(mesh: Any) -> frozenset:
    """The Explicit axes of ``mesh``: a value's type says how it is split over them."""
    return _axes_of_type(mesh, "Explicit")


def reshard_like(x: Any, like: Any) -> Any:
    """``x`` sharded as ``like``'s type says, where an Explicit mesh types ``like`` and ``x``
    differs (a value the arithmetic built sharded otherwise); ``x`` itself elsewhere."""
    mesh, spec, sharding = mesh_and_spec(like)
    if mesh is None or _RESHARD is None or _TYPEOF is None or not explicit_axes(mesh):
        return x
    if _TYPEOF(x).sharding.spec == spec:
        return x
    return _RESHARD(x, sharding)


def nnx_merge_copy(nnx: Any, graphdef: Any, *states: Any) -> Any:
    """``nnx.merge(graphdef, *states)`` into new variables, never those of ``states``."""
    if _merge_takes_copy(nnx.merge):
        return nnx.merge(graphdef, *states, copy=True)
    return nnx.merge(graphdef, *states)


_TAKES_COPY: dict[Any, bool] = {}


def _merge_takes_copy(merge: Any) -> bool:
    if merge not in _TAKES_COPY:
        _TAKES_COPY[merge] = "copy" in inspect.signature(merge).parameters
    return _TAKES_COPY[merge]
