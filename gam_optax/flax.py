"""Flax integration: Linen's ``TrainState`` and NNX's ``Optimizer`` with ``loss_fn``.

``import gam_optax`` does not import Flax; this module does (``import gam_optax.flax``).

Both paths keep two rules of the released code:

* Your own pass computes ``g0`` and is the only one that updates BatchNorm statistics
  (and advances dropout's random state); the extra passes of gam/sam/gsam see the same
  batch and discard what they would update.
* The extra passes are functions of the parameters alone: ``loss_fn(params) -> loss``.

Linen::

    state = gam_optax.flax.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx,
        batch_stats=variables["batch_stats"])

    def train_step(state, x, y):
        def loss_fn(params):
            logits, updated = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                mutable=["batch_stats"])
            return cross_entropy(logits, y), updated["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, loss_fn=loss_fn, batch_stats=batch_stats)

NNX::

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss = lambda m: cross_entropy(m(x), y)
        loss_fn = gam_optax.flax.nnx_loss_fn(model, loss)  # before your own pass
        grads = nnx.grad(loss)(model)  # g0; updates BatchNorm statistics, advances dropout
        optimizer.update(model, grads, loss_fn=loss_fn)

with ``tx = optax.chain(gam_optax.gam(..., has_aux=True), ...)`` for the Linen
``loss_fn`` above (it returns ``(loss, batch_stats)``), and without ``has_aux`` for NNX.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from flax.training import train_state

from gam_optax import _compat


class TrainState(train_state.TrainState):
    """Flax's Linen ``TrainState`` whose ``apply_gradients`` forwards ``loss_fn`` /
    ``grad_fn`` to ``tx.update``, with an optional ``batch_stats`` field.

    ``apply_gradients(grads=g0, loss_fn=...)`` computes ``tx.update(g0, opt_state, params,
    loss_fn=...)``, applies the updates, increments ``step`` and replaces any other field
    given as a keyword (e.g. ``batch_stats=``), like Flax's. Flax's own
    ``flax.training.train_state.TrainState`` drops ``loss_fn`` (the transformations then stop
    with an error that says so); where that class must stay, use
    :func:`gam_optax.transparent_gam`, which needs no ``loss_fn``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, gam_optax, gam_optax.flax
      >>> loss_fn = lambda p: jnp.sum((p["w"] - 1.0) ** 2)
      >>> tx = optax.chain(gam_optax.gam(rho=0.1, rho_prime=0.01), optax.sgd(0.1))
      >>> state = gam_optax.flax.TrainState.create(
      ...     apply_fn=None, params={"w": jnp.zeros(2)}, tx=tx)
      >>> state = state.apply_gradients(grads=jax.grad(loss_fn)(state.params), loss_fn=loss_fn)
      >>> int(state.step)
      1
    """

    batch_stats: Any = None

    def apply_gradients(
        self,
        *,
        grads: Any,
        loss_fn: Callable[..., Any] | None = None,
        grad_fn: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> TrainState:
        """One step: ``tx.update(grads, opt_state, params, loss_fn=...)``, applied.

        Args:
          grads: ``g0``, your gradient at ``params``.
          loss_fn: ``params -> loss`` (or ``(loss, aux)`` with ``has_aux=True``), for the
            extra gradients of gam/sam/gsam; or
          grad_fn: ``(params, i) -> grads``, instead of ``loss_fn``.
          **kwargs: other fields to replace, e.g. ``batch_stats=`` from your own pass.

        Returns:
          The new state: ``step + 1``, the updated ``params`` and ``opt_state``.

        Raises:
          ValueError: both ``loss_fn`` and ``grad_fn`` are given.
          TypeError: ``loss_fn`` or ``grad_fn`` is not callable, or its signature does not
            accept ``loss_fn(params)`` / ``grad_fn(params, i)`` (checked where Python gives a
            signature).
        """
        _check_extra_args(loss_fn, grad_fn, self.params)
        extra = {k: v for k, v in (("loss_fn", loss_fn), ("grad_fn", grad_fn)) if v is not None}
        tx = optax.with_extra_args_support(self.tx)
        updates, opt_state = tx.update(grads, self.opt_state, self.params, **extra)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            **kwargs,
        )


def nnx_loss_fn(
    model: nnx.Module, loss: Callable[[nnx.Module], jax.Array], wrt: Any = nnx.Param
) -> Callable[[Any], jax.Array]:
    """``loss_fn(params)`` for the extra passes of gam/sam/gsam on an NNX model.

    Each call merges the given parameters into a *copy* of ``model`` as it is now and
    returns ``loss(copy)``: the copy's BatchNorm statistics and random state may change,
    ``model``'s do not. Take it **before** your own pass, so that the copies start from the
    random state your pass starts from: the extra passes then draw the same dropout masks
    as your ``g0`` (the same mini-batch loss), and your model's random state advances once
    per step, as without GAM.

    Args:
      model: the model ``nnx.Optimizer`` updates.
      loss: ``loss(model) -> scalar``, closed over the batch.
      wrt: the filter of the parameters the optimizer updates (``nnx.Optimizer``'s ``wrt``).

    Returns:
      ``params -> loss``, for ``optimizer.update(model, grads, loss_fn=...)``.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module`` (a Linen module, an ``nnx.Optimizer``,
        a pytree of params); ``loss`` is not callable, or its signature does not accept
        ``loss(model)`` (a loss of the model and the batch: close over the batch); ``wrt`` is
        not a filter.
      ValueError: ``wrt`` selects no variable of ``model``; or, at ``loss_fn``'s call,
        the params it gets have another structure than ``wrt`` splits from the model (the
        optimizer was built with another ``wrt``): the message names the ``wrt`` to pass
        where one Variable-type filter selects exactly those params. A callable with no
        signature Python can read is not checked: its first call decides.
    """
    _check_model(model, loss)
    _check_loss(loss, model)
    # A clone: nnx.split's states share the model's variables, which your pass then updates.
    graphdef, state, rest = _split(nnx.clone(model), wrt)
    expected = _paths(state)
    if not expected:
        raise ValueError(
            f"nnx_loss_fn: wrt={_filter_name(wrt)} selects no variable of model "
            f"({type(model).__name__}): pass the wrt your nnx.Optimizer was built with "
            "(nnx.Optimizer(model, tx, wrt=nnx.Param) updates nnx.Param)."
        )

    def loss_fn(params: Any) -> jax.Array:
        got = _paths(params)
        if got != expected:
            raise ValueError(_wrt_mismatch(wrt, got, expected, state, rest))
        return loss(_compat.nnx_merge_copy(nnx, graphdef, params, rest))

    return loss_fn


# ----------------------------------------------------------------------------- checks


def _accepts(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` binds to ``fn``'s signature; True where there is none to read
    (some builtins and C callables): their call then decides."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    try:
        signature.bind(*args)
    except TypeError:
        return False
    return True


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    try:
        return f"{name}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return name


def _check_extra_args(loss_fn: Any, grad_fn: Any, params: Any) -> None:
    where = "gam_optax.flax.TrainState.apply_gradients"
    if loss_fn is not None and grad_fn is not None:
        raise ValueError(
            f"{where}: got both loss_fn and grad_fn; pass one: loss_fn=lambda p: loss(p, batch), "
            "or grad_fn(params, i) -> grads."
        )
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(
                f"{where}: loss_fn must be a function params -> loss, got "
                f"{type(loss_fn).__name__}: pass loss_fn=lambda p: loss(p, batch)."
            )
        if not _accepts(loss_fn, params):
            raise TypeError(
                f"{where}: loss_fn must take the params alone, and {_describe(loss_fn)} does "
                "not: close over the batch, loss_fn=lambda p: loss(p, batch)."
            )
    if grad_fn is not None:
        if not callable(grad_fn):
            raise TypeError(
                f"{where}: grad_fn must be a function (params, i) -> grads, got "
                f"{type(grad_fn).__name__}: pass grad_fn=lambda p, i: jax.grad(loss)(p, batch)."
            )
        if not _accepts(grad_fn, params, 0):
            raise TypeError(
                f"{where}: grad_fn must take (params, i), i the index of the extra gradient, "
                f"and {_describe(grad_fn)} does not: pass "
                "grad_fn=lambda p, i: jax.grad(loss)(p, batch)."
            )


def _check_model(model: Any, loss: Any) -> None:
    if isinstance(model, nnx.Optimizer):
        raise TypeError(
            "nnx_loss_fn: model is an nnx.Optimizer; pass the model it updates: "
            "nnx_loss_fn(model, loss) with optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)."
        )
    if isinstance(model, (nnx.Module, getattr(nnx, "Pytree", nnx.Module))):
        return
    import flax.linen  # imported already by flax.training

    if isinstance(model, flax.linen.Module):
        raise TypeError(
            f"nnx_loss_fn: model is a Linen module ({type(model).__name__}), not an "
            "nnx.Module: for Linen use gam_optax.flax.TrainState and pass "
            "apply_gradients(grads=..., loss_fn=lambda params: loss(model.apply(...)))."
        )
    if callable(model) and isinstance(loss, nnx.Module):
        raise TypeError(
            "nnx_loss_fn: model is a function and loss an nnx.Module: the arguments are "
            "swapped; call nnx_loss_fn(model, loss)."
        )
    raise TypeError(
        f"nnx_loss_fn: model must be an nnx.Module (the model nnx.Optimizer updates), got "
        f"{type(model).__name__}: pass the model itself; for a pytree of params, pass "
        "loss_fn=lambda p: loss(p, batch) to tx.update directly."
    )


def _check_loss(loss: Any, model: Any) -> None:
    if not callable(loss):
        raise TypeError(
            f"nnx_loss_fn: loss must be a function loss(model) -> scalar, got "
            f"{type(loss).__name__} {loss!r:.40}: pass e.g. "
            "loss=lambda m: optax.l2_loss(m(x), y).mean()."
        )
    if not _accepts(loss, model):
        raise TypeError(
            f"nnx_loss_fn: loss must take the model alone, loss(model) -> scalar, and "
            f"{_describe(loss)} does not: close over the batch, "
            "nnx_loss_fn(model, lambda m: loss(m, batch))."
        )


def _split(model: nnx.Module, wrt: Any) -> tuple[Any, Any, Any]:
    try:
        nnx.filterlib.to_predicate(wrt)
    except (TypeError, ValueError) as error:  # flax's message for e.g. wrt=3 is unrelated
        raise TypeError(
            f"nnx_loss_fn: wrt={wrt!r:.60} is not an nnx filter: pass the wrt your "
            "nnx.Optimizer was built with, e.g. wrt=nnx.Param."
        ) from error
    return nnx.split(model, wrt, ...)  # type: ignore[misc]


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _key(entry: Any) -> Any:
    for attribute in ("key", "idx", "name"):
        if hasattr(entry, attribute):
            return getattr(entry, attribute)
    return entry


def _leaves_by_path(tree: Any) -> dict[tuple[Any, ...], Any]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
    return {tuple(_key(e) for e in path): leaf for path, leaf in flat}


def _paths(tree: Any) -> frozenset[tuple[Any, ...]]:
    """The leaves' paths, the same for a state of Variables and its pure (array) form."""
    return frozenset(_leaves_by_path(tree))


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(k) for k in path)


