"""The flat view of sharded parameters: one array per sharding group, each device's row its
own shards, built and undone without a collective (8 fake CPU devices, root conftest).

On one device the view is one vector (``test_flat.py``); the members on sharded parameters
end to end: ``test_sharded.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from meshes import mesh_of as mesh_with
from meshes import use_mesh

from gam_optax._views import FlatView

# Leaf -> its spec on a ('data': 2, 'model': 4) mesh; jax.tree.leaves' order is the keys'.
SPECS = {
    "a_column": P(None, "model"),  # group ('model',)
    "b_replicated": P(),  # group ()
    "c_row": P("model", None),  # group ('model',)
    "d_both": P("data", "model"),  # group ('data', 'model')
    "e_transposed": P("model", "data"),  # group ('data', 'model'): rows in mesh order
    "f_joint": P(("data", "model")),  # group ('data', 'model'): one dimension over both
    "g_vector": P("model"),  # group ('model',)
}
SHAPES = {
    "a_column": (3, 8),
    "b_replicated": (5,),
    "c_row": (4, 2),
    "d_both": (2, 8),
    "e_transposed": (4, 6),
    "f_joint": (16,),
    "g_vector": (12,),
}
COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def mesh_of(kind):
    return mesh_with((2, 4), ("data", "model"), kind)


def placed(mesh):
    start = 0
    tree = {}
    for name, shape in SHAPES.items():
        size = int(np.prod(shape))
        values = jnp.arange(start, start + size, dtype=jnp.float32).reshape(shape)
        tree[name] = jax.device_put(values, NamedSharding(mesh, SPECS[name]))
        start += size
    return tree


def test_explicit_groups_hold_each_devices_own_shards_and_come_back_unchanged():
    mesh = mesh_of("explicit")
    tree = placed(mesh)

    def round_trip(t):
        view = FlatView(t)
        flat = view.flat(t)
        return flat, view.tree(flat, t)

    with use_mesh(mesh):
        compiled = jax.jit(round_trip).lower(tree).compile()
        flat, back = compiled(tree)
    text = compiled.as_text()
    assert not [op for op in COLLECTIVES if f" {op}(" in text or f" {op}-start(" in text]
    # Three groups, in order of first appearance: ('model',), (), ('data', 'model').
    assert [x.shape for x in flat] == [(4, 6 + 2 + 3), (5,), (2, 4, 2 + 3 + 2)]
    assert [x.sharding.spec for x in flat] == [
        P("model", None),
        P(None),
        P("data", "model", None),
    ]
    # Each device's shard of a group's array is its own shards of the leaves, in order.
    for array, names in ((flat[0], "acg"), (flat[2], "def")):
        for shard in array.addressable_shards:
            own = [
                next(s for s in tree[n].addressable_shards if s.device == shard.device).data
                for n in SPECS
                if n[0] in names
            ]
            np.testing.assert_array_equal(
                np.ravel(shard.data), np.concatenate([np.ravel(x) for x in own])
            )
    for name in SPECS:
        np.testing.assert_array_equal(back[name], tree[name])
        assert back[name].sharding.is_equivalent_to(tree[name].sharding, back[name].ndim)


def test_auto_leaves_stay_in_their_own_shape_one_group_each():
    mesh = mesh_of("auto")
    tree = placed(mesh)
    view_shapes = jax.eval_shape(lambda t: FlatView(t).flat(t), tree)
    assert [x.shape for x in view_shapes] == [SHAPES[n] for n in SPECS]


def test_a_mask_runs_along_each_groups_rows():
    mesh = mesh_of("explicit")
    tree = placed(mesh)
    flags = {n: n in ("a_column", "d_both") for n in SPECS}
    captured = {}

    def run(t):
        captured["mask"] = FlatView(t).mask(flags)
        return 0

    with use_mesh(mesh):
        jax.eval_shape(run, tree)
    column, replicated, both = captured["mask"]
    np.testing.assert_array_equal(column, [True] * 6 + [False] * 2 + [False] * 3)
    np.testing.assert_array_equal(replicated, [False] * 5)
    np.testing.assert_array_equal(both, [True] * 2 + [False] * 3 + [False] * 2)
