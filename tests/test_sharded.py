"""The tests of sharded parameters (``tests/sharded``), on 8 fake CPU devices.

JAX fixes the device count when it starts, and the rest of the suite runs on 4 (the root
``conftest.py``), so this test runs ``tests/sharded`` in a pytest of its own with
``GAM_OPTAX_TEST_DEVICES=8`` and fails with its output when any of them fails. To run them
directly: ``GAM_OPTAX_TEST_DEVICES=8 python -m pytest tests/sharded``.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
def test_the_sharded_tests_pass_on_8_devices():
    env = {**os.environ, "GAM_OPTAX_TEST_DEVICES": "8"}
    env.pop("XLA_FLAGS", None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "--doctest-modules",
            "tests/sharded",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = run.stdout.strip().splitlines()[-1:] or ["(no output)"]
    assert run.returncode == 0, (
        f"tests/sharded: {summary[0]}\n{run.stdout[-8000:]}{run.stderr[-2000:]}"
    )
    assert " passed" in summary[0] and not re.search(r"\d+ (failed|error)", summary[0]), summary[0]
