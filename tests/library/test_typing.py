"""mypy sees the library's signatures (``gam_optax/py.typed``): a user's script type-checks,
and a misspelt keyword is an error."""

import pathlib
import subprocess
import sys

import pytest

# Outside the fast tier (CONTRIBUTING.md): Flax, flatness, README examples, mypy.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).parents[2]


def test_mypy_checks_a_user_script_against_the_signatures(tmp_path):
    scripts = ["tests/library/typing/user_script.py", "tests/library/typing/misspelt.py"]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path), *scripts],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert errors == [
        'tests/library/typing/misspelt.py:5: error: Unexpected keyword argument "rhoo" for "gam"; '
        'did you mean "rho"?  [call-arg]'
    ], result.stdout
