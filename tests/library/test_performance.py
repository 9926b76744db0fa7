"""The README's CPU fast path runs and computes what plain jax.jit computes."""

import pathlib
import re

import jax
import numpy as np
import pytest

# Outside the fast tier (CONTRIBUTING.md): Flax, flatness, README examples, mypy.
pytestmark = pytest.mark.slow

README = pathlib.Path(__file__).parents[2] / "README.md"


def performance_block() -> str:
    section = README.read_text().split("## Performance", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_fast_path_equals_plain_jit(x64):
    namespace = {}
    exec(performance_block(), namespace)  # three steps of the compiled, donated step
    assert "xla_cpu_experimental_ynn_fusion_type" in namespace["CPU_OPTIONS"]
    step = jax.jit(namespace["train_step"])
    params = {"k": jax.random.normal(jax.random.key(0), (8, 3, 3, 3)) * 0.3}
    opt_state, x = namespace["tx"].init(params), namespace["x"]
    for _ in range(3):
        params, opt_state = step(params, opt_state, x)
    assert params["k"].dtype == namespace["params"]["k"].dtype == np.float64
    # float64: the two compilations differ only in the order of the convolutions' sums.
    np.testing.assert_allclose(namespace["params"]["k"], params["k"], rtol=1e-10, atol=1e-12)
    assert not np.allclose(params["k"], jax.random.normal(jax.random.key(0), (8, 3, 3, 3)) * 0.3)


def test_readme_reshape_max_pool_equals_flax_max_pool_and_its_gradient(x64):
    import flax.linen as nn

    section = README.read_text().split("## Performance", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(def max_pool_2x2.*?)```", section, re.S).group(1)
    namespace = {}
    exec(block, namespace)
    pool = namespace["max_pool_2x2"]
    x = jax.random.normal(jax.random.key(0), (3, 8, 6, 5))  # float64: no ties after ReLU > 0
    reference = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(pool(x), reference(x))
    weights = jax.random.normal(jax.random.key(1), (3, 4, 3, 5))
    loss = lambda f: lambda x: (f(jax.nn.relu(x)) * weights).sum()
    np.testing.assert_array_equal(jax.grad(loss(pool))(x), jax.grad(loss(reference))(x))
