"""GAM for loops that cannot pass ``loss_fn``: one gradient per ``update`` call.

``optax.contrib.sam``'s default ("transparent") mode spreads SAM's two gradient
evaluations over two calls of ``update``. :func:`transparent_gam` does the same for
GAM's four: each call receives the caller's gradient at the parameters the previous
call moved them to, and the outer optimizer runs on the fourth call only.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gam_optax._builder import value_at
from gam_optax._gam import GAMState, HMinusWeighting, gam
from gam_optax._tree_math import add, add_scaled, ascent_step, cast_like, subtract
from gam_optax._validation import (
    Mask,
    check_float_params,
    check_like_params,
    check_state,
    check_transformation,
    resolve_mask,
)

CALLS_PER_STEP = 4  # g0 at theta, g1 at theta1, g2 at theta2, g3 at theta3


class TransparentGAMState(NamedTuple):
    """State of :func:`transparent_gam`.

    Attributes:
      phase: which gradient the next ``update`` call receives (int32): 0 is ``g0`` at
        the step's ``theta``; 1, 2, 3 are ``g1``, ``g2``, ``g3`` at the perturbed points.
      gam_state: the :class:`GAMState` of the GAM step (its ``count``: finished steps).
      opt_state: the outer optimizer's state, updated on the last call of each step.
      params: ``theta``, the parameters the current step started from.
      grads: ``(g0, g1, g2)``, the gradients received so far in this step.
    """

    phase: jax.Array
    gam_state: GAMState
    opt_state: optax.OptState
    params: optax.Params
    grads: tuple[optax.Params, optax.Params, optax.Params]


def transparent_gam(
    optimizer: optax.GradientTransformation,
    rho: optax.ScalarOrSchedule = 0.2,
    rho_prime: optax.ScalarOrSchedule = 0.02,
    alpha: float | jax.Array = 0.6,
    beta: float | jax.Array = 0.5,
    gamma: float | jax.Array = 0.03,
    *,
    eps: float | jax.Array = 1e-12,
    adaptive: bool = False,
    h_minus_weighting: HMinusWeighting = "released",
    mask: Mask | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""GAM for a training loop that cannot pass ``loss_fn``: one gradient per ``update``.

    ``optimizer`` is the outer optimizer (what follows :func:`gam` in a chain: weight
    decay, momentum, learning rate). A GAM step takes four consecutive ``update`` calls,
    each with the caller's gradient at the parameters the previous call moved them to:

    ======  ===================  ==========================================================
    call    the gradient given   what the update does
    ======  ===================  ==========================================================
    1       ``g0`` at theta      moves the parameters to theta1 = theta + rho' u(g0)
    2       ``g1`` at theta1     moves them to theta2 = theta + rho u(g1 - g0)
    3       ``g2`` at theta2     moves them to theta3 = theta2 + rho' u(g2)
    4       ``g3`` at theta3     GAM's direction d from g0..g3, and ``optimizer``'s update
                                 of theta along it: the parameters become theta + update
    ======  ===================  ==========================================================

    Four calls give what one call of ``optax.chain(gam(...), optimizer)`` with ``loss_fn``
    gives (the same parameters, to rounding). Use it where the loop calls
    ``tx.update(grads, opt_state, params)`` with nothing else, e.g. Flax's stock
    ``flax.training.train_state.TrainState.apply_gradients(grads=grads)``; where you can
    pass ``loss_fn``, prefer :func:`gam` (one call, one jitted program per step).

    What the loop must do:

    * **Feed each batch four times in a row** (e.g.
      ``for batch in loader: for _ in range(4): state = train_step(state, batch)``).
      GAM's finite differences (``g1 - g0``) estimate curvature only on one mini-batch
      loss; with a new batch each call they measure the batches' noise instead.
    * **BatchNorm** (and any state your forward pass updates): every call is a training
      step to your loop, so its pass at theta1, theta2 and theta3 updates the running
      statistics too: four updates per GAM step, three of them at perturbed parameters,
      where the one-call :func:`gam` (and the released code) lets only the ``g0`` pass
      update them. To keep the ``g0`` pass's statistics only, keep the new statistics
      when :func:`transparent_phase` is 0 and the old ones otherwise. Dropout: draw the
      masks from ``step // 4`` so that the four passes of a step share them.
    * **Evaluate at** :func:`outer_params` ``(opt_state, params)``: between the calls of
      a step the parameters are a perturbed point (theta1..theta3, up to ``rho`` away).
      Stop training after a multiple of four calls.
    * **Steps**: a ``step`` counter in your loop counts calls, four per GAM step;
      schedules inside ``optimizer`` and of ``rho``/``rho_prime`` count GAM steps.

    Gradient clipping: inside ``optimizer`` it clips ``d``; placed before
    ``transparent_gam`` in a chain it clips every gradient GAM receives (what
    :func:`every_gradient` does for :func:`gam`). Data parallel: average the gradients
    over devices before ``update``, as for any optimizer (GAM on the global batch, like
    ``gam(..., average='gradients')``).

    Args:
      optimizer: the outer optimizer, a ``GradientTransformation``; it receives ``d`` as
        its gradient and ``theta`` as its params, once per GAM step.
      rho: radius of the gradient-norm ascent, a number or an optax schedule of the
        number of GAM steps (as :func:`gam`).
      rho_prime: radius of the two SAM-like steps, a number or a schedule.
      alpha: weight of ``g1`` in ``h_plus``.
      beta: ``h_minus`` weights ``g2`` by ``|1 - beta|`` (released) or ``1 - beta``.
      gamma: strength of the orthogonal correction.
      eps: ``xi``, added to every norm denominator.
      adaptive: ASAM-style steps (as :func:`gam`).
      h_minus_weighting: ``'released'`` or ``'paper'`` (as :func:`gam`).
      mask: the parameters the perturbations may move (as :func:`gam`).

    Returns:
      A ``GradientTransformationExtraArgs`` whose ``update(grads, state, params)`` needs
      the params and ignores extra arguments; its state is a :class:`TransparentGAMState`
      (``theta``, three gradients and the outer optimizer's state).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, gam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
      >>> tx = gam_optax.transparent_gam(optax.sgd(0.1), rho=0.1, rho_prime=0.01)
      >>> params = jnp.array([2.0, -1.0])
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def call(params, state):  # a loop that knows nothing of GAM
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> for _ in range(4 * 100):  # 100 GAM steps
      ...     params, state = call(params, state)
      >>> print(f"{loss(gam_optax.outer_params(state, params)):.2f}")  # as gam(): 0.58
      0.58
    """
    name = "transparent_gam"
    # The direction of the fourth call is gam's own (its argument checks, too).
    options: dict[str, Any] = dict(eps=eps, adaptive=adaptive, mask=mask)
    inner = gam(rho, rho_prime, alpha, beta, gamma, h_minus_weighting=h_minus_weighting, **options)
    check_transformation(
        "optimizer", optimizer, name, " (the outer optimizer, e.g. optax.sgd(0.1, momentum=0.9))"
    )

    def init_fn(params: optax.Params) -> TransparentGAMState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return TransparentGAMState(
            phase=jnp.zeros([], jnp.int32),
            gam_state=inner.init(params),
            opt_state=optimizer.init(params),
            params=params,
            grads=(zeros, zeros, zeros),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # a loop that passes loss_fn should use gam() itself
        _check_update(updates, state, params)
        m = resolve_mask(mask, params, name)
        r = value_at(rho, state.gam_state.count)
        r_prime = value_at(rho_prime, state.gam_state.count)

        def ascend(direction, at, radius):
            step = ascent_step(direction, at, radius, eps=eps, adaptive=adaptive, mask=m)
            return add(at, step)

        calls = _calls(inner, optimizer, state, params, ascend, r, r_prime)
        phase = state.phase
        new_updates, new_state = jax.lax.switch(phase, calls, updates)
        new_state = new_state._replace(phase=(phase + 1) % CALLS_PER_STEP)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _calls(inner, optimizer, state, params, ascend, r, r_prime):
    """The four calls of one GAM step, each ``grads -> (updates, state)``, for
    ``jax.lax.switch`` on the phase; ``ascend(direction, at, radius)`` is gam's step."""
    theta = state.params
    g0, g1, g2 = state.grads

    def theta2_of(g0, g1):  # theta + rho u(g1 - g0): the gradient-norm ascent
        return ascend(add_scaled(g1, -1.0, g0), theta, r)

    def move_to(point):  # the update that takes the caller's params to point
        return cast_like(subtract(point, params), params)

    def call_1(grads):  # g0 at theta: go to theta1
        state_1 = state._replace(params=params, grads=(grads, g1, g2))
        return move_to(ascend(grads, params, r_prime)), state_1

    def call_2(grads):  # g1 at theta1: go to theta2
        return move_to(theta2_of(g0, grads)), state._replace(grads=(g0, grads, g2))

    def call_3(grads):  # g2 at theta2: go to theta3
        theta3 = ascend(grads, theta2_of(g0, g1), r_prime)
        return move_to(theta3), state._replace(grads=(g0, g1, grads))

    def call_4(grads):  # g3 at theta3: GAM's direction, the outer step from theta
        stored = (g1, g2, grads)

        def grad_fn(point, i):  # the gradients this step received, in gam's order
            del point
            if isinstance(i, int):
                return stored[i - 1]
            return jax.tree.map(lambda *gs: jnp.stack(gs)[jnp.asarray(i) - 1], *stored)

        direction, gam_state = inner.update(g0, state.gam_state, theta, grad_fn=grad_fn)
        step, opt_state = optimizer.update(direction, state.opt_state, theta)
        # theta + step - params, as optax.contrib.sam: the caller lands on theta + step.
        move = jax.tree.map(lambda t, s, p: (t - p) + s, theta, step, params)
        return cast_like(move, params), state._replace(gam_state=gam_state, opt_state=opt_state)

    return call_1, call_2, call_3, call_4


def _check_update(updates, state, params) -> None:
    """The checks of ``transparent_gam(...).update``'s arguments, when it is traced."""
    name = "transparent_gam"
    check_state(state, TransparentGAMState, name)
    if params is None:
        raise ValueError(
            f"{name}: update needs params, the point the gradient was computed at: "
            "tx.update(grads, state, params)."
        )
    check_float_params(params, name)
    check_like_params(updates, params, "updates (the gradient)", name)


def _transparent_state(opt_state: Any, function: str) -> TransparentGAMState:
    found = [
        leaf
        for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TransparentGAMState))
        if isinstance(leaf, TransparentGAMState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{function}: opt_state must hold exactly one TransparentGAMState (the state of "
            f"gam_optax.transparent_gam(...)), found {len(found)}."
        )
    return found[0]


def transparent_phase(opt_state: optax.OptState) -> jax.Array:
    """Which gradient the next ``update`` of :func:`transparent_gam` receives (int32).

    0: ``g0`` at the GAM step's ``theta`` (your ordinary training pass); 1, 2, 3: the
    gradients at the perturbed points. E.g. keep BatchNorm statistics from the phase-0
    pass only: ``jnp.where(transparent_phase(opt_state) == 0, new, old)`` leaf by leaf.

    Args:
      opt_state: the optimizer state holding one :class:`TransparentGAMState` (e.g. a
        Flax ``TrainState``'s ``opt_state``).
    """
    return _transparent_state(opt_state, "transparent_phase").phase


def outer_params(opt_state: optax.OptState, params: optax.Params) -> optax.Params:
    """The parameters to evaluate, save or export while :func:`transparent_gam` trains.

    Between a GAM step's calls the parameters are a perturbed point (theta1, theta2 or
    theta3); this returns the step's ``theta`` then, and ``params`` themselves after the
    last call of a step (phase 0).

    Args:
      opt_state: the optimizer state holding one :class:`TransparentGAMState`.
      params: the current parameters.
    """
    state = _transparent_state(opt_state, "outer_params")
    between = state.phase == 0
    return jax.tree.map(lambda p, t: jnp.where(between, p, t.astype(p.dtype)), params, state.params)
