"""Flax programs that drive gam_optax: models, data, the training loop, configs."""

from __future__ import annotations

import sys
from typing import Any, NoReturn


class ConfigError(ValueError):
    """Bad user input (a name, a size, a workdir): the message says what to do about it."""


class TrainingDiverged(ConfigError):
    """The loss or the parameters became NaN or infinite (a learning rate or radius too large
    for the model); the message names the step and the last good checkpoint."""


def not_a_program(spec: Any, instead: str, what: str = "it defines functions") -> NoReturn:
    """Ends ``python -m MODULE`` of a module that runs nothing (whatever its arguments): one
    ``error:`` line naming the command to run instead, and exit status 1.

    Every module of experiments/ that is not a program ends with
    ``if __name__ == "__main__": not_a_program(__spec__, "python -m ...", "what it is")``
    (``__spec__`` is None where the file itself was run).
    """
    module = f"python -m {spec.name}" if spec else f"python {sys.argv[0]}"
    sys.exit(f"error: {module} is not a program ({what}); run {instead} instead.")
