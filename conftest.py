"""Shared test setup: 4 fake CPU devices for the data-parallel tests, 8 for the sharded ones.

The device count must be set before JAX initialises its backends, so it is set in
this root conftest, which pytest imports before it collects any module. The tests of sharded
parameters (``tests/sharded``) need 8 devices: ``tests/test_sharded.py`` runs them in a
pytest of their own with ``GAM_OPTAX_TEST_DEVICES=8``; the main run does not collect them.
"""

import os

import jax
import pytest

DEVICES = int(os.environ.get("GAM_OPTAX_TEST_DEVICES", "4"))
jax.config.update("jax_num_cpu_devices", DEVICES)

# The tests use the newest spellings; older jax releases of the supported range (README,
# "Supported versions") spell three of them differently. gam_optax itself uses
# gam_optax._compat instead of patching jax.
if not hasattr(jax, "enable_x64"):  # jax < 0.8
    from jax.experimental import enable_x64

    jax.enable_x64 = enable_x64
if not hasattr(jax, "shard_map"):  # jax < 0.6.1
    from jax.experimental.shard_map import shard_map

    jax.shard_map = shard_map
if not hasattr(jax.lax, "pcast"):  # jax < 0.8.2: pvary, or no varying types at all
    from gam_optax import _compat

    jax.lax.pcast = lambda x, axis_name, *, to: _compat.to_varying(x, axis_name)


@pytest.fixture
def x64():
    """Run a test in float64 (JAX's default is float32)."""
    with jax.enable_x64(True):
        yield


# Scripts, not tests: mypy's inputs (one must fail to type-check) and a measurement.
collect_ignore = ["tests/library/typing", "tests/experiments/measure_parallel_gaps.py"]
if DEVICES != 8:
    collect_ignore.append("tests/sharded")
