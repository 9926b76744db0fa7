"""The perturbations of the family, one named row each: the one table their tests share.

A row builds the transformation with example hyperparameters (any keyword overrides them)
and says what its arguments take. ``test_family.py`` checks every row's properties,
``test_modes.py`` every mode against the inline form, ``test_mask.py`` its ``mask=``,
``test_validation.py`` its answers to bad input. A new perturbation adds its row here.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import optax

import gam_optax


class Perturbation(NamedTuple):
    factory: Callable[..., optax.GradientTransformationExtraArgs]  # keywords override
    # number-typed argument -> (bound, may be a schedule); bound: True ">= 0", False any
    # finite number, ">0" "> 0". The arguments in OPTIONAL take None (their default).
    numbers: dict[str, tuple[bool | str, bool]]
    flags: tuple[str, ...]  # the options that must be Python bools
    # test_modes: every option on (a radius schedule, adaptive where it exists, a mask)...
    everything: dict
    exact: dict | None = None  # ...and the keywords of its exact mode, if it has one


OPTIONAL = ("hvp_step",)
RADIUS = optax.linear_schedule(0.12, 0.04, transition_steps=4)  # a radius schedule
MASK = {"w": True, "b": False}  # softmax regression's params: the weights are perturbed

FAMILY = {
    "gam": Perturbation(
        functools.partial(gam_optax.gam, rho=0.3, rho_prime=0.05),
        numbers=dict(
            rho=(True, True),
            rho_prime=(True, True),
            alpha=(False, False),
            beta=(False, False),
            gamma=(False, False),
            eps=(True, False),
        ),
        flags=("adaptive", "hessian", "has_aux", "unroll", "flat"),
        everything=dict(rho=RADIUS, adaptive=True, mask=MASK),
        exact=dict(hessian=True),
    ),
    "gam_penalty": Perturbation(
        functools.partial(gam_optax.gam_penalty, rho=0.1, penalty=0.5),
        numbers=dict(
            rho=(True, True), penalty=(True, False), eps=(True, False), hvp_step=(">0", True)
        ),
        flags=("has_aux", "unroll", "flat"),
        everything=dict(rho=RADIUS, hvp_step=0.05, mask=MASK),
        exact=dict(hvp_step=None),
    ),
    "sam_gam": Perturbation(
        functools.partial(gam_optax.sam_gam, rho=0.1, penalty=0.5, sam_rho=0.05, hvp_step=0.05),
        numbers=dict(
            rho=(True, True),
            penalty=(True, False),
            eps=(True, False),
            sam_rho=(True, True),
            hvp_step=(">0", True),
        ),
        flags=("has_aux", "unroll", "flat"),
        everything=dict(rho=RADIUS, sam_rho=RADIUS, mask=MASK),  # SAM's own probe: 5 calls
        exact=dict(hvp_step=None),
    ),
    "sam": Perturbation(
        functools.partial(gam_optax.sam, rho=0.1),
        numbers=dict(rho=(True, True), eps=(True, False)),
        flags=("adaptive", "has_aux", "unroll", "flat"),
        everything=dict(rho=RADIUS, adaptive=True, mask=MASK),
    ),
    "gsam": Perturbation(
        functools.partial(gam_optax.gsam, rho=0.1, alpha=0.2),
        numbers=dict(rho=(True, True), alpha=(False, False), eps=(True, False)),
        flags=("adaptive", "has_aux", "unroll", "flat"),
        everything=dict(rho=RADIUS, adaptive=True, mask=MASK),
    ),
}
