"""Every optimizer the programs know, in one table: ``--config.optimizer=NAME``.

A **base** optimizer (``sgd``, ``adamw``) applies the step. A **perturbation** is a
``gam_optax`` transformation placed before the base optimizer in the chain; its keyword
arguments are the config section of its name (``config.gam``, ``config.sam``...), whose
defaults are here. Adding an optimizer is one entry in :data:`PERTURBATIONS`: the configs,
the trainer, the benchmark and the reproduction read this table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import optax

import gam_optax
from experiments import ConfigError


def sgd(config: ml_collections.ConfigDict, schedule: optax.Schedule):
    """Coupled weight decay, then SGD with momentum (PyTorch's ``SGD(weight_decay=...)``)."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(schedule, momentum=config.momentum),
    )


def adamw(config: ml_collections.ConfigDict, schedule: optax.Schedule):
    """AdamW: decoupled weight decay."""
    return optax.adamw(schedule, weight_decay=config.weight_decay)


BASE: dict[str, Callable[[ml_collections.ConfigDict, optax.Schedule], Any]] = {
    "sgd": sgd,
    "adamw": adamw,
}


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """``gam_optax.<factory>(**config.<name>, has_aux=True)``, or with ``wraps``, the same
    applied to the transformation that the section's field ``wraps`` names."""

    factory: str  # the name in gam_optax (looked up when built)
    defaults: dict[str, Any]
    wraps: str | None = None


PERTURBATIONS: dict[str, Perturbation] = {
    # GAM, the released CIFAR-100 ResNet setting (the CIFAR recipes set their own preset).
    "gam": Perturbation("gam", {**gam_optax.gam_preset("cifar100_resnet"), "adaptive": False}),
    "sam": Perturbation("sam", {"rho": 0.05, "adaptive": False}),  # adaptive: ASAM
    "gsam": Perturbation("gsam", {"rho": 0.05, "alpha": 0.1, "adaptive": False}),
    # LookSAM: SAM every `every` steps, its orthogonal component reused in between.
    "looksam": Perturbation("looksam", {"rho": 0.05, "every": 5, "alpha": 0.7, "rescale": True}),
    # gam_optax.reuse of the transformation config.reuse.inner, built from its own section.
    "reuse": Perturbation(
        "reuse", {"inner": "gam", "every": 5, "alpha": 0.7, "rescale": True}, wraps="inner"
    ),
    # SAM + GAM (our reading of the paper's README claim): SAM's loss plus penalty * R1_rho,
    # with finite-difference H v; sam_rho == hvp_step shares SAM's point (3 extra gradients,
    # as gam). sam_rho as the sam entry; rho and penalty are untuned defaults.
    "sam_gam": Perturbation(
        "sam_gam", {"rho": 0.1, "penalty": 0.3, "sam_rho": 0.05, "hvp_step": 0.05}
    ),
    # GAM's original form (the paper's Algorithm 1): exact Hessian-vector products, the
    # gradient of L + penalty * R1_rho. The authors published no hyperparameters for it;
    # these are sam_gam's (the headroom benchmark tunes the penalty).
    "gam_penalty": Perturbation("gam_penalty", {"rho": 0.1, "penalty": 0.3}),
}
REUSABLE = ("gam", "sam", "gsam")  # what config.reuse.inner may name
NAMES = (*BASE, *PERTURBATIONS)


def add_sections(config: ml_collections.ConfigDict) -> None:
    """Adds each perturbation's config section with its defaults (``configs/default.py``)."""
    for name, perturbation in PERTURBATIONS.items():
        config[name] = ml_collections.ConfigDict(perturbation.defaults)


def create(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """The optax chain of ``config.optimizer`` (see the module doc): ``optax.chain(
    perturbation, base)``, or the base optimizer alone (:func:`create_parts`)."""
    perturbation, base = create_parts(config, schedule, axis_name)
    if perturbation is None:
        return optax.with_extra_args_support(base)
    return optax.chain(perturbation, base)


def create_parts(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, axis_name: str | None = None
) -> tuple[Any, optax.GradientTransformation]:
    """The two parts of :func:`create`'s chain: the perturbation (None for a base optimizer)
    and the base optimizer; the chain's state is the pair of their states.

    With ``axis_name`` (a step run per device) the perturbation gets ``axis_name`` and
    ``average=config.average`` and averages over that axis itself (``train_step`` averages
    ``g0`` for the base optimizers alone). With ``config.skip_nonfinite_steps = N > 0`` the
    base optimizer is wrapped in ``optax.apply_if_finite(..., N)``: a step whose direction
    holds a NaN or an infinity is skipped (up to N in a row), its state's ``last_finite``
    says so. A library error (``--config.gam.rho=-1``) becomes a ``ConfigError``.
    """
    base = BASE[config.base_optimizer if config.optimizer in PERTURBATIONS else config.optimizer]
    base = base(config, schedule)
    if config.skip_nonfinite_steps:
        base = optax.apply_if_finite(base, config.skip_nonfinite_steps)
    if config.optimizer in BASE:
        return None, base
    parallel = {} if axis_name is None else dict(axis_name=axis_name, average=config.average)

    def build(name: str, has_aux: bool):
        perturbation, section = PERTURBATIONS[name], config[name].to_dict()
        factory = getattr(gam_optax, perturbation.factory, None)
        if factory is None:
            raise ConfigError(
                f"optimizer {name!r} needs gam_optax.{perturbation.factory}, which this "
                f"version of gam_optax ({gam_optax.__version__}) does not provide."
            )
        try:
            if perturbation.wraps:  # e.g. reuse(gam(...), every, alpha)
                inner = build(section.pop(perturbation.wraps), has_aux)
                return factory(inner, **section, **parallel)
            return factory(**section, has_aux=has_aux, **parallel)
        except (TypeError, ValueError) as e:  # the library's message, naming the argument
            raise ConfigError(f"config.{name}: {e}") from None

    return build(config.optimizer, has_aux=True), base


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments.train", "the table of --config.optimizer")
