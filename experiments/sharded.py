"""Training steps with sharded parameters: what each transformation's compiled program moves
between devices, holds in memory, and does to the parameters' shardings.

The model is a tanh MLP (:func:`mlp_params`, :func:`mlp_loss`); its parameters are laid out
on a mesh of 8 devices by one of :data:`LAYOUTS` (FSDP, Megatron tensor parallelism, both),
the batch split over ``'data'``. Each row is the user's step (``g0 = jax.grad(loss)``, then
``tx.update(g0, state, params, loss_fn=...)``, ``optax.apply_updates``) jitted with the
parameters' shardings in and out and the state donated, on an explicit or an auto mesh
(``jax.sharding.AxisType``). Everything is read from the compiled program: no timings.

- collective bytes: the payloads of the all-reduces, all-gathers, reduce-scatters,
  all-to-alls and collective-permutes of one device's program, per step (a while loop's
  body counted once per trip), as a multiple of SGD's; ``k`` is the number of gradient
  evaluations of the step (g0 included), so a row that moves no more than its gradients
  need stays within about ``k`` times SGD's;
- temporary memory beyond SGD's, in copies of one device's share of the parameters;
- whether some ``concatenate`` holds at least every parameter (a flat vector that undoes
  the sharding of every gradient);
- how many outputs of the step come out sharded differently from its inputs when
  ``out_shardings`` is not given.

``python -m experiments.benchmark --sharded`` prints the table (:func:`format_table`); it
gives this process 8 CPU devices when there are fewer accelerators. The functions here need
8 devices (``jax.config.update("jax_num_cpu_devices", 8)`` before JAX starts) and a jax
with ``jax.sharding.AxisType``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gam_optax
from experiments import hlo, optimizers, tables

# The measured setting: 6 tanh layers alternating 1024 -> 2048 -> 1024, a 10-class head
# (12.6 M parameters, 48 MiB in float32), batch 128.
SIZES = (1024, 2048, 1024, 2048, 1024, 2048, 1024)
BATCH_SIZE = 128
DEVICES = 8
FSDP_MIN_SIZE = 4096  # leaves with fewer elements (the biases) stay replicated under FSDP

Params = Any  # a dict of dicts of arrays
Specs = Any  # the same tree, of PartitionSpecs


# ---------------------------------------------------------------------------------------
# The model.
# ---------------------------------------------------------------------------------------


def mlp_params(
    key: jax.Array, sizes: Sequence[int], classes: int = 10, dtype: Any = jnp.float32
) -> Params:
    """A tanh MLP ``sizes[0] -> ... -> sizes[-1] -> classes``: ``{'layer0': {'kernel',
    'bias'}, ..., 'head': {'kernel', 'bias'}}``, LeCun-normal kernels, zero biases."""
    widths = [*sizes, classes]
    names = [f"layer{i}" for i in range(len(sizes) - 1)] + ["head"]
    keys = jax.random.split(key, len(names))
    return {
        name: {
            "kernel": (jax.random.normal(k, (m, n)) / math.sqrt(m)).astype(dtype),
            "bias": jnp.zeros((n,), dtype),
        }
        for name, k, m, n in zip(names, keys, widths[:-1], widths[1:], strict=True)
    }


def hidden_layers(params: Params) -> list[str]:
    """The hidden layers' names, in order (``'head'`` excluded)."""
    return sorted((name for name in params if name != "head"), key=lambda n: int(n[5:]))


def _explicit_mesh() -> bool:
    """Whether the mesh in context (``jax.set_mesh``) has an explicit axis."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    mesh = get() if get is not None and explicit is not None else None
    return mesh is not None and not mesh.empty and explicit in mesh.axis_types


def dense(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel``. On an explicit mesh the output is sharded as ``x``'s rows and
    ``kernel``'s columns (where the two differ): a row-parallel layer's contraction over a
    sharded axis is then summed across devices (Megatron's all-reduce), which explicit
    sharding asks the program to say."""
    if not _explicit_mesh():
        return x @ kernel
    rows, cols = jax.typeof(x).sharding.spec[0], jax.typeof(kernel).sharding.spec[1]
    return jnp.matmul(x, kernel, out_sharding=P(rows, None if cols == rows else cols))


