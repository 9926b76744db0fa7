"""The tests of sharded parameters compare with one device in float64."""

import jax

jax.config.update("jax_enable_x64", True)
