"""Every ```python block of the README runs as written, and does what the text around it says.

Each block is recognised by a line it contains and runs in a namespace with the few names
it assumes (a model, data, a loss); the test then checks the block's claims. A new block
must get an entry in ``SCAFFOLDS`` (or in another test, named in ``ELSEWHERE``): the first
test fails until it has one.
"""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gam_optax

README = pathlib.Path(__file__).parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def block(marker: str) -> str:
    found = [b for b in BLOCKS if marker in b]
    assert len(found) == 1, f"expected one README block containing {marker!r}, found {len(found)}"
    return found[0]


def data(n=32, d=6, k=3):
    """A learnable problem: the label is the largest of the first k features."""
    x = jax.random.normal(jax.random.key(0), (n, d))
    return x, jnp.argmax(x[:, :k], axis=1)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(16)(x))
        return nn.Dense(3)(nn.relu(x))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.1, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jax.nn.relu(self.bn(self.hidden(x)))))


def quick_start():
    """The first screen: `tx.update(..., loss_fn=...)` in your own jitted step."""
    x, y = data()
    params = {"w": jnp.zeros((6, 3)), "b": jnp.zeros(3)}

    def loss(p, batch):
        logits = batch[0] @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    namespace = {"params": params, "loss": loss}
    exec(block("def train_step(params, state, batch):"), namespace)
    params, state, losses = namespace["params"], namespace["state"], []
    for _ in range(30):
        losses.append(float(loss(params, (x, y))))
        params, state = namespace["train_step"](params, state, (x, y))
    assert losses[-1] < 0.8 * losses[0]


def flatness_measures():
    """Lanczos gives the top eigenvalue: checked on a quadratic with a known Hessian."""
    a = jnp.diag(jnp.array([5.0, 2.0, 1.0, 0.5]))
    batches = jnp.ones((3, 2))  # leading axis B, unused by the loss

    def loss_fn(p, batch):
        return 0.5 * p @ a @ p + 0.0 * jnp.sum(batch)

    namespace = {"jax": jax, "loss_fn": loss_fn, "batches": batches, "params": jnp.ones(4)}
    exec(block("from gam_optax import flatness"), namespace)
    top = namespace["flatness"].hessian_top_eigenvalue(
        namespace["loss"], namespace["params"], jax.random.key(0)
    )
    assert float(top) == pytest.approx(5.0, rel=1e-4)


def linen():
    """Linen: loss_fn forwarded, step counted, BatchNorm statistics from the g0 pass move."""
    x, y = data()
    model = LinenNet()
    variables = model.init(jax.random.key(1), x, train=False)
    cross_entropy = lambda logits, labels: optax.softmax_cross_entropy_with_integer_labels(
        logits, labels
    ).mean()
    namespace = dict(jax=jax, optax=optax, gam_optax=gam_optax, model=model)
    namespace.update(variables=variables, cross_entropy=cross_entropy)
    exec(block("gam_optax.flax.TrainState.create("), namespace)
    state, losses = namespace["state"], []
    for _ in range(20):
        state, loss = namespace["train_step"](state, {"image": x, "label": y})
        losses.append(float(loss))
    assert int(state.step) == 20
    assert losses[-1] < 0.8 * losses[0]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.batch_stats,
                         variables["batch_stats"])  # fmt: skip
    assert min(jax.tree.leaves(moved)) > 1e-3


def nnx_recipe():
    """NNX: the loss goes down, BatchNorm statistics move, the step counter counts."""
    x, y = data()
    model = NNXNet(nnx.Rngs(0))
    tx = optax.chain(gam_optax.gam(rho=0.1, rho_prime=0.02), optax.sgd(0.1))
    namespace = dict(jax=jax, optax=optax, model=model, tx=tx)
    exec(block("nnx_loss_fn(model, loss)"), namespace)
    train_step, optimizer = namespace["train_step"], namespace["optimizer"]
    mean_before = np.asarray(model.bn.mean[...]).copy()
    losses = [float(train_step(model, optimizer, x, y)) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0]
    assert int(optimizer.step[...]) == 20
    assert float(np.max(np.abs(np.asarray(model.bn.mean[...]) - mean_before))) > 1e-3


def clipping():
    """Both chains train; their first step is clipped (the gradient's norm is above 1)."""
    x, y = data()
    params = {"w": jnp.zeros((6, 3)), "b": jnp.zeros(3)}
    loss = lambda p: (
        10 * optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean()
    )
    assert float(optax.tree.norm(jax.grad(loss)(params))) > 2.0
    namespace = dict(optax=optax, gam_optax=gam_optax)
    exec(block("gam_optax.every_gradient("), namespace)
    for name in ("clip_the_direction", "clip_every_gradient"):
        tx, p = namespace[name], params
        state = tx.init(p)
        step = jax.jit(lambda p, s, tx=tx: tx.update(jax.grad(loss)(p), s, p, loss_fn=loss))
        for i in range(20):
            updates, state = step(p, state)
            if i == 0:  # lr 0.1 along a direction of norm <= 1
                assert float(optax.tree.norm(updates)) <= 0.1 + 1e-6
            p = optax.apply_updates(p, updates)
        assert float(loss(p)) < 0.8 * float(loss(params))


def transparent():
    """Flax's own TrainState with transparent_gam: it trains; 4 calls a step; outer_params."""
    x, y = data()
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), x)
    loss = lambda p, batch: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, batch[0]), batch[1]
    ).mean()
    batches = [(x, y)] * 10
    namespace = dict(jax=jax, optax=optax, gam_optax=gam_optax, model=model)
    namespace.update(params=params, loss=loss, batches=batches)
    exec(block("gam_optax.transparent_gam("), namespace)
    state = namespace["state"]
    assert int(state.step) == 40 and int(gam_optax.transparent_phase(state.opt_state)) == 0
    jax.tree.map(np.testing.assert_array_equal, namespace["params"], state.params)
    assert float(loss(state.params, (x, y))) < 0.8 * float(loss(params, (x, y)))


SCAFFOLDS = {
    "def train_step(params, state, batch):": quick_start,
    "from gam_optax import flatness": flatness_measures,
    "gam_optax.flax.TrainState.create(": linen,
    "nnx_loss_fn(model, loss)": nnx_recipe,
    "gam_optax.every_gradient(": clipping,
    "gam_optax.transparent_gam(": transparent,
}
ELSEWHERE = {
    "CPU_OPTIONS": "tests/library/test_performance.py",
    "def max_pool_2x2": "tests/library/test_performance.py",
    "sam_rho=": "tests/library/test_sam_gam.py",
}


def test_every_readme_block_is_run_by_a_test():
    markers = [*SCAFFOLDS, *ELSEWHERE]
    for text in BLOCKS:
        owners = [m for m in markers if m in text]
        assert len(owners) == 1, f"README block without exactly one test:\n{text[:300]}"


@pytest.mark.parametrize("marker", list(SCAFFOLDS))
def test_readme_block_runs_and_does_what_it_says(marker):
    SCAFFOLDS[marker]()
