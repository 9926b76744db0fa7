"""Every member of the family, in every mode, with the parameters sharded as users shard
them: FSDP (8 devices), Megatron tensor parallelism and both (2 x 4), on Explicit and Auto
meshes, jitted with the shardings in (8 fake CPU devices, float64: ``conftest.py``).

For each row, layout and mesh kind, read from the compiled program and its outputs:

- it traces and compiles;
- without ``out_shardings``, the params and the state come out sharded as they went in (on
  an Auto mesh the compiler chooses: there, no leaf SGD keeps);
- no ``concatenate`` holds every parameter (a flat vector that undoes the sharding);
- its collectives move at most ``1.05 k`` times SGD's bytes, for its ``k`` gradients (a
  Hessian-vector product counted as two), scalars (the loss, the norms) left out;
- two steps equal two steps on one device to 1e-12.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshes import mesh_of, reshard, use_mesh

import gam_optax
from experiments import hlo

SIZES = (16, 32, 16, 32)  # a tanh MLP, then an 8-class head
CLASSES = 8
BATCH = 32

# row -> (the transformation before SGD, or the wrapper around it; gradients per step, an
# HVP counted as 2; whether update takes loss_fn)
SGD = lambda: optax.sgd(0.1, momentum=0.9)
ROWS = {
    "sgd": (lambda: optax.with_extra_args_support(SGD()), 1),
    "sam": (lambda: optax.chain(gam_optax.sam(0.05), SGD()), 2),
    "sam(flat=True)": (lambda: optax.chain(gam_optax.sam(0.05, flat=True), SGD()), 2),
    "gsam": (lambda: optax.chain(gam_optax.gsam(0.05), SGD()), 2),
    "gam": (lambda: optax.chain(gam_optax.gam(), SGD()), 4),
    "gam(flat=False)": (lambda: optax.chain(gam_optax.gam(flat=False), SGD()), 4),
    "gam(unroll=False)": (lambda: optax.chain(gam_optax.gam(unroll=False), SGD()), 4),
    "gam(hessian=True)": (lambda: optax.chain(gam_optax.gam(hessian=True), SGD()), 6),
    "gam_penalty": (lambda: optax.chain(gam_optax.gam_penalty(0.1, 0.5), SGD()), 6),
    "gam_penalty(hvp_step)": (
        lambda: optax.chain(gam_optax.gam_penalty(0.1, 0.5, hvp_step=0.01), SGD()),
        4,
    ),
    "sam_gam": (lambda: optax.chain(gam_optax.sam_gam(0.1, 0.5, sam_rho=0.05), SGD()), 7),
    "transparent(sam)": (lambda: gam_optax.transparent(gam_optax.sam(0.05), SGD()), 1),
    "transparent(gam)": (lambda: gam_optax.transparent(gam_optax.gam(), SGD()), 1),
    "reuse(gam)": (lambda: optax.chain(gam_optax.reuse(gam_optax.gam(), every=2), SGD()), 4),
}


# ---------------------------------------------------------------------------------------
# The model, written for both mesh kinds, and the layouts.
# ---------------------------------------------------------------------------------------


def init_params(key):
    widths = [*SIZES, CLASSES]
    names = [f"layer{i}" for i in range(len(SIZES) - 1)] + ["head"]
    keys = jax.random.split(key, len(names))
    return {
        name: {
            "kernel": jax.random.normal(k, (m, n)) / math.sqrt(m),
            "bias": 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (n,)),
        }
        for name, k, m, n in zip(names, keys, widths[:-1], widths[1:], strict=True)
    }


def _explicit(x):
    sharding = jax.typeof(x).sharding
    return not sharding.mesh.empty and any(
        t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types
    )


def gathered(x):
    """FSDP's gather: ``x`` resharded with ``'data'`` dropped from its spec."""
    spec = (*jax.typeof(x).sharding.spec, *(None,) * x.ndim)[: x.ndim]
    return reshard(x, P(*(None if a == "data" else a for a in spec)))


def dense(x, kernel, bias):
    """``x @ kernel + bias``. On an Explicit mesh the program says what the compiler infers
    on an Auto one: FSDP's gather (the weights resharded without ``'data'``) and the output's
    sharding (the batch's rows, the kernel's columns)."""
    if not _explicit(kernel):
        return x @ kernel + bias
    kernel, bias = gathered(kernel), gathered(bias)
    columns = (
        jax.typeof(kernel).sharding.spec[1] if len(jax.typeof(kernel).sharding.spec) > 1 else None
    )
    return jnp.einsum("bi,io->bo", x, kernel, out_sharding=P("data", columns)) + bias


