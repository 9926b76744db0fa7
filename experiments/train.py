"""The training loop: ``train_and_evaluate(config, workdir)`` -> final metrics.

One step is ``train_step(state, batch, rng)``, a pure function: it augments the batch on
device, takes the gradient ``g0`` (which also updates the BatchNorm statistics), and hands it
to the optax chain with ``loss_fn=`` so that GAM/SAM/GSAM evaluate their extra gradients on
the same augmented batch. Every epoch ends with a test-set evaluation, a line appended to
``workdir/metrics.jsonl`` and an Orbax checkpoint; ``resume=True`` continues from the last
checkpoint and, since the shuffle and augmentation keys derive from (seed, epoch, step), ends
with the same parameters, bit for bit, as an uninterrupted run.

The same step runs on one device or data-parallel over every device of every process
(``config.parallel``: ``jax.jit`` over a mesh or ``jax.pmap``; see ``experiments.parallel``).

The command line (flags: ``--helpshort``; ``--config.<field>=...`` overrides any field)::

  python -m experiments.train --workdir=runs/digits                 # the offline default
  python -m experiments.train --config=experiments/configs/cifar10_resnet18.py \\
      --workdir=runs/c10 --config.optimizer=sgd --config.data_dir=~/tensorflow_datasets
  python -m experiments.train --config=... --workdir=runs/c10 --resume

Several devices: ``--config.parallel=jit`` (or ``pmap``). Several processes (GPU hosts, TPU
VMs): run the same command on every host with ``--distributed`` (Cloud TPU, SLURM and Open
MPI are detected), or with ``--coordinator_address=HOST0:PORT --num_processes=N
--process_id=I``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging as std_logging
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
from absl import app, flags, logging
from jax.tree_util import Partial
from ml_collections import config_flags
from tqdm import tqdm

from experiments import (
    ConfigError,
    TrainingDiverged,
    checkpoints,
    input_pipeline,
    models,
    optimizers,
    parallel,
    xla_options,
)
from gam_optax import flatness

WHOLE_BATCH_LIMIT = 4096  # training_objective takes up to this many examples in one pass
SUMMARIES_NAME = "tensorboard"  # WORKDIR/tensorboard: TensorBoard event files
SUMMARY_TAGS = {  # record field -> TensorBoard tag
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "test_loss": "test/loss",
    "test_accuracy": "test/accuracy",
    "learning_rate": "learning_rate",
    "images_per_second": "images_per_second",
}
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


def check_batch_split(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises ``ConfigError`` unless a batch splits evenly over devices and processes."""
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
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of uint8 images: augment, g0, ``tx.update``, apply.

    ``augment`` holds the keyword arguments of ``input_pipeline.augment``; :func:`build`
    binds everything after ``rng`` from a config. With ``axis_name`` it is one device's part
    of a data-parallel step (inside ``jax.pmap`` or ``jax.shard_map``): ``g0`` is this
    device's gradient, averaged over devices here if ``average_g0`` (sgd, adamw), else by
    ``tx`` (a gam_optax transformation made with ``axis_name``). ``refresh`` (a Python
    bool) tells an amortised optimizer (``gam_optax.reuse``, ``looksam``) whether this step
    refreshes, instead of its on-device conditional (see :func:`refresh_period`).
    """
    images = input_pipeline.augment(rng, batch["image"], mean, std, **augment, dtype=dtype)
    labels = batch["label"]

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, new_vars = model.apply(variables, images, train=True, mutable=["batch_stats"])
        loss = smoothed_cross_entropy(logits, labels, label_smoothing).mean()
        return loss, (new_vars["batch_stats"], logits)

    # Under shard_map, the gradient with respect to replicated parameters would already be
    # summed over devices; marked per-device, it is this device's own.
    params = (
        state.params if axis_name is None else jax.lax.pcast(state.params, axis_name, to="varying")
    )
    (loss, (batch_stats, logits)), g0 = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if axis_name is not None and average_g0:
        g0 = jax.lax.pmean(g0, axis_name)  # the gam_optax transformations average it themselves
    # gam/sam/gsam evaluate their extra gradients with loss_fn; sgd/adamw ignore it. Only the
    # g0 pass updates the BatchNorm statistics.
    chosen = {} if refresh is None else {"refresh": refresh}
    updates, opt_state = tx.update(g0, state.opt_state, state.params, loss_fn=loss_fn, **chosen)
    params = optax.apply_updates(state.params, updates)
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
    )
    return Program(model, tx, schedule, state, step)


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


def _eval_batches(
    images: np.ndarray, labels: np.ndarray, batch_size: int, num_devices: int = 1
) -> dict[str, Any]:
    """The test set zero-padded to whole batches, shape (num_batches, batch_size, ...), with
    ``batch_size`` rounded up to a multiple of ``num_devices`` (a batch is split over them)."""
    n = len(labels)
    batch_size = -(-min(batch_size, n) // num_devices) * num_devices
    padded = -(-n // batch_size) * batch_size
    pad = lambda x: np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
    mask = np.arange(padded) < n
    batches = {"image": pad(images), "label": pad(labels), "mask": mask.astype(np.float32)}
    return jax.tree.map(lambda x: x.reshape(-1, batch_size, *x.shape[1:]), batches)


restore_checkpoint = checkpoints.restore_checkpoint  # a finished run's state, verified


def training_objective(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, num_examples: int | None = None
) -> tuple[Callable[[Any], jax.Array], Any]:
    """The training loss around the final parameters of the run in ``workdir``.

    The loss is the training objective (label smoothing included) on the un-augmented
    examples the run trained on (its first ``num_examples``; noisy labels as trained), with
    BatchNorm in inference mode so that it depends on the parameters only: what
    ``gam_optax.flatness`` measures.

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
    state = restore_checkpoint(workdir)

    def loss(batch_stats, params, batch):
        images = input_pipeline.normalize(batch["image"], ds.mean, ds.std)
        variables = {"params": params, "batch_stats": batch_stats}
        logits = model.apply(variables, images, train=False)
        return smoothed_cross_entropy(logits, batch["label"], config.label_smoothing).mean()

    data = {"image": ds.train_images, "label": ds.train_labels}
    if len(ds.train_labels) <= WHOLE_BATCH_LIMIT:
        whole = lambda batch_stats, batch, params: loss(batch_stats, params, batch)
        return Partial(whole, state["batch_stats"], jax.device_put(data)), state["params"]
    size = config.eval_batch_size
    count = len(ds.train_labels) // size
    batches = jax.tree.map(lambda x: x[: count * size].reshape(count, size, *x.shape[1:]), data)
    loss_fn = flatness.dataset_loss(Partial(loss, state["batch_stats"]), batches)
    return loss_fn, state["params"]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    allow_changes: Sequence[str] = (),
) -> dict[str, Any]:
    """Trains and evaluates every epoch; returns the final metrics (best and final accuracy).

    Every process of a multi-process job (:func:`experiments.parallel.initialize`) calls it
    with the same arguments; process 0 holds the workdir's lock and writes the metrics, and
    checkpoints are written once, as one replicated state that resumes on any number of
    devices and processes (see ``experiments.checkpoints`` for what is verified).

    A step that leaves a NaN or an infinity in the loss, the parameters or the BatchNorm
    statistics stops the run with ``TrainingDiverged``; the last checkpoint (never a
    non-finite one) stays. ``config.skip_nonfinite_steps = N`` skips such steps instead.

    Args:
      config: see ``experiments/configs/default.py``.
      workdir: where ``metrics.jsonl`` and ``checkpoints/`` are written.
      resume: continue from the latest checkpoint in ``workdir`` (or start if there is none).
      overwrite: delete a previous run in ``workdir`` first; without it (or ``resume``) a
        workdir that already holds a run is refused.
      allow_changes: with ``resume``, config fields (``"learning_rate"``, ``"gam.rho"``)
        that may differ from the checkpoint's, deliberately (e.g. a lower learning rate
        after a divergence); any other difference that changes the computation is refused.

    Returns:
      The last epoch's record of ``metrics.jsonl`` plus ``best_test_accuracy``, ``best_epoch``
      and ``train_time`` (seconds spent in training steps, all epochs).
    """
    start = time.perf_counter()
    check_config(config)
    dp = parallel.DataParallel.create(config.parallel, config.average)
    check_batch_split(config, dp.num_devices)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    with checkpoints.claimed(workdir, resume, overwrite):
        ds = input_pipeline.for_run(config)  # label noise, validation hold-out ("test" = it)
        num_train, batch_size = len(ds.train_labels), config.batch_size
        steps_per_epoch = min(num_train // batch_size, config.steps_per_epoch or num_train)
        if steps_per_epoch < 1:
            raise ConfigError(
                f"batch size {batch_size} exceeds the {num_train} training examples of "
                f"{config.dataset!r}; lower config.batch_size."
            )
        program = build(config, ds, dp, steps_per_epoch)
        # Resume (verified), or clear the workdir for a fresh run: only now that config, data
        # and model passed their checks.
        with checkpoints.opened(
            workdir,
            config,
            program.state,
            resume=resume,
            overwrite=overwrite,
            allow_changes=allow_changes,
        ) as (store, start_epoch, state, records):
            records = _epochs(config, dp, ds, program, state, records, store, start_epoch)
    if not records:
        metrics_path = workdir / checkpoints.METRICS_NAME
        raise ConfigError(f"{metrics_path} records no epoch: nothing was trained or recorded.")
    best = max(records, key=lambda r: r["test_accuracy"])
    return {
        **records[-1],
        "final_test_accuracy": records[-1]["test_accuracy"],
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "train_time": sum(r["train_time"] for r in records),
        "wall_time": time.perf_counter() - start,
    }


def _epochs(config, dp, ds, program, state, records, store, start_epoch) -> list[dict[str, Any]]:
    """The epochs after ``start_epoch``: train, evaluate, record, checkpoint."""
    num_train, batch_size = len(ds.train_labels), config.batch_size
    steps_per_epoch = min(num_train // batch_size, config.steps_per_epoch or num_train)
    _, shuffle_rng, augment_rng = jax.random.split(jax.random.key(config.seed), 3)
    test_data = dp.put_global(
        _eval_batches(ds.test_images, ds.test_labels, config.eval_batch_size, dp.num_devices),
        jax.sharding.PartitionSpec(None, parallel.AXIS),
    )

    @jax.jit
    def evaluate(state, batches):
        sums = jax.lax.map(
            lambda b: eval_step(state, b, model=program.model, mean=ds.mean, std=ds.std), batches
        )
        count = jnp.sum(batches["mask"])
        return {"loss": jnp.sum(sums["loss"]) / count, "accuracy": jnp.sum(sums["correct"]) / count}

    epoch_order = jax.jit(
        lambda epoch: jax.random.permutation(jax.random.fold_in(shuffle_rng, epoch), num_train)
    )
    learning_rate = jax.jit(program.schedule)
    rows = dp.process_rows(batch_size)  # each process reads its own rows of every batch
    read_batch = lambda indices: dp.put_batch(
        {"image": ds.train_images[indices[rows]], "label": ds.train_labels[indices[rows]]}
    )

    # Compiled ahead of time, with XLA's faster convolutions on CPUs that support them.
    # (Not a multi-process pmap: its ahead-of-time executable expects the global shapes.)
    state = dp.from_global(state)

    def compile_train_step(refresh: bool | None):
        # The augmentation key of a step derives from (seed, step): resumed runs repeat it.
        step = functools.partial(program.step, refresh=refresh)
        fn = dp.compile_step(
            lambda state, batch, rng: step(state, batch, jax.random.fold_in(rng, state.step))
        )
        if dp.mode != "pmap" or jax.process_count() == 1:
            fn = xla_options.compile_fast(fn, state, read_batch(np.arange(batch_size)), augment_rng)
        return fn

    # An amortised optimizer gets two programs, its refresh and its reuse step, chosen here.
    every = refresh_period(config)
    steps = {r: compile_train_step(r) for r in ((True, False) if every else (None,))}
    train_batch = lambda step, *args: steps[every and step % every == 0](*args)
    evaluate = xla_options.compile_fast(evaluate, dp.to_global(state), test_data)

    main_process = parallel.is_main_process()
    bar = tqdm(
        total=config.num_epochs * steps_per_epoch,
        initial=start_epoch * steps_per_epoch,
        desc=f"{config.optimizer} {config.model} {config.dataset}",
        unit="step",
        disable=not (config.progress_bar and main_process),
        dynamic_ncols=True,
    )
    # TensorBoard: one scalar per record field and epoch (process 0). purge_step makes
    # TensorBoard drop what an interrupted run wrote after the checkpoint it resumes from.
    summaries = tensorboardX.SummaryWriter(
        str(store.workdir / SUMMARIES_NAME), purge_step=start_epoch + 1, write_to_disk=main_process
    )
    for epoch in range(start_epoch, config.num_epochs):
        batches = np.asarray(epoch_order(epoch))[: steps_per_epoch * batch_size]
        batches = batches.reshape(steps_per_epoch, batch_size)
        epoch_start, pending, step_metrics = time.perf_counter(), [], []
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            state, metrics = train_batch(step, state, read_batch(batches[i]), augment_rng)
            pending.append(metrics)
            if (i + 1) % config.log_every_steps == 0 or i + 1 == steps_per_epoch:
                # The divergence guard reads every step's flag, once per log interval.
                step_metrics += [dp.metrics(m) for m in pending]
                pending = []
                _stop_if_diverged(step_metrics, epoch, steps_per_epoch, store, bar)
                rate = (i + 1) * batch_size / (time.perf_counter() - epoch_start)
                bar.set_postfix(
                    epoch=epoch + 1,
                    loss=f"{step_metrics[-1]['loss']:.4f}",
                    acc=f"{step_metrics[-1]['accuracy']:.3f}",
                    img_s=f"{rate:.0f}",
                    test_acc=f"{records[-1]['test_accuracy']:.4f}" if records else "-",
                    refresh=False,
                )
            bar.update(1)
        epoch_time = time.perf_counter() - epoch_start
        global_state = dp.to_global(state)
        test_metrics = jax.device_get(evaluate(global_state, test_data))
        if not np.isfinite(test_metrics["loss"]):
            where = f"at epoch {epoch + 1} (finite parameters, but a non-finite test loss)"
            raise _diverged(where, store, bar)
        applied = [m for m in step_metrics if not m["skipped"]] or step_metrics
        record = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "learning_rate": float(learning_rate(epoch * steps_per_epoch)),
            "train_loss": float(np.mean([m["loss"] for m in applied])),
            "train_accuracy": float(np.mean([m["accuracy"] for m in applied])),
            "test_loss": float(test_metrics["loss"]),
            "test_accuracy": float(test_metrics["accuracy"]),
            "skipped_steps": int(sum(m["skipped"] for m in step_metrics)),
            "train_time": epoch_time,
            "images_per_second": steps_per_epoch * batch_size / epoch_time,
        }
        records.append(record)
        with tqdm.external_write_mode(file=sys.stderr):  # a line above the progress bar
            logging.info(
                "epoch %d/%d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | lr %.4g",
                epoch + 1,
                config.num_epochs,
                record["train_loss"],
                record["train_accuracy"],
                record["test_loss"],
                record["test_accuracy"],
                record["learning_rate"],
            )
        # The checkpoint first (every process takes part; the state is written once), then
        # the record: a crash in between is repaired on resume from the checkpoint's records.
        meta = {"config": json.loads(config.to_json_best_effort()), "records": records}
        store.save(epoch + 1, global_state, meta)
        if main_process:
            checkpoints.append_metrics(store.workdir / checkpoints.METRICS_NAME, record)
        for key, tag in SUMMARY_TAGS.items():
            summaries.add_scalar(tag, record[key], epoch + 1)
        summaries.flush()
    summaries.close()
    bar.close()
    return records


def _stop_if_diverged(step_metrics, epoch: int, steps_per_epoch: int, store, bar) -> None:
    """Raises ``TrainingDiverged`` at the first step of this epoch that left a non-finite
    loss or state."""
    bad = next((i for i, m in enumerate(step_metrics) if m["finite"] < 1), None)
    if bad is not None:
        what = "loss" if not np.isfinite(step_metrics[bad]["loss"]) else "parameters"
        step = epoch * steps_per_epoch + bad + 1
        raise _diverged(f"at epoch {epoch + 1}, step {step} (non-finite {what})", store, bar)


def _diverged(where: str, store, bar) -> TrainingDiverged:
    """The error of a diverged run, naming the last good checkpoint (kept)."""
    bar.close()
    store.finish()
    epochs = store.epochs()
    kept = (
        f"the last good checkpoint, {store.directory / str(epochs[-1])} (epoch {epochs[-1]}), "
        f"is kept: lower --config.learning_rate (or the radii) and rerun with --resume "
        f"--allow_changes=learning_rate"
        if epochs
        else "no checkpoint was written yet: lower --config.learning_rate (or the radii) and "
        "rerun with --overwrite"
    )
    return TrainingDiverged(
        f"training diverged {where}; {kept}, or set --config.skip_nonfinite_steps=N to skip "
        f"non-finite steps."
    )


# ----------------------------------------------------------------------------- the command line

_DEFAULT_CONFIG = pathlib.Path(__file__).parent / "configs" / "default.py"
FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
    """The command line: ``python -m experiments.train --workdir=DIR [--config=FILE] ...``."""
    if len(argv) > 1:
        sys.exit(
            f"error: unexpected arguments: {' '.join(argv[1:])}; every setting is a flag "
            f"(--workdir=DIR, --config.FIELD=VALUE): see --helpshort."
        )
    # Orbax reports every checkpoint step at INFO level; keep its warnings only.
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "orbax" not in r.pathname
    )
    config_file = config_flags.get_config_filename(FLAGS["config"]).split(":")[0]
    if not pathlib.Path(config_file).is_file():
        sys.exit(f"error: the --config file {config_file} does not exist; check the path.")
    config = FLAGS.config
    try:
        if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes:
            parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        summary = train_and_evaluate(
            config,
            FLAGS.workdir,
            resume=FLAGS.resume,
            overwrite=FLAGS.overwrite,
            allow_changes=FLAGS.allow_changes or (),
        )
    except ConfigError as e:  # bad input, a damaged checkpoint, a diverged run
        sys.exit(f"error: {e}")
    except OSError as e:  # the file system: a full disk, permissions
        sys.exit(f"error: {e}; check the disk space and permissions of --workdir and retry.")
    if not parallel.is_main_process():
        return
    print(
        f"final test accuracy {summary['final_test_accuracy']:.4f}, best "
        f"{summary['best_test_accuracy']:.4f} (epoch {summary['best_epoch']}), final train loss "
        f"{summary['train_loss']:.4f}; {summary['train_time']:.1f} s of training. "
        f"Metrics: {pathlib.Path(FLAGS.workdir) / 'metrics.jsonl'}"
    )


