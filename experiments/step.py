"""The training step, and what a config builds around it: ``build(config, data, dp)``.

One step is ``train_step(state, batch, rng)``, a pure function: it augments the batch on
device, takes the gradient ``g0`` (which also updates the BatchNorm statistics), and hands it
to the optax chain with ``loss_fn=`` so that GAM/SAM/GSAM evaluate their extra gradients on
the same augmented batch. :func:`build` binds a config into it (model, optax chain, schedule,
initial state), after :func:`check_config` has refused what the trainer cannot use. The
trainer (``experiments.train``), the benchmark and the tests all start from :func:`build`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from experiments import ConfigError, input_pipeline, models, optimizers, parallel

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


class TrainState(flax.struct.PyTreeNode):
    """Everything a checkpoint holds: step count, parameters, BatchNorm statistics, optimizer."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-example cross entropy with the released label smoothing.

    The target puts ``1 - smoothing`` on the true class and ``smoothing / (K - 1)`` on each
    wrong class (``optax.smooth_labels`` would put ``smoothing / K`` on every class). The
    released code reports the KL divergence, this minus the constant entropy of the target.
    """
    k = logits.shape[-1]
    one_hot = jax.nn.one_hot(labels, k)
    targets = one_hot * (1.0 - smoothing) + (1.0 - one_hot) * smoothing / (k - 1)
    return optax.softmax_cross_entropy(logits, targets)


def epoch_cosine_schedule(
    learning_rate: float, num_epochs: int, steps_per_epoch: int
) -> optax.Schedule:
    """Cosine decay to 0 over ``num_epochs``, constant within an epoch (PyTorch's
    ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch)."""
    cosine = optax.cosine_decay_schedule(learning_rate, num_epochs)
    return lambda count: cosine(count // steps_per_epoch)


create_optimizer = optimizers.create  # the optax chain of config.optimizer


def _check_number(
    config, field: str, low: float, high: float = math.inf, *, integer=False, optional=False
) -> None:
    """``config.<field>`` is a number in ``[low, high)`` (an integer, or None if optional)."""
    value = config[field]
    if value is None and optional:
        return
    number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and low <= value < high):
        kind = "an integer" if integer else "a number"
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high})"
        unset = " (or unset)" if optional else ""
        raise ConfigError(f"config.{field} must be {kind} {bounds}{unset}, got {value!r}.")


def check_config(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ``ConfigError`` for names, sizes and values the trainer cannot use."""
    for field, valid in (
        ("parallel", parallel.MODES),
        ("average", parallel.AVERAGES),
        ("param_sharding", parallel.PARAM_SHARDINGS),
        ("dataset", input_pipeline.DATASETS),
        ("model", tuple(models.MODELS)),
        ("optimizer", optimizers.NAMES),
        ("base_optimizer", tuple(optimizers.BASE)),
        ("dtype", tuple(DTYPES)),
    ):
        if config[field] not in valid:
            raise ConfigError(
                f"unknown {field.replace('_', ' ')} {config[field]!r}; valid: {', '.join(valid)}."
            )
    if config.optimizer == "reuse" and config.reuse.inner not in optimizers.REUSABLE:
        valid = ", ".join(optimizers.REUSABLE)
        raise ConfigError(f"unknown config.reuse.inner {config.reuse.inner!r}; valid: {valid}.")
    for field in ("batch_size", "eval_batch_size", "num_epochs", "log_every_steps"):
        if not isinstance(config[field], int) or config[field] < 1:
            raise ConfigError(f"config.{field} must be a positive integer, got {config[field]}.")
    for field in ("num_train_examples", "num_test_examples", "steps_per_epoch", "keep_checkpoints"):
        _check_number(config, field, 1, integer=True, optional=True)
    _check_number(config, "skip_nonfinite_steps", 0, integer=True)
    _check_number(config, "learning_rate", 0)
    _check_number(config, "weight_decay", 0)
    _check_number(config, "momentum", 0, 1)
    _check_number(config, "label_smoothing", 0, 1)
    _check_number(config, "label_noise", 0, 1)
    _check_number(config, "label_noise_seed", 0, integer=True)
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError(
            "config.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 in the environment."
        )
    check_batch_split(config, num_devices)