def loss(params, batch):
    x, labels = batch
    for i in range(len(SIZES) - 1):
        layer = params[f"layer{i}"]
        x = jnp.tanh(dense(x, layer["kernel"], layer["bias"]))
    logits = dense(x, params["head"]["kernel"], params["head"]["bias"])
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, CLASSES), -1))


def fsdp(params):  # every leaf split over all 8 devices along its largest dimension
    def spec(x):
        split = int(np.argmax(x.shape))
        return P(*("data" if d == split else None for d in range(x.ndim)))

    return jax.tree.map(spec, params)


def tp(params):  # Megatron: column- then row-parallel layers, the head replicated
    specs = {}
    for i in range(len(SIZES) - 1):
        column = i % 2 == 0
        specs[f"layer{i}"] = (
            {"kernel": P(None, "model"), "bias": P("model")}
            if column
            else {"kernel": P("model", None), "bias": P()}
        )
    specs["head"] = {"kernel": P(), "bias": P()}
    return specs


def fsdp_tp(params):  # tp, and each kernel also split over 'data' on its other dimension
    specs = tp(params)
    for name in specs:
        kernel = (*specs[name]["kernel"], None, None)
        free = kernel.index(None)
        specs[name]["kernel"] = P(*("data" if d == free else kernel[d] for d in range(2)))
    return specs


LAYOUTS = {
    "fsdp": ((8,), ("data",), fsdp),
    "tp": ((2, 4), ("data", "model"), tp),
    "fsdp_tp": ((2, 4), ("data", "model"), fsdp_tp),
}
MESHES = ("explicit", "auto")
PARAMS = init_params(jax.random.key(0))
N_PARAMS = sum(x.size for x in jax.tree.leaves(PARAMS))
BATCHES = [
    (
        jax.random.normal(jax.random.key(1 + i), (BATCH, SIZES[0])),
        jax.random.randint(jax.random.key(10 + i), (BATCH,), 0, CLASSES),
    )
    for i in range(2)
]