def gathered(params: Params, axis: str = "data") -> Params:
    """FSDP's all-gather, as an explicit mesh asks the model to say it: each leaf resharded
    with ``axis`` (the batch's) dropped from its spec, so a layer computes with whole
    weights (or its tensor-parallel part) on every device. The identity off an explicit
    mesh, where the compiler places the gathers."""
    if not _explicit_mesh():
        return params

    def gather(x: jax.Array) -> jax.Array:
        spec = jax.typeof(x).sharding.spec
        if axis not in jax.tree.leaves(tuple(spec)):
            return x
        drop = lambda p: None if p == axis else p
        parts = [
            tuple(q for q in p if q != axis) or None if isinstance(p, tuple) else drop(p)
            for p in spec
        ]
        return jax.sharding.reshard(x, P(*parts))

    return jax.tree.map(gather, params)


def mlp_logits(params: Params, inputs: jax.Array) -> jax.Array:
    params = gathered(params)
    x = inputs
    for name in hidden_layers(params):
        x = jnp.tanh(dense(x, params[name]["kernel"]) + params[name]["bias"])
    return dense(x, params["head"]["kernel"]) + params["head"]["bias"]


def mlp_loss(params: Params, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Softmax cross-entropy of ``batch = (inputs, integer labels)``, the mean over the
    batch."""
    inputs, labels = batch
    logits = mlp_logits(params, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp_batch(
    key: jax.Array, batch_size: int, features: int, classes: int = 10, dtype: Any = jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """A random batch: normal inputs, uniform integer labels."""
    k1, k2 = jax.random.split(key)
    inputs = jax.random.normal(k1, (batch_size, features)).astype(dtype)
    return inputs, jax.random.randint(k2, (batch_size,), 0, classes)


# ---------------------------------------------------------------------------------------
# Parameter layouts.
# ---------------------------------------------------------------------------------------


def fsdp_specs(
    params: Params, axis: str = "data", axis_size: int = DEVICES, min_size: int = FSDP_MIN_SIZE
) -> Specs:
    """FSDP: every leaf of at least ``min_size`` elements split over ``axis`` along its
    largest dimension divisible by ``axis_size``; the others (biases) replicated."""

    def spec(leaf: Any) -> P:
        fits = [d for d, n in enumerate(leaf.shape) if n % axis_size == 0]
        if math.prod(leaf.shape) < min_size or not fits:
            return P()
        split = max(fits, key=lambda d: leaf.shape[d])  # the first of equal ones
        return P(*(axis if d == split else None for d in range(leaf.ndim)))

    return jax.tree.map(spec, params)


def tp_specs(params: Params, axis: str = "model", axis_size: int = 4) -> Specs:
    """Megatron tensor parallelism over ``axis``: the hidden layers alternate column-parallel
    (kernel ``P(None, axis)``, bias ``P(axis)``: each device holds some of the outputs) and
    row-parallel (kernel ``P(axis, None)``, bias ``P()``: partial sums, all-reduced). The head
    is row-parallel after a column-parallel layer, else replicated. A layer whose split
    dimension is not divisible by ``axis_size`` is replicated (and resets the alternation)."""
    specs, column = {}, True  # column: the next layer's input is whole on every device
    for name in hidden_layers(params):
        m, n = params[name]["kernel"].shape
        if column and n % axis_size == 0:
            specs[name], column = {"kernel": P(None, axis), "bias": P(axis)}, False
        elif not column and m % axis_size == 0:
            specs[name], column = {"kernel": P(axis, None), "bias": P()}, True
        else:
            specs[name], column = {"kernel": P(), "bias": P()}, True
    row_head = not column and params["head"]["kernel"].shape[0] % axis_size == 0
    specs["head"] = {"kernel": P(axis, None) if row_head else P(), "bias": P()}
    return specs


def fsdp_tp_specs(
    params: Params,
    data: str = "data",
    model: str = "model",
    data_size: int = 2,
    model_size: int = 4,
    min_size: int = FSDP_MIN_SIZE,
) -> Specs:
    """:func:`tp_specs` over ``model``, and each kernel of at least ``min_size`` elements also
    split over ``data`` along the dimension left whole (a replicated head: its largest one
    divisible by ``data_size``). Biases as in :func:`tp_specs`."""
    tp = tp_specs(params, model, model_size)

    def spec(name: str, key: str, leaf: Any) -> P:
        parts = tuple(tp[name][key]) + (None,) * (leaf.ndim - len(tp[name][key]))
        if key != "kernel" or math.prod(leaf.shape) < min_size:
            return tp[name][key]
        free = [d for d in range(leaf.ndim) if parts[d] is None and leaf.shape[d] % data_size == 0]
        if not free:
            return tp[name][key]
        split = max(free, key=lambda d: leaf.shape[d])
        return P(*(data if d == split else p for d, p in enumerate(parts)))

    return {
        name: {key: spec(name, key, leaf) for key, leaf in layer.items()}
        for name, layer in params.items()
    }


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh of 8 devices (``shape``, ``names``) and how the parameters lie on it."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    specs: Callable[[Params, Any, int], Specs]  # (params, mesh, min_size) -> specs


LAYOUTS: dict[str, Layout] = {
    "fsdp": Layout(
        (8,),
        ("data",),
        lambda p, mesh, min_size: fsdp_specs(p, "data", mesh.shape["data"], min_size),
    ),
    "tp": Layout(
        (2, 4), ("data", "model"), lambda p, mesh, _: tp_specs(p, "model", mesh.shape["model"])
    ),
    "fsdp_tp": Layout(
        (2, 4),
        ("data", "model"),
        lambda p, mesh, min_size: fsdp_tp_specs(
            p, "data", "model", mesh.shape["data"], mesh.shape["model"], min_size
        ),
    ),
}
BATCH_SPEC = P("data")  # the batch in every layout
AXIS_TYPES = ("explicit", "auto")


def layout_specs(layout: str, params: Params, mesh: Any, min_size: int = FSDP_MIN_SIZE) -> Specs:
    """The specs of ``params`` in ``LAYOUTS[layout]`` on ``mesh``."""
    return LAYOUTS[layout].specs(params, mesh, min_size)


def default_devices(n: int = DEVICES) -> list[Any]:
    """The first ``n`` devices of the default backend, else of the CPU (fake devices:
    ``jax_num_cpu_devices``, set before JAX starts)."""
    for devices in (jax.devices(), jax.devices("cpu")):
        if len(devices) >= n:
            return list(devices[:n])
    raise RuntimeError(
        f"the sharded measurements need {n} devices; this process has {len(jax.devices())} "
        f"({jax.default_backend()}) and {len(jax.devices('cpu'))} CPU devices. Set "
        f'jax.config.update("jax_num_cpu_devices", {n}) (or XLA_FLAGS='
        f"--xla_force_host_platform_device_count={n}) before JAX starts."
    )


def make_mesh(layout: str, axis_type: str, devices: Sequence[Any] | None = None) -> Any:
    """``LAYOUTS[layout]``'s mesh with every axis ``'explicit'`` or ``'auto'``
    (``jax.sharding.AxisType``), on ``devices`` (default: :func:`default_devices`)."""
    axis_types = getattr(jax.sharding, "AxisType", None)
    if axis_types is None:
        raise RuntimeError(
            f"jax {jax.__version__} has no jax.sharding.AxisType: the installed jax lacks "
            f"explicit meshes (explicit and auto axis types); upgrade jax to measure them."
        )
    if axis_type not in AXIS_TYPES:
        raise ValueError(f"axis_type {axis_type!r}: one of {AXIS_TYPES}")
    kind = axis_types.Explicit if axis_type == "explicit" else axis_types.Auto
    spec = LAYOUTS[layout]
    devices = list(devices) if devices is not None else default_devices(math.prod(spec.shape))
    return jax.make_mesh(
        spec.shape, spec.names, axis_types=(kind,) * len(spec.names), devices=devices
    )


def _is_explicit(mesh: Any) -> bool:
    explicit = jax.sharding.AxisType.Explicit
    return any(t == explicit for t in mesh.axis_types)


@contextlib.contextmanager
def mesh_context(mesh: Any) -> Iterator[None]:
    """``jax.set_mesh(mesh)`` (``jax.sharding.use_mesh`` before jax 0.7) for an explicit
    mesh, where tracing needs it; nothing for an auto one."""
    if not _is_explicit(mesh):
        yield
        return
    setter = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with setter(mesh):
        yield


# ---------------------------------------------------------------------------------------
# The sharded step.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShardedStep:
    """A jitted step ``(params, state, batch) -> (params, state, loss)`` and its placed
    inputs. ``lower``, ``compile`` and ``__call__`` run in the mesh's context."""

    mesh: Any
    jitted: Any
    inputs: tuple[Any, Any, Any]  # (params, state, batch) on the mesh
    in_shardings: tuple[Any, Any, Any]

    def lower(self, *args: Any) -> Any:
        with mesh_context(self.mesh):
            return self.jitted.lower(*(args or self.inputs))

    def compile(self) -> Any:
        with mesh_context(self.mesh):
            return self.jitted.lower(*self.inputs).compile()

    def __call__(self, params: Any, state: Any, batch: Any) -> Any:
        with mesh_context(self.mesh):
            return self.jitted(params, state, batch)

    def abstract_inputs(self) -> tuple[Any, Any, Any]:
        """The inputs as ``jax.ShapeDtypeStruct`` with their shardings (they outlive the
        donated arrays)."""
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            self.inputs,
            self.in_shardings,
        )