def check_micro_batches(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ConfigError`` unless ``config.micro_batch`` (m-sharpness) can split the batch."""
    _check_number(config, "micro_batch", 0, integer=True)
    if config.micro_strategy not in MICRO_STRATEGIES:
        valid = ", ".join(MICRO_STRATEGIES)
        raise ConfigError(f"unknown micro strategy {config.micro_strategy!r}; valid: {valid}.")
    m = config.micro_batch
    if not m:
        return
    if refresh_period(config):
        raise ConfigError(
            f"config.micro_batch={m}: {config.optimizer} keeps a direction from one step to "
            f"the next, which each micro-batch would change on its own; use micro_batch with "
            f"gam, sam, gsam, sam_gam, gam_penalty, sgd or adamw, or set micro_batch=0."
        )
    per_device = config.batch_size // num_devices
    if per_device % m:
        divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
        raise ConfigError(
            f"config.micro_batch={m} does not divide the batch of {per_device} examples per "
            f"device; pick one of {divisors}."
        )
    if num_devices > 1 and config.parallel == "pmap" and config.average == "gradients":
        raise ConfigError(
            f"config.micro_batch={m} with parallel='pmap' and average='gradients' would "
            f"perturb each micro-batch with the gradients of that micro-batch on every device "
            f"({m} x {num_devices} examples); set --config.average=direction (each device's "
            f"micro-batches perturbed on their own) or --config.parallel=jit."
        )


def check_batch_split(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ConfigError`` unless a batch splits evenly over devices and processes (and
    each device's batch into micro-batches, :func:`check_micro_batches`)."""
    if config.batch_size % num_devices:
        raise ConfigError(
            f"batch size {config.batch_size} is not divisible by the {num_devices} devices in "
            f"use; pick a multiple of {num_devices} (e.g. {num_devices * 32})."
        )
    if config.batch_size % jax.process_count():
        raise ConfigError(
            f"batch size {config.batch_size} is not divisible by the {jax.process_count()} "
            f"processes of this job, which read equal shares of each batch."
        )
    check_micro_batches(config, num_devices)


def create_train_state(
    rng: jax.Array,
    model: flax.linen.Module,
    tx: optax.GradientTransformation,
    image_shape,
    sharding: jax.sharding.Sharding | None = None,
    param_dtype: Any = jnp.float32,
) -> TrainState:
    """Initial parameters, BatchNorm statistics and optimizer state (one compiled program),
    placed with ``sharding`` (e.g. replicated over a mesh); variables in ``param_dtype``."""

    @functools.partial(jax.jit, out_shardings=sharding)
    def init(rng):
        variables = model.init(rng, jnp.zeros((1, *image_shape), param_dtype), train=False)
        variables = jax.tree.map(lambda x: x.astype(param_dtype), variables)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables["batch_stats"],
            opt_state=tx.init(params),
        )

    # JAX's default (partitionable) threefry compiles ~5x slower for the hundreds of independent
    # draws of an initialisation, which needs no partitioning.
    partitionable = getattr(jax, "threefry_partitionable", None)
    with partitionable(False) if partitionable is not None else contextlib.nullcontext():
        return init(rng)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    model: flax.linen.Module,
    tx: optax.GradientTransformationExtraArgs,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: dict[str, Any],
    label_smoothing: float,
    dtype: Any = jnp.float32,
    average_g0: bool = False,
    axis_name: str | None = None,
    refresh: bool | None = None,
    micro: MicroBatches | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of uint8 images: augment, g0, ``tx.update``, apply.

    :func:`build` binds everything after ``rng`` from a config (``augment``: the keyword
    arguments of ``input_pipeline.augment``). With ``axis_name``, one device's part of a
    data-parallel step (in ``jax.pmap`` or ``jax.shard_map``): ``g0`` is this device's,
    averaged here if ``average_g0`` (sgd, adamw), else by ``tx``. ``refresh`` tells an
    amortised optimizer whether this step refreshes (:func:`refresh_period`); ``micro``:
    m-sharpness (:func:`micro_batched_direction`).
    """
    images = input_pipeline.augment(rng, batch["image"], mean, std, **augment, dtype=dtype)
    labels = batch["label"]

    def loss_of(images, labels):
        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, new_vars = model.apply(variables, images, train=True, mutable=["batch_stats"])
            loss = smoothed_cross_entropy(logits, labels, label_smoothing).mean()
            return loss, (new_vars["batch_stats"], logits)

        return loss_fn

    params = state.params  # under shard_map, marked per-device: the gradient is its own
    if axis_name is not None:
        params = jax.lax.pcast(params, axis_name, to="varying")

    def gradient(loss_fn):
        (loss, (batch_stats, logits)), g0 = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if axis_name is not None and average_g0:
            g0 = jax.lax.pmean(g0, axis_name)  # the gam_optax transformations average it
        return loss, batch_stats, logits, g0

    if micro is not None:
        updates, opt_state, loss, batch_stats, logits = micro_batched_direction(
            micro, state, images, labels, loss_of, gradient
        )
    else:
        loss_fn = loss_of(images, labels)
        loss, batch_stats, logits, g0 = gradient(loss_fn)
        # The perturbations' extra gradients use loss_fn; only g0 updates BatchNorm's stats.
        chosen = {} if refresh is None else {"refresh": refresh}
        updates, opt_state = tx.update(g0, state.opt_state, state.params, loss_fn=loss_fn, **chosen)
    params = optax.apply_updates(state.params, updates)
    return _applied(state, params, batch_stats, opt_state, loss, logits, labels)


MICRO_STRATEGIES = ("parallel", "sequential")


@dataclasses.dataclass(frozen=True)
class MicroBatches:
    """m-sharpness: micro-batches of ``size`` examples, each perturbed on its own.

    ``perturbation`` and ``base`` are the two parts of the step's chain
    (``optimizers.create_parts``; ``perturbation`` None for sgd/adamw); ``strategy`` is
    ``'parallel'`` (``jax.vmap``) or ``'sequential'`` (``jax.lax.map``).
    """

    size: int
    strategy: str
    perturbation: Any
    base: optax.GradientTransformation


def micro_batched_direction(micro: MicroBatches, state, images, labels, loss_of, gradient):
    """The step's update from k = n / m micro-batches of m examples (SAM's m-sharpness):

        d = (1/k) sum_i d_i,   d_i = the perturbation's direction from micro-batch i's own
                                     g0_i and loss (its ascent from its own gradients)

    then the base optimizer's update of ``d`` (sgd/adamw: d_i = g0_i, so d is the batch's
    gradient with BatchNorm over micro-batches). Every pass of micro-batch i normalises over
    its m examples, as each device's batch does in a data-parallel run without synchronised
    statistics; the new BatchNorm statistics are the mean of the micro-batches' clean-pass
    ones. Returns (updates, opt_state, loss, batch_stats, logits) for the whole batch.
    """
    k = images.shape[0] // micro.size
    split = lambda a: a.reshape(k, micro.size, *a.shape[1:])
    p_state, b_state = (None, state.opt_state) if micro.perturbation is None else state.opt_state

    def one(images, labels):
        loss_fn = loss_of(images, labels)
        loss, batch_stats, logits, g0 = gradient(loss_fn)
        if micro.perturbation is None:
            return g0, p_state, loss, batch_stats, logits
        d, new_p_state = micro.perturbation.update(g0, p_state, state.params, loss_fn=loss_fn)
        return d, new_p_state, loss, batch_stats, logits

    if micro.strategy == "parallel":
        outputs = jax.vmap(one)(split(images), split(labels))
    else:
        outputs = jax.lax.map(lambda batch: one(*batch), (split(images), split(labels)))
    d, p_states, losses, batch_stats, logits = outputs
    average = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0).astype(x.dtype), tree)
    # Each micro-batch's perturbation state is the same function of the step's (its step
    # count, say): the first one's stands for all.
    p_state = jax.tree.map(lambda x: x[0], p_states)
    updates, b_state = micro.base.update(average(d), b_state, state.params)
    opt_state = b_state if micro.perturbation is None else (p_state, b_state)
    logits = logits.reshape(-1, *logits.shape[2:])
    return updates, opt_state, jnp.mean(losses), average(batch_stats), logits


def _applied(state, params, batch_stats, opt_state, loss, logits, labels):
    """The state after a step, and its metrics (loss, accuracy, finite, skipped)."""
    # With config.skip_nonfinite_steps, optax.apply_if_finite rejected a non-finite direction:
    # keep the statistics too, and report the step as skipped rather than diverged.
    skipped = ~optax.tree_utils.tree_get(opt_state, "last_finite", default=jnp.array(True))
    batch_stats = jax.tree.map(
        lambda new, old: jnp.where(skipped, old, new), batch_stats, state.batch_stats
    )
    state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    all_finite = lambda tree: jnp.all(
        jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
    )
    finite_state = all_finite((params, batch_stats))
    return state, {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        # The divergence guard's signal: 1.0 when the step left a usable state.
        "finite": (finite_state & (jnp.isfinite(loss) | skipped)).astype(jnp.float32),
        "skipped": skipped.astype(jnp.float32),
    }


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, jax.Array]:
    """Sums of the plain cross entropy and of the correct predictions over ``batch['mask']``."""
    dtype = jnp.promote_types(jax.tree.leaves(state.params)[0].dtype, jnp.float32)
    images = input_pipeline.normalize(batch["image"], mean, std, dtype)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = model.apply(variables, images, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = jnp.argmax(logits, -1) == batch["label"]
    mask = batch["mask"]
    return {"loss": jnp.sum(loss * mask), "correct": jnp.sum(correct * mask)}


def refresh_period(config: ml_collections.ConfigDict) -> int | None:
    """``every`` of an amortised optimizer (``reuse``, ``looksam``), else None. Their steps
    are compiled twice, refresh and reuse, and chosen on the host (``step % every == 0``):
    XLA:CPU runs a step holding ``jax.lax.cond`` several times slower."""
    if config.optimizer not in optimizers.PERTURBATIONS:
        return None
    return config[config.optimizer].get("every")


@dataclasses.dataclass(frozen=True)
class Program:
    """What a config builds: the model, the optax chain and its schedule, the initial state,
    and ``step(state, batch, rng)``, :func:`train_step` with everything else bound."""

    model: flax.linen.Module
    tx: optax.GradientTransformationExtraArgs
    schedule: optax.Schedule
    state: TrainState
    step: Callable[[TrainState, dict[str, jax.Array], jax.Array], Any]


def build(
    config: ml_collections.ConfigDict,
    data: input_pipeline.Dataset,
    dp: parallel.DataParallel,
    steps_per_epoch: int,
) -> Program:
    """The training program of ``config`` for ``data`` on ``dp``'s devices (the trainer, the
    benchmark and the tests all start here)."""
    dtype = DTYPES[config.dtype]
    model = models.create_model(
        config.model, data.num_classes, dtype, axis_name=dp.batch_norm_axis, **config.model_kwargs
    )
    schedule = epoch_cosine_schedule(config.learning_rate, config.num_epochs, steps_per_epoch)
    tx = optimizers.create(config, schedule, axis_name=dp.axis_name)
    micro = None
    if config.micro_batch:  # the same chain's two parts, for the micro-batched step
        perturbation, base = optimizers.create_parts(config, schedule, axis_name=dp.axis_name)
        micro = MicroBatches(config.micro_batch, config.micro_strategy, perturbation, base)
    init_rng = jax.random.split(jax.random.key(config.seed), 3)[0]
    param_dtype = jnp.promote_types(dtype, jnp.float32)  # bfloat16 compute, float32 params
    shape = data.train_images.shape[1:]
    state = create_train_state(init_rng, model, tx, shape, dp.replicated, param_dtype)
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        mean=data.mean,
        std=data.std,
        augment=config.augment.to_dict(),
        label_smoothing=config.label_smoothing,
        dtype=dtype,
        average_g0=config.optimizer in optimizers.BASE,
        axis_name=dp.axis_name,
        micro=micro,
    )
    return Program(model, tx, schedule, state, step)


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments.train", "the trainer's training step")
