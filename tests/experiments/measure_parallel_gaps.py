"""Largest relative gaps of the data-parallel runs to the one-device run, float64 and float32.

    python tests/experiments/measure_parallel_gaps.py

Builds the runs of ``tests/experiments/test_parallel.py`` (4 fake CPU devices, 3 steps) in both
dtypes; the figures are in ``experiments/RESULTS.md``. Not a test: it prints, and asserts nothing.
"""

import pathlib
import sys
import tempfile

import jax
import numpy as np

jax.config.update("jax_num_cpu_devices", 4)
sys.path.insert(0, str(pathlib.Path(__file__).parent))
import test_parallel  # noqa: E402


def relative_gap(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(
        float(np.max(np.abs(np.asarray(x) - y) / (np.abs(y) + 1e-30)))
        for x, y in ((x, np.asarray(y)) for x, y in pairs)
        if y.dtype.kind == "f"
    )


for dtype in ("float64", "float32"):
    test_parallel.TINY["dtype"] = dtype
    test_parallel.final_state.cache_clear()
    root = tempfile.mkdtemp()
    with jax.enable_x64(dtype == "float64"):
        for optimizer in ("sgd", "gam"):
            one = test_parallel.final_state(root, "none", optimizer)
            for mode in ("jit", "pmap"):
                four = test_parallel.final_state(root, mode, optimizer)
                params = relative_gap(four["params"], one["params"])
                stats = relative_gap(four["batch_stats"], one["batch_stats"])
                print(f"{dtype} {optimizer} {mode}: params {params:.1e}, statistics {stats:.1e}")
