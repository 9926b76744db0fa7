"""The README's CPU fast path runs and computes what plain jax.jit computes."""

import pathlib
import re

import jax
import numpy as np

README = pathlib.Path(__file__).parents[1] / "README.md"


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
