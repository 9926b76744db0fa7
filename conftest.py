"""Shared test setup: 4 fake CPU devices for the data-parallel tests.

The device count must be set before JAX initialises its backends, so it is set in
this root conftest, which pytest imports before it collects any module.
"""

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 4)


@pytest.fixture
def x64():
    """Run a test in float64 (JAX's default is float32)."""
    with jax.enable_x64(True):
        yield


# Scripts, not tests: mypy's inputs (one must fail to type-check) and a measurement.
collect_ignore = ["tests/typing", "tests/measure_parallel_gaps.py"]
