"""A user's script, type-checked by mypy in CI (``mypy tests/library/typing``).

``gam_optax/py.typed`` makes mypy read the library's annotations: the signatures are real
(a misspelt keyword is an error, see ``misspelt.py``). Optax ships no type information, so
its own types are ``Any`` to mypy, and so is every type built from them.
"""

import jax
import jax.numpy as jnp
import optax

import gam_optax
import gam_optax.flax
from gam_optax import flatness

tx = optax.chain(gam_optax.gam(rho=0.2, rho_prime=0.02), optax.sgd(0.1, momentum=0.9))
amortised = gam_optax.reuse(gam_optax.gam(), every=5, alpha=0.7, rescale=False)
family = [
    gam_optax.sam(0.05, adaptive=True),
    gam_optax.gsam(0.05, 0.1),
    gam_optax.gam_penalty(0.1, 0.5),
    gam_optax.sam_gam(0.1, 0.5, sam_rho=0.05),
    gam_optax.looksam(0.05, every=5),
]
radii: dict[str, float] = gam_optax.gam_preset("cifar100_resnet")

params = {"w": jnp.zeros(3)}
loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
state = tx.init(params)
updates, state = tx.update(jax.grad(loss)(params), state, params, loss_fn=loss)
params = optax.apply_updates(params, updates)
top = flatness.hessian_top_eigenvalue(loss, params, jax.random.key(0))
train_state = gam_optax.flax.TrainState.create(apply_fn=None, params=params, tx=tx)