def run() -> None:
    """Defines the flags and runs ``main``."""
    flags.DEFINE_string("workdir", None, "Where checkpoints and metrics.jsonl go.", required=True)
    flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in --workdir.")
    flags.DEFINE_list(
        "allow_changes",
        None,
        "With --resume: config fields that may differ from the checkpoint's (e.g. "
        "learning_rate after a divergence).",
    )
    flags.DEFINE_bool("overwrite", False, "Delete a previous run in --workdir first.")
    flags.DEFINE_bool(
        "distributed", False, "Join a multi-process job (jax.distributed.initialize)."
    )
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (implies it).")
    flags.DEFINE_integer("num_processes", None, "Number of processes of the job.")
    flags.DEFINE_integer("process_id", None, "Index of this process, 0 to num_processes - 1.")
    try:  # config_flags applies the --config.<field>=... overrides of sys.argv here
        config_flags.DEFINE_config_file(
            "config", str(_DEFAULT_CONFIG), "Training configuration file.", lock_config=True
        )
    except (AttributeError, KeyError) as e:
        while isinstance(e, BaseException) and e.args:  # ml_collections nests its KeyError
            e = e.args[0]
        sys.exit(f"error: the config has no field {' '.join(str(e).split())}")
    try:
        app.run(main)
    except Exception as e:
        if FLAGS.is_parsed():
            raise  # a bug in the program: keep its traceback
        # Raised while the flags were parsed: the --config file itself failed to run.
        reason = " ".join(str(e).split("Traceback")[0].split())
        sys.exit(f"error: the --config file failed to load ({type(e).__name__}: {reason}).")


if __name__ == "__main__":
    run()
