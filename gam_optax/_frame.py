"""The frame: an algorithm of the family written once, run in every mode.

An :class:`Algorithm` is what the paper writes: the points where it takes gradients, each
computed from the gradients before it, and how it combines them into the direction ``d``.
``first(c)`` gives the running sums (the *carry*) and the first :class:`Probe`; each of
``steps`` receives the next gradient (an :class:`Evaluation`), folds it into the carry and
names the next probe (None after the last); ``direction(c, carry)`` is ``d``. ``c`` is the
:class:`Context` of the step: ``theta``, ``g0``, the hyperparameters' values, the ascent.

:func:`perturbation` runs it inline (``unroll=True``: one traced gradient per probe) or in
a ``jax.lax.scan`` (``unroll=False``: one for all, every step's arithmetic computed and the
current one's kept); :func:`gam_optax.transparent`, one gradient per ``update`` call. With
``flat``, gradients, sums and steps are vectors of a ``FlatView``; points stay trees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gam_optax._oracle import Evaluation, GradientOracle, Probe, make_oracle, point_of
from gam_optax._tree_math import Params, ascent_step, cast_like
from gam_optax._validation import (
    Average,
    Mask,
    check_average,
    check_axis_name,
    check_bool,
    check_has_params,
    check_nonnegative,
    check_update,
    resolve_mask,
)
from gam_optax._views import LEAF_BY_LEAF, TreeView, view_of

Carry = Any  # an algorithm's running sums: a pytree of fixed shapes and dtypes


class PerturbationState(NamedTuple):
    """State of every member (``SAMState``, ``GAMState``, ``GAMPenaltyState``: its names).

    Attributes:
      count: the number of updates so far (int32), at which schedules are evaluated.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


@dataclasses.dataclass(frozen=True)
class Context:
    """What an algorithm reads in one step.

    Attributes:
      theta: the parameters, where the caller's ``g0`` was computed (a tree).
      g0: the caller's gradient (averaged over devices in 'gradients' mode), in ``view``.
      count: the number of finished steps; schedules are evaluated at it.
      mask: the entries the ascent steps may move (bools, in ``view``), or None: all.
      eps: ``xi``, added to every norm denominator.
      adaptive: ASAM-style ascent steps.
      view: where gradients, sums and steps live: one flat vector (``flat``) or the trees.
    """

    theta: Params
    g0: Params
    count: jax.Array
    mask: Params | None
    eps: Any
    adaptive: bool
    view: TreeView = LEAF_BY_LEAF

    def value(self, hyperparameter: optax.ScalarOrSchedule) -> Any:
        """A hyperparameter (a number or a schedule of the step count) at this step."""
        return hyperparameter(self.count) if callable(hyperparameter) else hyperparameter

    def ascend(self, v: Params, at: Params, radius: Any) -> Params:
        """The ascent step ``e`` of length ``radius`` along ``v`` at the point ``at`` (adaptive
        and masked as the options say): ``r v / (||v|| + xi)``."""
        at = self.view.flat(at) if self.adaptive else v  # ``at`` only weighs adaptive steps
        return ascent_step(v, at, radius, eps=self.eps, adaptive=self.adaptive, mask=self.mask)

    def plain_step(self, v: Params, radius: Any) -> Params:
        """``r v / (||v|| + xi)``: a step neither adaptive nor masked."""
        return ascent_step(v, v, radius, eps=self.eps)

    def moved(self, at: Params, e: Params) -> Params:
        """The point ``at + e``: a tree like ``at``, computed leaf by leaf."""
        return point_of(Probe(at, e), self.view)


Step = Callable[[Context, Carry, Evaluation], tuple[Carry, Probe | None]]


class Algorithm(NamedTuple):
    """An algorithm of the family: its probes and its combination (see the module).

    Attributes:
      first: ``c -> (carry, probe)``: the sums before any extra gradient, the first point.
      steps: one function a gradient, ``(c, carry, g_k) -> (carry, next probe or None)``.
        The carry keeps the shapes and dtypes ``first`` gave it.
      direction: ``(c, carry) -> d``.
      exact: probes with a step are linearised (Hessian-vector products).
    """

    first: Callable[[Context], tuple[Carry, Probe]]
    steps: Sequence[Step]
    direction: Callable[[Context, Carry], Params]
    exact: bool = False


