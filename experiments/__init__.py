"""Flax programs that drive gam_optax: models, data, the training loop, configs."""


class ConfigError(ValueError):
    """Bad user input (a name, a size, a workdir): the message says what to do about it."""
