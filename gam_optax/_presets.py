"""The released CIFAR settings of GAM, and the released code's argument names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gam_optax import _validation

# main_cifar.py of the authors' release: (dataset, network) -> hyperparameters.
GAM_PRESETS: Mapping[str, Mapping[str, float]] = {
    "cifar10_resnet": dict(rho=0.2, rho_prime=0.03, alpha=0.1, beta=0.1, gamma=0.05),
    "cifar10_pyramidnet": dict(rho=0.2, rho_prime=0.03, alpha=0.1, beta=0.1, gamma=0.03),
    "cifar100_resnet": dict(rho=0.2, rho_prime=0.02, alpha=0.6, beta=0.5, gamma=0.03),
    "cifar100_pyramidnet": dict(rho=0.2, rho_prime=0.04, alpha=0.5, beta=0.3, gamma=0.05),
}

# The released code's argument names -> the arguments of gam_optax.gam.
# Naming trap: grad_rho is the SMALL radius rho', grad_norm_rho the LARGE radius rho.
RELEASED_NAMES: Mapping[str, str] = {
    "grad_norm_rho": "rho",
    "grad_rho": "rho_prime",
    "grad_beta_1": "alpha",
    "grad_beta_0": "beta",
    "grad_gamma": "gamma",
    "perturb_eps": "eps",
}


def gam_preset(name: str) -> dict[str, float]:
    """The released hyperparameters for one CIFAR setting, as keyword arguments of ``gam``.

    Examples:
      >>> import gam_optax
      >>> gam_optax.gam_preset("cifar100_resnet")
      {'rho': 0.2, 'rho_prime': 0.02, 'alpha': 0.6, 'beta': 0.5, 'gamma': 0.03}
      >>> tx = gam_optax.gam(**gam_optax.gam_preset("cifar10_pyramidnet"))
    """
    if not (isinstance(name, str) and name in GAM_PRESETS):
        raise ValueError(
            f"gam_preset: unknown GAM preset {name!r}; pass one of {sorted(GAM_PRESETS)} as name."
        )
    return dict(GAM_PRESETS[name])


def from_released_names(**released: Any) -> dict[str, Any]:
    """Translate the released code's argument names into those of ``gam``.

    Examples:
      >>> import gam_optax
      >>> gam_optax.from_released_names(grad_rho=0.02, grad_norm_rho=0.2, grad_gamma=0.03)
      {'rho_prime': 0.02, 'rho': 0.2, 'gamma': 0.03}
    """
    unknown = sorted(set(released) - set(RELEASED_NAMES))
    if unknown:
        raise ValueError(
            f"unknown released-code argument(s) {unknown}; known: {sorted(RELEASED_NAMES)}."
        )
    for key, value in released.items():
        ours = RELEASED_NAMES[key]
        check = (
            _validation.check_nonnegative
            if ours in ("rho", "rho_prime", "eps")
            else (_validation.check_finite)
        )
        check(key, value, "from_released_names", schedule=ours in ("rho", "rho_prime"))
    return {RELEASED_NAMES[key]: value for key, value in released.items()}