def _some(paths: set[tuple[Any, ...]], n: int = 3) -> str:
    names = sorted(_dotted(p) for p in paths)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _filter_name(wrt: Any) -> str:
    if wrt is Ellipsis:
        return "..."
    if isinstance(wrt, type):
        return f"nnx.{wrt.__name__}" if getattr(nnx, wrt.__name__, None) is wrt else wrt.__name__
    if isinstance(wrt, nnx.filterlib.OfType):
        return _filter_name(wrt.type)
    if isinstance(wrt, nnx.filterlib.Any):
        return f"nnx.Any({', '.join(_filter_name(f) for f in wrt.predicates)})"
    if isinstance(wrt, (tuple, list)):
        return f"({', '.join(_filter_name(f) for f in wrt)}{',' if len(wrt) == 1 else ''})"
    return repr(wrt)


def _guess_wrt(got: frozenset[tuple[Any, ...]], state: Any, rest: Any) -> str | None:
    """The Variable-type filter that selects exactly the paths ``got``, if there is one."""
    variables = {**_leaves_by_path(state), **_leaves_by_path(rest)}
    if not got or not got <= variables.keys():
        return None
    kinds = {type(variables[p]) for p in got}
    top = sorted(
        (k for k in kinds if not any(k is not o and issubclass(k, o) for o in kinds)),
        key=lambda k: k.__name__,
    )
    if {p for p, v in variables.items() if isinstance(v, tuple(top))} != got:
        return None
    names = [_filter_name(k) for k in top]
    return names[0] if len(names) == 1 else f"nnx.Any({', '.join(names)})"


def _wrt_mismatch(
    wrt: Any, got: frozenset[tuple[Any, ...]], expected: frozenset[tuple[Any, ...]], state, rest
) -> str:
    differences = []
    if got - expected:
        differences.append(f"extra: {_some(got - expected)}")
    if expected - got:
        differences.append(f"missing: {_some(expected - got)}")
    guess = _guess_wrt(got, state, rest)
    fix = (
        f"pass nnx_loss_fn(model, loss, wrt={guess}), the wrt of your nnx.Optimizer"
        if guess
        else "pass nnx_loss_fn the wrt your nnx.Optimizer was built with"
    )
    return (
        f"nnx_loss_fn(..., wrt={_filter_name(wrt)}): loss_fn got params other than those "
        f"wrt selects from the model ({'; '.join(differences)}): {fix}."
    )
