"""One gradient per ``update`` call: any member of the family for loops that cannot pass
``loss_fn``.

``optax.contrib.sam``'s default ("transparent") mode spreads SAM's two gradient
evaluations over two calls of ``update``. :func:`transparent` does the same for every
member: each call receives the caller's gradient at the point the previous call moved the
parameters to, and the outer optimizer runs on the last call of a step only.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gam_optax._compat import reshard_like
from gam_optax._frame import Perturbation
from gam_optax._gam import gam
from gam_optax._oracle import Evaluation, Probe, point_of
from gam_optax._tree_math import cast_like, subtract
from gam_optax._validation import (
    check_has_params,
    check_state_like,
    check_transformation,
    check_update,
    describe,
)


class TransparentState(NamedTuple):
    """State of :func:`transparent` (and :func:`transparent_gam`).

    Attributes:
      phase: which gradient the next ``update`` call receives (int32): 0 is ``g0`` at the
        step's ``theta``; 1, 2... the gradients at the perturbed points.
      count: the number of finished steps (int32); schedules are evaluated at it.
      theta: the parameters the current step started from.
      g0: the gradient at ``theta``.
      carry: the member's running sums between calls.
      opt_state: the outer optimizer's state, updated on the last call of each step.
    """

    phase: jax.Array
    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
    theta: optax.Params
    g0: optax.Params
    carry: Any
    opt_state: optax.OptState


TransparentGAMState = TransparentState  # the name of transparent_gam's state


def calls_per_step(perturbation: Perturbation) -> int:
    """How many ``update`` calls :func:`transparent` takes for one step of ``perturbation``:
    one for ``g0`` and one for each extra gradient."""
    return 1 + len(perturbation.algorithm.steps)


def _check_optimizer(optimizer: Any, name: str) -> None:
    if isinstance(optimizer, Perturbation):
        raise TypeError(
            f"{name}: optimizer is gam_optax.{optimizer.options.name}(...), a sharpness-aware "
            "perturbation; pass the outer optimizer (weight decay, momentum, learning rate), "
            f"e.g. gam_optax.transparent(gam_optax.{optimizer.options.name}(...), "
            "optax.sgd(0.1, momentum=0.9))."
        )
    check_transformation(
        "optimizer", optimizer, name, " (the outer optimizer, e.g. optax.sgd(0.1, momentum=0.9))"
    )


def _check_member(perturbation: Any, name: str) -> None:
    if not isinstance(perturbation, Perturbation):
        raise TypeError(
            f"{name}: perturbation must be a member of the family built by gam_optax.sam, "
            f"gsam, gam, gam_penalty or sam_gam (not wrapped in optax.chain, "
            f"optax.inject_hyperparams or reuse), got {describe(perturbation)}; e.g. "
            "gam_optax.transparent(gam_optax.gam(), optax.sgd(0.1, momentum=0.9))."
        )
    options = perturbation.options
    if perturbation.algorithm.exact:
        raise ValueError(
            f"{name}: {options.name}'s exact mode takes Hessian-vector products, which one "
            "gradient per call cannot give. Use its finite differences: "
            + (
                "gam(..., hessian=False)."
                if options.name == "gam"
                else f"{options.name}(..., hvp_step=0.01) (a step of the finite difference)."
            )
        )
    if options.axis_name is not None:
        raise ValueError(
            f"{name}: {options.name} was built with axis_name={options.axis_name!r}; in the "
            "transparent mode average each gradient over devices before update "
            "(jax.lax.pmean(grads, axis_name)), as for any optimizer, and build "
            f"{options.name} with axis_name=None."
        )


# The leaves of the parameter move the last transparent update returned (weakly held): a
# second transparent given them as its gradient is in the same chain, and would take the
# first's move for a gradient.
_last_move: list[weakref.ref] = []


def _remember_move(move: optax.Updates) -> None:
    try:
        _last_move[:] = [weakref.ref(leaf) for leaf in jax.tree.leaves(move)]
    except TypeError:  # a leaf that takes no weak reference: nothing to compare with later
        _last_move.clear()


def _check_not_a_move(updates: optax.Updates, name: str) -> None:
    moved = {id(leaf) for leaf in (ref() for ref in _last_move) if leaf is not None}
    leaves = jax.tree.leaves(updates)
    if leaves and all(id(leaf) in moved for leaf in leaves):
        raise TypeError(
            f"{name}: the gradient given to update is the parameter move another "
            "transparent(...) has just returned: two transparent wrappers in one chain, "
            "where the second would take the first's move for a gradient. Use one, with "
            "the rest inside it: gam_optax.transparent(member, optax.chain(...)), or put "
            "gradient transformations (clipping) before it."
        )


def transparent(
    perturbation: Perturbation, optimizer: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    r"""Any member of the family, one gradient per ``update`` call.

    For a training loop that cannot pass ``loss_fn`` (Flax's own ``TrainState``, a
    Keras-style loop): a step of ``perturbation`` takes ``1 + k`` consecutive ``update``
    calls, ``k`` its extra gradients (:func:`sam`, :func:`gsam`: 2 calls; :func:`gam`,
    :func:`gam_penalty` with ``hvp_step``: 4; :func:`sam_gam`: 4 or 5). Each call gets the
    caller's gradient at the parameters the previous call moved them to:

    * call 1, ``g0`` at ``theta``: moves the parameters to the first probe's point;
    * the middle calls, ``g_k`` there: fold it in, move to the next point;
    * the last call: the direction ``d``, and ``optimizer``'s update of ``theta`` along
      it; the parameters become ``theta + update``.

    ``1 + k`` calls give what one call of ``optax.chain(perturbation, optimizer)`` with
    ``loss_fn`` gives (the same parameters, to rounding). For SAM this is
    ``optax.contrib.sam``'s default mode.

    What the loop must do:

    * **Feed each batch** ``1 + k`` **times in a row**: the finite differences (GAM's
      ``g1 - g0``) measure curvature only on one mini-batch loss.
    * **BatchNorm**: every call is a training step to your loop, so each updates the
      running statistics; keep those of the phase-0 pass (:func:`transparent_phase` is 0)
      and the old ones otherwise. Dropout: draw the masks from ``step // (1 + k)``.
    * **Evaluate at** :func:`outer_params` ``(opt_state, params)``: between the calls of a
      step the parameters are a perturbed point. Stop after a whole step.
    * **Steps**: schedules inside ``optimizer`` and of the radii count whole steps.

    Not available: the exact modes (``gam(hessian=True)``, ``gam_penalty`` without
    ``hvp_step``), which take Hessian-vector products, and ``axis_name`` (average each
    gradient over devices before ``update``, as for any optimizer).

    Args:
      perturbation: a member built by :func:`sam`, :func:`gsam`, :func:`gam`,
        :func:`gam_penalty` or :func:`sam_gam` (its ``mask``, ``adaptive``, ``eps`` and
        schedules apply; ``unroll`` and ``has_aux`` do not matter here).
      optimizer: the outer optimizer; it receives ``d`` as its gradient and ``theta`` as
        its params, once per step.

    Returns:
      A ``GradientTransformationExtraArgs`` whose ``update(grads, state, params)`` needs
      the params and takes no ``loss_fn``; its state is a :class:`TransparentState`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, gam_optax
      >>> loss = lambda p: jnp.sum((p - 1.0) ** 2) + jnp.sum(p**4)
      >>> tx = gam_optax.transparent(gam_optax.sam(0.05), optax.sgd(0.1))
      >>> params = jnp.array([2.0, -1.0])
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def call(params, state):  # a loop that knows nothing of SAM
      ...     updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> for _ in range(2 * 100):  # 100 SAM steps
      ...     params, state = call(params, state)
      >>> print(f"{loss(gam_optax.outer_params(state, params)):.2f}")  # the minimum is 0.578
      0.58
    """
    return _transparent(perturbation, optimizer, "transparent")


def _transparent(
    perturbation: Perturbation, optimizer: optax.GradientTransformation, name: str
) -> optax.GradientTransformationExtraArgs:
    """:func:`transparent`, its errors naming ``name``."""
    _check_optimizer(optimizer, name)
    _check_member(perturbation, name)
    algorithm, options = perturbation.algorithm, perturbation.options
    calls = calls_per_step(perturbation)

    def init_fn(params: optax.Params) -> TransparentState:
        check_has_params(params, name)
        zeros = jax.tree.map(jnp.zeros_like, params)
        count = jnp.zeros([], jnp.int32)
        # the carry's zeros as the first call builds it: shaped and sharded like the params.
        # One program: op by op, the collectives of a sharded first call can deadlock XLA:CPU.
        first = jax.jit(lambda p, z, c: algorithm.first(options.context(p, z, c))[0])
        carry = jax.tree.map(jnp.zeros_like, first(params, zeros, count))
        return TransparentState(count, count, params, zeros, carry, optimizer.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        given = sorted({"loss_fn", "grad_fn"} & set(extra_args))
        if given:
            raise TypeError(
                f"{name}: update takes one gradient per call and no {given[0]}; it would be "
                f"ignored, and a call is 1/{calls} of a step. Where your loop can pass "
                f"{given[0]}, use optax.chain(gam_optax.{options.name}(...), optimizer) "
                "instead: one call per step."
            )
        check_update(name, updates, state, params, TransparentState, options.axis_name)
        check_state_like(state, jax.eval_shape(init_fn, params), name)
        _check_not_a_move(updates, name)

        def context(theta, g0):
            return options.context(theta, g0, state.count)

        def move_to(probe: Probe):  # the update that takes the caller's params there
            return cast_like(subtract(point_of(probe), params), params)

        def first_call(grads):  # g0 at theta
            g0 = cast_like(grads, params)
            carry, probe = algorithm.first(context(params, g0))
            new = state._replace(theta=params, g0=g0, carry=cast_like(carry, state.carry))
            return move_to(probe), new

        def middle_call(step):  # g_k at the point of probe k
            def call(grads):
                c = context(state.theta, state.g0)
                carry, probe = step(c, state.carry, Evaluation(grads, params))
                return move_to(probe), state._replace(carry=cast_like(carry, state.carry))

            return call

        def last_call(grads):  # the direction, and the outer optimizer's step from theta
            c = context(state.theta, state.g0)
            carry, _ = algorithm.steps[-1](c, state.carry, Evaluation(grads, params))
            d = cast_like(algorithm.direction(c, carry), state.g0)
            step, opt_state = optimizer.update(d, state.opt_state, state.theta)
            # theta + step - params, as optax.contrib.sam: the caller lands on theta + step.
            move = jax.tree.map(lambda t, s, p: (t - p) + s, state.theta, step, params)
            count = optax.safe_increment(state.count)
            return cast_like(move, params), state._replace(count=count, opt_state=opt_state)

        def typed(call):  # every branch returns the inputs' types (Explicit: shardings)
            def branch(grads):
                out = call(grads)
                return jax.tree.map(
                    lambda x, like: reshard_like(x.astype(like.dtype), like), out, (params, state)
                )

            return branch

        phases = [first_call, *map(middle_call, algorithm.steps[:-1]), last_call]
        new_updates, new_state = jax.lax.switch(state.phase, [typed(p) for p in phases], updates)
        _remember_move(new_updates)
        return new_updates, new_state._replace(phase=(state.phase + 1) % calls)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def transparent_gam(
    optimizer: optax.GradientTransformation, *args: Any, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    """:func:`gam` in the transparent mode: ``transparent(gam(*args, **kwargs), optimizer)``.

    Four ``update`` calls per GAM step (``g0`` at theta, then ``g1``, ``g2``, ``g3`` at
    theta1, theta2, theta3); see :func:`transparent`. ``args`` and ``kwargs`` are
    :func:`gam`'s (``rho``, ``rho_prime``, ``alpha``, ``beta``, ``gamma``, ``eps``,
    ``adaptive``, ``h_minus_weighting``, ``mask``).

    Examples:
      >>> import jax.numpy as jnp, optax, gam_optax
      >>> tx = gam_optax.transparent_gam(optax.sgd(0.1), rho=0.1, rho_prime=0.01)
      >>> int(gam_optax.transparent_phase(tx.init({"w": jnp.zeros(2)})))  # g0's call
      0
    """
    _check_optimizer(optimizer, "transparent_gam")  # before gam's own checks
    return _transparent(gam(*args, **kwargs), optimizer, "transparent_gam")


def _transparent_state(opt_state: Any, function: str) -> TransparentState:
    found = [
        leaf
        for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, TransparentState))
        if isinstance(leaf, TransparentState)
    ]
    if len(found) != 1:
        raise ValueError(
            f"{function}: opt_state must hold exactly one TransparentState (the state of "
            f"gam_optax.transparent(...) or transparent_gam(...)), found {len(found)}."
        )
    return found[0]


def transparent_phase(opt_state: optax.OptState) -> jax.Array:
    """Which gradient the next ``update`` of :func:`transparent` receives (int32).

    0: ``g0`` at the step's ``theta`` (your ordinary training pass); 1, 2...: the gradients
    at the perturbed points. E.g. keep BatchNorm statistics from the phase-0 pass only:
    ``jnp.where(transparent_phase(opt_state) == 0, new, old)`` leaf by leaf.

    Args:
      opt_state: the optimizer state holding one :class:`TransparentState` (e.g. a Flax
        ``TrainState``'s ``opt_state``).
    """
    return _transparent_state(opt_state, "transparent_phase").phase


def outer_params(opt_state: optax.OptState, params: optax.Params) -> optax.Params:
    """The parameters to evaluate, save or export while :func:`transparent` trains.

    Between a step's calls the parameters are a perturbed point; this returns the step's
    ``theta`` then, and ``params`` themselves after the last call of a step (phase 0).

    Args:
      opt_state: the optimizer state holding one :class:`TransparentState`.
      params: the current parameters.
    """
    state = _transparent_state(opt_state, "outer_params")
    between = state.phase == 0
    return jax.tree.map(lambda p, t: jnp.where(between, p, t.astype(p.dtype)), params, state.theta)
