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

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from flax.training import train_state

from gam_optax import _compat
from gam_optax._validation import check_arity


class TrainState(train_state.TrainState):
    """Flax's Linen ``TrainState`` whose ``apply_gradients`` forwards ``loss_fn`` /
    ``grad_fn`` to ``tx.update``, with an optional ``batch_stats`` field.

    ``apply_gradients(grads=g0, loss_fn=...)`` computes ``tx.update(g0, opt_state, params,
    loss_fn=...)``, applies the updates, increments ``step`` and replaces any other field
    given as a keyword (e.g. ``batch_stats=``), like Flax's. Flax's own
    ``flax.training.train_state.TrainState`` drops ``loss_fn`` (the transformations then stop
    with an error that says so); where that class must stay, use
    :func:`gam_optax.transparent`, which needs no ``loss_fn``.

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
        ``tx.update`` checks ``loss_fn`` and ``grad_fn`` (one of them, of the params alone /
        of ``(params, i)``) and names the fix.
        """
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
        a pytree of params); ``loss`` does not take the model alone (close over the batch);
        ``wrt`` is not a filter.
      ValueError: ``wrt`` selects no variable of ``model``; or, at ``loss_fn``'s call, the
        params it gets are not those ``wrt`` splits from the model (the optimizer's ``wrt``
        differs).
    """
    _check_model(model, loss)
    check_arity(loss, "loss", ("the model",), "nnx_loss_fn", "lambda m: loss(m, batch)")
    try:
        nnx.filterlib.to_predicate(wrt)
    except (TypeError, ValueError) as error:  # Flax's message for e.g. wrt=3 is unrelated
        raise TypeError(f"nnx_loss_fn: wrt={wrt!r:.60} is not an nnx filter: {_FIX}") from error
    # A clone: nnx.split's states share the model's variables, which your pass then updates.
    graphdef, state, rest = nnx.split(nnx.clone(model), wrt, ...)  # type: ignore[misc]
    expected = _paths(state)
    if not expected:
        raise ValueError(
            f"nnx_loss_fn: wrt={_name(wrt)} selects no variable of model "
            f"({type(model).__name__}): {_FIX}"
        )

    def loss_fn(params: Any) -> jax.Array:
        got = _paths(params)
        if got != expected:
            extra, missing = sorted(got - expected)[:3], sorted(expected - got)[:3]
            raise ValueError(
                f"nnx_loss_fn(..., wrt={_name(wrt)}): loss_fn got params other than those wrt "
                f"selects from the model (extra: {extra}; missing: {missing}): {_FIX}"
            )
        return loss(_compat.nnx_merge_copy(nnx, graphdef, params, rest))

    return loss_fn


_FIX = "pass the wrt your nnx.Optimizer was built with, e.g. wrt=nnx.Param."


def _name(wrt: Any) -> str:
    return (
        "..." if wrt is Ellipsis else f"nnx.{wrt.__name__}" if isinstance(wrt, type) else repr(wrt)
    )


def _paths(tree: Any) -> frozenset[str]:
    """The leaves' paths, the same for a state of Variables and its pure (array) form."""
    leaves = jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return frozenset(".".join(str(getattr(k, "key", k)) for k in path) for path, _ in leaves)


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
    swapped = callable(model) and isinstance(loss, nnx.Module)
    raise TypeError(
        f"nnx_loss_fn: model must be an nnx.Module (the model nnx.Optimizer updates), got "
        f"{type(model).__name__}: "
        + (
            "the arguments are swapped; call nnx_loss_fn(model, loss)."
            if swapped
            else "pass the model itself; for a pytree of params, pass "
            "loss_fn=lambda p: loss(p, batch) to tx.update directly."
        )
    )