def make_step(tx):
    takes_loss_fn = not isinstance(tx.init(PARAMS), gam_optax.TransparentState)

    def step(params, state, batch):
        loss_fn = lambda p: loss(p, batch)
        g0 = jax.grad(loss_fn)(params)
        extra = {"loss_fn": loss_fn} if takes_loss_fn else {}
        updates, state = tx.update(g0, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step


# ---------------------------------------------------------------------------------------
# The programs.
# ---------------------------------------------------------------------------------------


@functools.cache
def placed(row, layout, kind):
    """The mesh, and the params, state and batches placed on it (the state as ``init`` of
    the placed params builds it; a leaf it leaves off the mesh, a count, replicated)."""
    shape, names, specs = LAYOUTS[layout]
    mesh = mesh_of(shape, names, kind)
    tx = ROWS[row][0]()
    with use_mesh(mesh):
        params = jax.device_put(
            PARAMS, jax.tree.map(lambda s: NamedSharding(mesh, s), specs(PARAMS))
        )
        state = tx.init(params)
        on_mesh = lambda x: (
            x.sharding
            if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
            else NamedSharding(mesh, P())
        )
        state = jax.tree.map(lambda x: jax.device_put(x, on_mesh(x)), state)
        batches = [jax.device_put(b, NamedSharding(mesh, P("data"))) for b in BATCHES]
    return mesh, tx, params, state, batches


@functools.cache
def compiled(row, layout, kind, pinned):
    """The row's step compiled with the inputs' shardings in, and out when ``pinned``. On an
    Explicit mesh the types carry the shardings and the test asserts that the unpinned
    program returns them unchanged, so that program serves as the pinned one: one compile
    instead of two."""
    if pinned and kind == "explicit":
        return compiled(row, layout, kind, False)
    mesh, tx, params, state, batches = placed(row, layout, kind)
    shardings = jax.tree.map(lambda x: x.sharding, (params, state, batches[0]))
    out = {"out_shardings": shardings[:2]} if pinned else {}
    with use_mesh(mesh):
        step = jax.jit(make_step(tx), in_shardings=shardings, **out)
        return step.lower(params, state, batches[0]).compile()


def resharded(row, layout, kind):
    """The parameters (``('layer1', 'bias')``) whose leaves, in the params or anywhere in the
    state, the unpinned program returns sharded otherwise than they went in."""
    _, _, params, state, _ = placed(row, layout, kind)
    out = compiled(row, layout, kind, False).output_shardings
    flat, _ = jax.tree_util.tree_flatten_with_path((params, state))
    got = jax.tree.leaves(out, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert len(got) == len(flat)
    names = lambda path: tuple(k.key for k in path if hasattr(k, "key"))[-2:]
    return {
        names(path)
        for (path, x), s in zip(flat, got, strict=True)
        if not s.is_equivalent_to(x.sharding, x.ndim)
    }


@functools.cache
def one_device(row):
    """Two steps on one device, from the same params and batches."""
    tx = ROWS[row][0]()
    step = jax.jit(make_step(tx))
    params, state = PARAMS, tx.init(PARAMS)
    for batch in BATCHES:
        params, state = step(params, state, batch)
    return params


# fsdp_tp is measured by `python -m experiments.benchmark --sharded`; the tests keep to two
# layouts for time.
CASES = [(r, l, k) for r in ROWS for l in ("fsdp", "tp") for k in MESHES]  # noqa: E741


# Measured over the bound, kept as strict expected failures so that a fix shows. The exact
# modes' forward-over-reverse HVPs on tensor-parallel layers move 1.1-1.2 x two gradients'
# bytes: the tangent of each split matmul, dx @ W + x @ dW, is all-reduced as two partial
# products rather than one sum (JAX's rule for the model's matmuls; XLA:CPU does not
# reassociate them). transparent's lax.switch on an Auto mesh leaves some of the state's
# placement to the compiler (1.16 x, 1.47 x SGD's bytes per call).
OVER_THE_BOUND = {
    ("gam(hessian=True)", "tp", "explicit"),
    ("gam_penalty", "tp", "explicit"),
    ("sam_gam", "tp", "explicit"),
    ("transparent(sam)", "tp", "auto"),
    ("transparent(gam)", "tp", "auto"),
}
CASES = [
    pytest.param(*c, marks=pytest.mark.xfail(strict=True, reason="over the bound: open"))
    if c in OVER_THE_BOUND
    else c
    for c in CASES
]


@pytest.mark.parametrize(
    "row, layout, kind", CASES, ids=lambda v: v if isinstance(v, str) else None
)
def test_a_member_on_sharded_params(row, layout, kind):
    text = compiled(row, layout, kind, True).as_text()

    # Shardings kept without out_shardings: all of them on an Explicit mesh (the types say
    # them); on an Auto mesh, every leaf SGD's program keeps.
    changed = resharded(row, layout, kind)
    if kind == "explicit":
        assert not changed, f"{row} returns {sorted(changed)} resharded"
    else:
        extra = changed - resharded("sgd", layout, kind)
        assert not extra, f"{row} reshards {sorted(extra)}, which SGD keeps"

    # No flat vector of every parameter on a device.
    assert max(hlo.concatenates(text), default=0) < N_PARAMS

    # The collectives: at most what its gradients need (the scalars left out).
    k = ROWS[row][1]
    moved = hlo.collective_bytes(text, min_elements=2)
    sgd = hlo.collective_bytes(compiled("sgd", layout, kind, True).as_text(), min_elements=2)
    assert sgd > 0
    assert moved <= 1.05 * k * sgd, f"{row}: {moved / sgd:.2f} x SGD's bytes for {k} gradients"

    # Two float64 steps equal one device's.
    mesh, _, params, state, batches = placed(row, layout, kind)
    with use_mesh(mesh):
        for batch in batches:
            params, state = compiled(row, layout, kind, True)(params, state, batch)
    expected = one_device(row)
    for name in PARAMS:
        for leaf in PARAMS[name]:
            got = params[name][leaf]
            placed_as = placed(row, layout, kind)[2][name][leaf].sharding
            assert got.sharding.is_equivalent_to(placed_as, got.ndim), (got.sharding, placed_as)
            np.testing.assert_allclose(
                np.asarray(got),
                np.asarray(expected[name][leaf]),
                rtol=0,
                atol=1e-12,
                err_msg=f"{row} {name}.{leaf}",
            )