def sharded_step(
    tx: optax.GradientTransformation,
    mesh: Any,
    param_specs: Specs,
    params: Params,
    batch: Any,
    loss: Callable[[Params, Any], jax.Array] = mlp_loss,
    pin_out: bool = True,
    donate: bool = True,
) -> ShardedStep:
    """The user's training step with ``params`` laid out by ``param_specs`` on ``mesh``:
    ``g0 = jax.grad(loss)``, ``tx.update(g0, state, params, loss_fn=...)``, apply. Jitted with
    the params', state's and batch's (``P('data')``) shardings in, the same out when
    ``pin_out`` (the loss replicated), and the params and state donated. The state is
    ``tx.init`` of the placed params; a leaf it leaves off the mesh (a step count) is
    replicated."""
    with mesh_context(mesh):
        param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs)
        params = jax.device_put(params, param_shardings)
        state = tx.init(params)
        on_mesh = lambda x: (
            x.sharding
            if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
            else NamedSharding(mesh, P())
        )
        state_shardings = jax.tree.map(on_mesh, state)
        # a copy of each leaf: init may give two leaves one buffer, which donation refuses
        state = jax.tree.map(
            lambda x, s: jax.device_put(x, s, may_alias=False), state, state_shardings
        )
        batch_shardings = jax.tree.map(lambda _: NamedSharding(mesh, BATCH_SPEC), batch)
        batch = jax.device_put(batch, batch_shardings)

    takes_loss_fn = not isinstance(state, gam_optax.TransparentState)

    def step(params, state, batch):
        loss_fn = lambda p: loss(p, batch)
        value, g0 = jax.value_and_grad(loss_fn)(params)
        extra = {"loss_fn": loss_fn} if takes_loss_fn else {}
        updates, state = tx.update(g0, state, params, **extra)
        return optax.apply_updates(params, updates), state, value

    shardings = (param_shardings, state_shardings, batch_shardings)
    out = (param_shardings, state_shardings, NamedSharding(mesh, P())) if pin_out else None
    kwargs = {"out_shardings": out} if pin_out else {}
    jitted = jax.jit(
        step, in_shardings=shardings, donate_argnums=(0, 1) if donate else (), **kwargs
    )
    return ShardedStep(mesh, jitted, (params, state, batch), shardings)


