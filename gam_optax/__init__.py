"""gam-optax: GAM and the SAM family as Optax gradient transformations."""

from gam_optax import flatness
from gam_optax._every_gradient import every_gradient
from gam_optax._gam import GAMState, gam
from gam_optax._gam_hessian import GAMHessianState, gam_hessian
from gam_optax._presets import GAM_PRESETS, RELEASED_NAMES, from_released_names, gam_preset
from gam_optax._reuse import ReuseState, looksam, reuse
from gam_optax._sam import GSAM_PRESETS, SAM_PRESETS, SAMState, gsam, gsam_preset, sam, sam_preset
from gam_optax._schedules import proportional_schedule
from gam_optax._transparent import (
    TransparentGAMState,
    outer_params,
    transparent_gam,
    transparent_phase,
)

__version__ = "0.1.0"

__all__ = [
    "GAM_PRESETS",
    "GSAM_PRESETS",
    "RELEASED_NAMES",
    "SAM_PRESETS",
    "GAMHessianState",
    "GAMState",
    "ReuseState",
    "SAMState",
    "TransparentGAMState",
    "every_gradient",
    "flatness",
    "from_released_names",
    "gam",
    "gam_hessian",
    "gam_preset",
    "gsam",
    "gsam_preset",
    "looksam",
    "outer_params",
    "proportional_schedule",
    "reuse",
    "sam",
    "sam_preset",
    "transparent_gam",
    "transparent_phase",
]
