"""gam-optax: GAM and the SAM family as Optax gradient transformations."""

from gam_optax._gam import GAMState, gam
from gam_optax._presets import GAM_PRESETS, RELEASED_NAMES, from_released_names, gam_preset
from gam_optax._schedules import proportional_schedule

__version__ = "0.1.0"

__all__ = [
    "GAM_PRESETS",
    "RELEASED_NAMES",
    "GAMState",
    "from_released_names",
    "gam",
    "gam_preset",
    "proportional_schedule",
]