# ---------------------------------------------------------------------------------------
# What the compiled program says.
# ---------------------------------------------------------------------------------------

collective_bytes = hlo.collective_bytes
concatenates = hlo.concatenates


def full_length_concatenate(hlo_text: str, n_params: int) -> bool:
    """Whether some ``concatenate`` has at least ``n_params`` elements: a flat vector of
    every parameter, on every device (the sharding of every gradient undone)."""
    return any(n >= n_params for n in concatenates(hlo_text))


def temp_bytes(compiled: Any) -> int | None:
    """XLA's temporary memory of the compiled program (None where the backend says none)."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # not every backend reports it
        return None


def output_shardings_kept(outputs: Any, inputs: Any) -> list[str]:
    """The paths of the leaves of ``outputs`` (arrays, or shardings such as
    ``compiled.output_shardings[:2]``) sharded differently from the same leaf of ``inputs``
    (arrays or ``jax.ShapeDtypeStruct`` with a sharding): ``[]`` when every sharding is
    kept."""
    flat, _ = jax.tree_util.tree_flatten_with_path(inputs)
    got = jax.tree.leaves(outputs, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if len(got) != len(flat):
        raise ValueError(f"{len(got)} outputs for {len(flat)} inputs")
    changed = []
    for (path, x), out in zip(flat, got, strict=True):
        out = out if isinstance(out, jax.sharding.Sharding) else out.sharding
        if not out.is_equivalent_to(x.sharding, len(x.shape)):
            changed.append(jax.tree_util.keystr(path))
    return changed


def per_device_param_bytes(params: Params, specs: Specs, mesh: Any) -> int:
    """The bytes of one device's share of ``params`` laid out by ``specs`` on ``mesh``."""
    share = lambda x, s: (
        math.prod(NamedSharding(mesh, s).shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    )
    return sum(jax.tree.leaves(jax.tree.map(share, params, specs)))


# ---------------------------------------------------------------------------------------
# Rows: the benchmark's transformations, chained before SGD with momentum.
# ---------------------------------------------------------------------------------------

ROWS = (
    "sgd",
    "sam",
    "gsam",
    "gam",
    "gam(flat=False)",
    "gam(unroll=False)",
    "gam(hessian=True)",
    "gam_penalty",
    "sam_gam",
    "transparent(sam)",
    "transparent(gam)",
    "reuse(gam)",
)
LEARNING_RATE = 0.1
# Rows the library's wrappers build: the step of a ``transparent`` row is one of its ``1 + k``
# calls (one gradient, no ``loss_fn``); ``reuse(gam)`` refreshes by ``jax.lax.cond`` on the
# count (its costliest branch counted: a refresh step).
WRAPPED = {
    "transparent(sam)": lambda sgd: gam_optax.transparent(gam_optax.sam(), sgd),
    "transparent(gam)": lambda sgd: gam_optax.transparent(gam_optax.gam(), sgd),
    "reuse(gam)": lambda sgd: optax.chain(gam_optax.reuse(gam_optax.gam(), every=5), sgd),
}


def _section_member(optimizer: str, section: dict[str, Any]) -> Any:
    perturbation = optimizers.PERTURBATIONS[optimizer]
    return getattr(gam_optax, perturbation.factory)(**{**perturbation.defaults, **section})


def member(row: str) -> Any:
    """The transformation a row of :data:`MEMBERS` names (None for ``'sgd'``): the library's
    defaults, or the experiments' config defaults (``optimizers.PERTURBATIONS``) for the
    penalty forms."""
    if row not in MEMBERS:
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(row_names())}")
    return MEMBERS[row]()


