"""Flax programs that drive gam_optax: models, data, the training loop, configs."""


class ConfigError(ValueError):
    """Bad user input (a name, a size, a workdir): the message says what to do about it."""


class TrainingDiverged(ConfigError):
    """The loss or the parameters became NaN or infinite (a learning rate or radius too large
    for the model); the message names the step and the last good checkpoint."""
