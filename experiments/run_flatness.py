"""The flatness of a finished run: measures of the training objective at its final parameters.

The objective is the training loss (label smoothing included) on the un-augmented examples
the run trained on (noisy labels as trained), with BatchNorm in inference mode so that it
depends on the parameters only: what ``gam_optax.flatness`` measures. ``compare``,
``reproduce`` and ``headroom`` all measure their runs here:

- :func:`top_eigenvalue`: the Hessian's top eigenvalue (Lanczos);
- :func:`measure`: the top eigenvalue, the trace (Hutchinson) and the paper's first-order
  flatness :math:`R_1 = \\rho \\max_{\\|\\delta\\| \\le \\rho} \\|\\nabla L(\\theta + \\delta)\\|`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from jax.tree_util import Partial

from experiments import checkpoints, input_pipeline, models, step
from gam_optax import flatness

WHOLE_BATCH_LIMIT = 4096  # training_objective takes up to this many examples in one pass


def training_objective(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, num_examples: int | None = None
) -> tuple[Callable[[Any], jax.Array], Any]:
    """The training loss around the final parameters of the run in ``workdir``, on its first
    ``num_examples`` training examples (all by default).

    Returns:
      ``(loss_fn, params)``. ``loss_fn`` is a ``jax.tree_util.Partial`` (its data are
      arguments of a jitted measure, not constants); beyond ``WHOLE_BATCH_LIMIT`` examples it
      averages batches of ``config.eval_batch_size`` (``gam_optax.flatness.dataset_loss``).
    """
    ds = input_pipeline.for_run(config)
    ds = ds._replace(
        train_images=ds.train_images[:num_examples], train_labels=ds.train_labels[:num_examples]
    )
    model = models.create_model(config.model, ds.num_classes, **config.model_kwargs)
    state = checkpoints.restore_checkpoint(workdir)

    def loss(batch_stats, params, batch):
        images = input_pipeline.normalize(batch["image"], ds.mean, ds.std)
        variables = {"params": params, "batch_stats": batch_stats}
        logits = model.apply(variables, images, train=False)
        return step.smoothed_cross_entropy(logits, batch["label"], config.label_smoothing).mean()

    data = {"image": ds.train_images, "label": ds.train_labels}
    if len(ds.train_labels) <= WHOLE_BATCH_LIMIT:
        whole = lambda batch_stats, batch, params: loss(batch_stats, params, batch)
        return Partial(whole, state["batch_stats"], jax.device_put(data)), state["params"]
    size = config.eval_batch_size
    count = len(ds.train_labels) // size
    batches = jax.tree.map(lambda x: x[: count * size].reshape(count, size, *x.shape[1:]), data)
    loss_fn = flatness.dataset_loss(Partial(loss, state["batch_stats"]), batches)
    return loss_fn, state["params"]


def top_eigenvalue(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    key: jax.Array,
    *,
    num_iterations: int = 20,
    num_examples: int | None = None,
) -> float:
    """:math:`\\lambda_{max}` of the Hessian of the run's final training objective."""
    loss_fn, params = training_objective(config, workdir, num_examples)
    eigenvalue = flatness.hessian_top_eigenvalue(
        loss_fn, params, key, num_iterations=num_iterations
    )
    return float(eigenvalue)


def measure(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    rho: float,
    seed: int,
    num_examples: int | None = None,
) -> dict[str, float]:
    """``top_eigenvalue``, ``trace`` and ``first_order_flatness`` (at radius ``rho``) of the
    run's final training objective, with keys drawn from ``seed``."""
    loss_fn, params = training_objective(config, workdir, num_examples)
    key_eig, key_trace, key_r1 = jax.random.split(jax.random.key(seed), 3)
    return {
        "top_eigenvalue": float(flatness.hessian_top_eigenvalue(loss_fn, params, key_eig)),
        "trace": float(flatness.hessian_trace(loss_fn, params, key_trace, num_samples=16)),
        "first_order_flatness": float(
            flatness.first_order_flatness(loss_fn, params, rho, key=key_r1)
        ),
    }


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments", "the flatness measures of finished runs")