MEMBERS: dict[str, Callable[[], Any]] = {
    "sgd": lambda: None,
    "sam": lambda: gam_optax.sam(),
    "gsam": lambda: gam_optax.gsam(),
    "gam": lambda: gam_optax.gam(),
    "sam(flat=True)": lambda: gam_optax.sam(flat=True),
    "gam(flat=False)": lambda: gam_optax.gam(flat=False),
    "gam(unroll=False)": lambda: gam_optax.gam(unroll=False),
    "gam(hessian=True)": lambda: gam_optax.gam(hessian=True),
    "gam_penalty": lambda: _section_member("gam_penalty", {}),
    "sam_gam": lambda: _section_member("sam_gam", {}),
}


def row_names() -> list[str]:
    """Every row :func:`transformation` builds."""
    return [*MEMBERS, *WRAPPED]


def transformation(row: str) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(member(row), optax.sgd(0.1, momentum=0.9))``; SGD alone for 'sgd'; the
    :data:`WRAPPED` rows around the same SGD."""
    sgd = optax.sgd(LEARNING_RATE, momentum=0.9)
    if row in WRAPPED:
        return WRAPPED[row](sgd)
    inner = member(row)
    return optax.with_extra_args_support(sgd) if inner is None else optax.chain(inner, sgd)


def gradients(row: str) -> tuple[int, int]:
    """``(k, hvps)``: the model-gradient evaluations of a row's step, g0 included (each
    forward-over-reverse pass, ``jax.jvp`` of the gradient, counted as one), and how many of
    them are such Hessian-vector-product passes (each moves about a gradient's collectives
    twice: primal and tangent). From the library's docstrings: SAM and GSAM 1 beyond g0;
    GAM 3 (``hessian=True``: the first and third exact); ``gam_penalty`` 1 gradient and 2
    exact HVPs (``hvp_step``: 3 gradients); ``sam_gam`` with ``hvp_step == sam_rho`` 3
    gradients (exact: SAM's gradient, 1 gradient, 2 HVPs)."""
    base = row.split("(")[0]
    if base in ("sgd", "transparent"):
        return 1, 0
    if base == "reuse":
        return 4, 0
    if base in ("sam", "gsam"):
        return 2, 0
    if base == "gam":
        return 4, 2 if "hessian=True" in row else 0
    finite = "hvp_step" in row or (base == "sam_gam" and row == "sam_gam")
    if base == "gam_penalty":
        return 4, 0 if finite else 2
    if base == "sam_gam":
        return (4, 0) if finite else (5, 2)
    raise ValueError(f"no gradient count for row {row!r}")


# ---------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------


def _failure(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def measure_row(
    tx_factory: Callable[[], Any],
    layout: str,
    axis_type: str,
    *,
    sizes: Sequence[int] = SIZES,
    batch_size: int = BATCH_SIZE,
    min_size: int = FSDP_MIN_SIZE,
    name: str = "",
) -> dict[str, Any]:
    """One row's compiled step (compile only, nothing run) on ``layout``'s mesh: whether it
    traces and compiles (else ``error``: the exception's type and first line), its
    collective bytes, temporary bytes, largest concatenate and whether it holds every
    parameter, and which outputs change sharding without ``out_shardings`` (``-1`` where
    that program does not compile). ``tx_factory()`` gives a fresh transformation."""
    mesh = make_mesh(layout, axis_type)
    params = mlp_params(jax.random.key(0), sizes)
    batch = mlp_batch(jax.random.key(1), batch_size, sizes[0])
    specs = layout_specs(layout, params, mesh, min_size)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    row = {
        "row": name,
        "layout": layout,
        "mesh": axis_type,
        "mesh_shape": "x".join(map(str, LAYOUTS[layout].shape)),
        "n_params": n_params,
        "param_bytes": per_device_param_bytes(params, specs, mesh),
        "traces": False,
        "error": None,
        "collective_bytes": None,
        "temp_bytes": None,
        "largest_concatenate": None,
        "full_concat": None,
        "resharded_unpinned": None,
    }
    try:
        step = sharded_step(tx_factory(), mesh, specs, params, batch)
        compiled = step.compile()
    except Exception as e:  # recorded: a row that does not trace or compile is a finding
        return {**row, "error": _failure(e)}
    text = compiled.as_text() or ""
    counts = concatenates(text)
    row.update(
        traces=True,
        collective_bytes=collective_bytes(text),
        temp_bytes=temp_bytes(compiled),
        largest_concatenate=max(counts, default=0),
        full_concat=full_length_concatenate(text, n_params),
    )
    try:
        free = sharded_step(tx_factory(), mesh, specs, params, batch, pin_out=False)
        changed = output_shardings_kept(
            free.compile().output_shardings[:2], free.abstract_inputs()[:2]
        )
        row["resharded_unpinned"] = len(changed)
        row["resharded_paths"] = changed
    except Exception as e:
        row["resharded_unpinned"], row["unpinned_error"] = -1, _failure(e)
    return row


def float64_error(
    tx_factory: Callable[[], Any],
    layout: str,
    axis_type: str,
    steps: int = 3,
    *,
    sizes: Sequence[int] = SIZES,
    batch_size: int = BATCH_SIZE,
    min_size: int = FSDP_MIN_SIZE,
) -> float:
    """The largest absolute difference of the params after ``steps`` float64 steps, sharded
    on ``layout``'s mesh against plain ``jax.jit`` on one device, from the same params and
    batches (float64 for the run only: ``jax.enable_x64``)."""
    with _x64():
        mesh = make_mesh(layout, axis_type)
        device = mesh.devices.flat[0]
        params = mlp_params(jax.random.key(0), sizes, dtype=jnp.float64)
        batches = [
            mlp_batch(jax.random.key(1 + i), batch_size, sizes[0], dtype=jnp.float64)
            for i in range(steps)
        ]
        one_tx = tx_factory()

        @jax.jit
        def one(params, state, batch):
            loss_fn = lambda p: mlp_loss(p, batch)
            g0 = jax.grad(loss_fn)(params)
            extra = {} if isinstance(state, gam_optax.TransparentState) else {"loss_fn": loss_fn}
            updates, state = one_tx.update(g0, state, params, **extra)
            return optax.apply_updates(params, updates), state

        p1 = jax.device_put(params, device)
        s1 = one_tx.init(p1)
        for batch in batches:
            p1, s1 = one(p1, s1, jax.device_put(batch, device))
        specs = layout_specs(layout, params, mesh, min_size)
        # not donated: a step may return one buffer for two leaves of the state (reuse's)
        sharded = sharded_step(tx_factory(), mesh, specs, params, batches[0], donate=False)
        p, s, _ = sharded.inputs
        for batch in batches:
            placed = jax.device_put(batch, sharded.in_shardings[2])
            p, s, _ = sharded(p, s, placed)
        gaps = jax.tree.map(
            lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p, p1
        )
        return max(jax.tree.leaves(gaps))


def _x64() -> Any:
    enable = getattr(jax, "enable_x64", None)
    if enable is None:  # jax < 0.8
        from jax.experimental import enable_x64 as enable
    return enable(True)


def measure_rows(
    rows: Sequence[str] = ROWS,
    layouts: Sequence[str] = tuple(LAYOUTS),
    axis_types: Sequence[str] = AXIS_TYPES,
    *,
    sizes: Sequence[int] = SIZES,
    batch_size: int = BATCH_SIZE,
    min_size: int = FSDP_MIN_SIZE,
    float64: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`measure_row` of every row (SGD first: the baseline) on every layout and mesh
    kind, with ``k``, ``hvps``, ``bytes_x`` (collective bytes over SGD's on the same mesh),
    ``within_bound`` (``bytes_x <= 1.05 (k + hvps)``: an HVP pass counted twice) and
    ``temp_copies`` ((temp - SGD's temp) / one device's parameter bytes). ``float64``: also
    :func:`float64_error` (3 steps), which runs the steps."""
    rows = ["sgd", *[r for r in rows if r != "sgd"]]
    shape = {"sizes": sizes, "batch_size": batch_size, "min_size": min_size}
    results = []
    for layout in layouts:
        for axis_type in axis_types:
            sgd = None
            for row in rows:
                factory = lambda row=row: transformation(row)
                result = measure_row(factory, layout, axis_type, **shape, name=row)
                k, hvps = gradients(row)
                result.update(k=k, hvps=hvps)
                sgd = result if row == "sgd" else sgd
                _relative(result, sgd)
                if float64 and result["traces"]:
                    try:
                        result["float64_error"] = float64_error(factory, layout, axis_type, **shape)
                    except Exception as e:
                        result["float64_error"], result["float64_failure"] = None, _failure(e)
                if log is not None:
                    log(
                        f"  measured {row:20s} {layout:8s} {axis_type:8s} "
                        f"{'ok' if result['traces'] else result['error']}"
                    )
                results.append(result)
    return results


def _relative(result: dict[str, Any], sgd: dict[str, Any] | None) -> None:
    """Adds ``bytes_x``, ``within_bound`` and ``temp_copies`` (None where not known)."""
    result.update(bytes_x=None, within_bound=None, temp_copies=None)
    if sgd is None or not result["traces"] or not sgd["traces"]:
        return
    if sgd["collective_bytes"]:
        result["bytes_x"] = result["collective_bytes"] / sgd["collective_bytes"]
        result["within_bound"] = result["bytes_x"] <= 1.05 * (result["k"] + result["hvps"])
    if result["temp_bytes"] is not None and sgd["temp_bytes"] is not None:
        result["temp_copies"] = (result["temp_bytes"] - sgd["temp_bytes"]) / result["param_bytes"]


def _cell_bytes(r: dict[str, Any]) -> str:
    k = f"{r['k']}" + (f", {r['hvps']} HVP" if r["hvps"] else "")
    if r["bytes_x"] is None:
        return f"- ({k})"
    return f"{r['bytes_x']:.2f} ({k})" + ("" if r["within_bound"] else " over")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table. ``bytes x SGD (k)``: collective bytes over SGD's on the
    same mesh, and the row's gradient evaluations (``over``: beyond 1.05 k, an HVP counted
    twice); ``temp over SGD``: in copies of one device's share of the parameters."""
    header = [
        "row",
        "layout",
        "mesh",
        "traces",
        "bytes x SGD (k)",
        "temp over SGD, per-device param copies",
        "full concat",
        "outputs resharded (unpinned)",
    ]
    float64 = any("float64_error" in r for r in rows)
    header += ["float64 error"] if float64 else []
    cells = []
    for r in rows:
        if not r["traces"]:
            cells.append(
                [r["row"], r["layout"], f"{r['mesh']} {r['mesh_shape']}", f"no: {r['error']}"]
                + ["-"] * (len(header) - 4)
            )
            continue
        temp = "-" if r["temp_copies"] is None else f"{r['temp_copies']:.2f}"
        resharded = r["resharded_unpinned"]
        cell = [
            r["row"],
            r["layout"],
            f"{r['mesh']} {r['mesh_shape']}",
            "yes",
            _cell_bytes(r),
            temp,
            "yes" if r["full_concat"] else "no",
            "did not compile" if resharded == -1 else str(resharded),
        ]
        if float64:
            error = r.get("float64_error")
            cell.append("-" if error is None else f"{error:.1e}")
        cells.append(cell)
    return tables.table(header, cells, markdown=True)


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``python -m experiments.benchmark --sharded``: the table of ``args.rows`` (default
    :data:`ROWS`) on ``args.layouts`` x ``args.meshes``, a line per row as it is measured,
    with the load average before and after; ``args.json``: the rows, also to that file."""
    devices = default_devices()
    rows = args.rows or list(ROWS)
    params = mlp_params(jax.random.key(0), args.sizes)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"{len(devices)} x {devices[0].platform}: {devices[0].device_kind}, jax "
        f"{jax.__version__}, optax {optax.__version__}; MLP {args.sizes} + 10-class head, "
        f"{n / 1e6:.1f} M parameters ({4 * n / 2**20:.0f} MiB float32), batch {BATCH_SIZE}"
    )
    before = _load_average("before")
    start = time.perf_counter()
    results = measure_rows(
        rows,
        args.layouts,
        args.meshes,
        sizes=args.sizes,
        float64=args.float64,
        log=lambda line: print(f"{line} ({time.perf_counter() - start:.0f} s)", flush=True),
    )
    print(format_table(results))
    after = _load_average("after")
    if args.json:
        with open(args.json, "w") as f:
            record = {"device": devices[0].device_kind, "jax": jax.__version__, "rows": results}
            json.dump({**record, "load_average": {"before": before, "after": after}}, f, indent=1)
    return results


def _load_average(moment: str) -> float:
    one, five, fifteen = os.getloadavg()
    print(f"load average {moment}: {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)")
    return one


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(
        __spec__, "python -m experiments.benchmark --sharded", "the sharded steps' measures"
    )
