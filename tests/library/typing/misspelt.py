"""mypy must reject this script: ``rhoo`` is not an argument of ``gam`` (test_typing.py)."""

import gam_optax

tx = gam_optax.gam(rhoo=0.1)
