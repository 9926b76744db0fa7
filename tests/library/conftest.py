"""The problems the library's tests share: softmax regression (``test_gam.make_problem``)
in float32, and in float64 for the claims of data-parallel equality."""

import jax
import jax.numpy as jnp
import pytest
from test_gam import make_problem


@pytest.fixture(scope="module")
def f32_problem():
    x, y, params = make_problem(n=32, seed=5)
    return x, y, jax.tree.map(jnp.float32, params)


@pytest.fixture
def sharded_problem(x64):
    """In float64: each test claims "the same computation, split over devices", whose float32
    rounding depends on the CPU's kernels; float64 splits agree to ~1e-15 (tolerance 1e-10)."""
    assert jax.device_count() == 4, "the root conftest.py sets 4 fake CPU devices"
    x, y, params = make_problem(n=32, d=6, k=4, seed=6)
    return x, y, jax.tree.map(jnp.float64, params)