@dataclasses.dataclass(frozen=True)
class Options:
    """The options every member takes, checked once by :func:`perturbation`."""

    name: str
    eps: Any = 1e-12
    adaptive: bool = False
    has_aux: bool = False
    axis_name: str | None = None
    average: Average = "direction"
    mask: Mask | None = None
    unroll: bool = True
    flat: bool = False

    def check(self) -> None:
        check_nonnegative("eps", self.eps, self.name)
        for flag in ("adaptive", "has_aux", "unroll", "flat"):
            check_bool(flag, getattr(self, flag), self.name)
        check_axis_name(self.axis_name, self.name)
        check_average(self.average, self.name)

    def context(
        self, theta: Params, g0: Params, count: jax.Array, view: TreeView = LEAF_BY_LEAF
    ) -> Context:
        mask = view.mask(resolve_mask(self.mask, theta, self.name))
        return Context(theta, g0, count, mask, self.eps, self.adaptive, view)


class Perturbation(optax.GradientTransformationExtraArgs):
    """A member of the family: an optax transformation that also holds the
    :class:`Algorithm` and :class:`Options` it was built from, so that another mode
    (:func:`gam_optax.transparent`) can run the same definition."""

    algorithm: Algorithm
    options: Options


def run_inline(algorithm: Algorithm, c: Context, oracle: GradientOracle) -> Params:
    """``d``, the model's gradient traced once per probe."""
    carry, probe = algorithm.first(c)
    for i, step in enumerate(algorithm.steps, start=1):
        carry, next_probe = step(c, carry, oracle.evaluate(probe, i))
        probe = probe if next_probe is None else next_probe  # None: it was the last
    return algorithm.direction(c, carry)


def _uniform(probe: Probe, exact: bool, c: Context) -> Probe:
    """The probe in one shape for every step of a scan: ``(point + step, None)``, or in the
    exact mode ``(point, step)`` with a zero step for a probe without one."""
    if not exact:
        return Probe(point_of(probe, c.view))
    step = jax.tree.map(jnp.zeros_like, c.g0) if probe.step is None else probe.step
    return Probe(probe.point, cast_like(step, c.g0))


def run_scanned(algorithm: Algorithm, c: Context, oracle: GradientOracle) -> Params:
    """``d``, the model's gradient traced once: a ``jax.lax.scan`` over the probes (``i`` is
    then a traced int32). Every step's arithmetic is computed and the current one's kept
    (``select_n``); ``jax.lax.switch`` held more memory on a parameter-heavy model."""
    carry, probe = algorithm.first(c)

    def branch(step: Step) -> Callable:
        def run(carry, probe, evaluation):
            new_carry, new_probe = step(c, carry, evaluation)
            new_probe = probe if new_probe is None else _uniform(new_probe, algorithm.exact, c)
            return oracle.per_device((cast_like(new_carry, carry), cast_like(new_probe, probe)))

        return run

    branches = [branch(step) for step in algorithm.steps]

    def body(state, i):
        carry, probe = state
        evaluation = oracle.evaluate(probe, i + 1)  # the one traced gradient
        outs = [run(carry, probe, evaluation) for run in branches]
        return jax.tree.map(lambda *xs: jax.lax.select_n(i, *xs), *outs), None

    start = oracle.per_device((carry, _uniform(probe, algorithm.exact, c)))
    (carry, _), _ = jax.lax.scan(body, start, jnp.arange(len(branches), dtype=jnp.int32))
    return algorithm.direction(c, carry)


def perturbation(algorithm: Algorithm, options: Options) -> Perturbation:
    """The optax transformation whose ``update`` returns ``algorithm``'s direction.

    ``update(g0, state, params, loss_fn=...)`` (or ``grad_fn=``) checks its arguments,
    builds the oracle, runs the algorithm inline or scanned (``options.unroll``), averages
    ``d`` over devices in 'direction' mode and casts it to the dtypes of ``g0``.
    """
    options.check()

    def init_fn(params: optax.Params) -> PerturbationState:
        check_has_params(params, options.name)
        return PerturbationState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, loss_fn=None, grad_fn=None, **extra_args):
        del extra_args  # a chain hands every member every extra argument
        check_update(options.name, updates, state, params, PerturbationState, options.axis_name)
        view = view_of(params, flat=options.flat)
        oracle = make_oracle(
            options.name,
            loss_fn=loss_fn,
            grad_fn=grad_fn,
            has_aux=options.has_aux,
            axis_name=options.axis_name,
            average=options.average,
            exact=algorithm.exact,
            view=view,
        )
        c = options.context(params, oracle.incoming(updates, options.name), state.count, view)
        d = (run_inline if options.unroll else run_scanned)(algorithm, c, oracle)
        return view.tree(oracle.finish(d), updates), PerturbationState(
            count=optax.safe_increment(state.count)
        )

    transformation = Perturbation(init_fn, update_fn)
    transformation.algorithm, transformation.options = algorithm, options
    return transformation
