"""gam-optax: GAM and the SAM family as Optax gradient transformations."""

import warnings as _warnings
from typing import Any as _Any

from gam_optax import flatness
from gam_optax._every_gradient import every_gradient
from gam_optax._frame import PerturbationState
from gam_optax._gam import GAMState, gam
from gam_optax._penalty import GAMPenaltyState, gam_penalty, sam_gam
from gam_optax._penalty import gam_hessian as gam_hessian  # deprecated, not in __all__
from gam_optax._presets import GAM_PRESETS, RELEASED_NAMES, from_released_names, gam_preset
from gam_optax._reuse import ReuseState, looksam, reuse
from gam_optax._sam import GSAM_PRESETS, SAM_PRESETS, SAMState, gsam, gsam_preset, sam, sam_preset
from gam_optax._schedules import proportional_schedule
from gam_optax._transparent import (
    TransparentGAMState,
    TransparentState,
    outer_params,
    transparent,
    transparent_gam,
    transparent_phase,
)

# The one place the version is written: pyproject.toml reads it from here (setuptools'
# dynamic version), so the installed metadata and gam_optax.__version__ always agree.
__version__ = "0.1.0"

__all__ = [
    "GAM_PRESETS",
    "GSAM_PRESETS",
    "RELEASED_NAMES",
    "SAM_PRESETS",
    "GAMPenaltyState",
    "GAMState",
    "PerturbationState",
    "ReuseState",
    "SAMState",
    "TransparentGAMState",
    "TransparentState",
    "every_gradient",
    "flatness",
    "from_released_names",
    "gam",
    "gam_penalty",
    "gam_preset",
    "gsam",
    "gsam_preset",
    "looksam",
    "outer_params",
    "proportional_schedule",
    "reuse",
    "sam",
    "sam_gam",
    "sam_preset",
    "transparent",
    "transparent_gam",
    "transparent_phase",
]

# Deprecated names, kept for one release: gam_hessian (a function that warns when called)
# and GAMHessianState (warns when looked up).
_DEPRECATED = {"GAMHessianState": ("GAMPenaltyState", GAMPenaltyState)}


def __getattr__(name: str) -> _Any:
    if name in _DEPRECATED:
        new, value = _DEPRECATED[name]
        _warnings.warn(
            f"gam_optax.{name} is deprecated and will be removed after 0.1.0; use "
            f"gam_optax.{new} (the same class).",
            DeprecationWarning,
            stacklevel=2,
        )
        return value
    raise AttributeError(f"module 'gam_optax' has no attribute {name!r}")
