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

Run it with ``python -m experiments.train --config=experiments/configs/... --workdir=DIR``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pathlib
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.tree_util import Partial
from tqdm import tqdm

import gam_optax
from experiments import ConfigError, input_pipeline, models, parallel, xla_options
from gam_optax import flatness

BASE_OPTIMIZERS = ("sgd", "adamw")
PERTURBATIONS = ("gam", "sam", "gsam", "looksam", "reuse")  # gam_optax, before the base
REUSABLE = ("gam", "sam", "gsam")  # what config.reuse.inner may name
OPTIMIZERS = BASE_OPTIMIZERS + PERTURBATIONS
WHOLE_BATCH_LIMIT = 4096  # training_objective takes up to this many examples in one pass
# A checkpoint can only be resumed by a run that agrees on these config fields.
RESUME_KEYS = ("dataset", "model", "model_kwargs", "optimizer", "base_optimizer", "batch_size")


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


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
    """The optax chain named by ``config.optimizer``.

    'sgd': coupled weight decay, then SGD with momentum (PyTorch's ``SGD(weight_decay=...)``);
    'adamw': decoupled weight decay. 'gam', 'sam', 'gsam', 'looksam': the ``gam_optax``
    transformation of that name, with the keyword arguments in ``config.<name>``, before
    ``base_optimizer``; 'reuse': ``gam_optax.reuse`` of ``config.reuse.inner`` (built from
    its own section) with the other keyword arguments of ``config.reuse``.
    With ``axis_name`` (a step run per device) the transformations get ``axis_name`` and
    ``average=config.average``, and average over that axis themselves (``train_step`` averages
    ``g0`` for sgd and adamw); the optimizer state is the same as on one device.
    """
    wd = config.weight_decay
    base = {
        "sgd": lambda: optax.chain(
            optax.add_decayed_weights(wd), optax.sgd(schedule, momentum=config.momentum)
        ),
        "adamw": lambda: optax.adamw(schedule, weight_decay=wd),
    }
    if config.optimizer in base:
        return optax.with_extra_args_support(base[config.optimizer]())
    parallel_kwargs = {} if axis_name is None else dict(axis_name=axis_name, average=config.average)

    def perturbation(name, **kwargs):
        transformation = getattr(gam_optax, name, None)
        if transformation is None:
            raise ConfigError(
                f"optimizer {name!r} needs gam_optax.{name}, which this "
                f"version of gam_optax ({gam_optax.__version__}) does not provide."
            )
        return transformation(**config[name].to_dict(), **kwargs, **parallel_kwargs)

    if config.optimizer == "reuse":
        kwargs = config.reuse.to_dict()
        inner = perturbation(kwargs.pop("inner"), has_aux=True)
        first = gam_optax.reuse(inner, **kwargs, **parallel_kwargs)
    else:
        first = perturbation(config.optimizer, has_aux=True)
    return optax.chain(first, base[config.base_optimizer]())


def check_config(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ``ConfigError`` for names and sizes the trainer cannot use."""
    for field, valid in (
        ("parallel", parallel.MODES),
        ("average", parallel.AVERAGES),
        ("dataset", input_pipeline.DATASETS),
        ("model", tuple(models.MODELS)),
        ("optimizer", OPTIMIZERS),
        ("base_optimizer", BASE_OPTIMIZERS),
    ):
        if config[field] not in valid:
            raise ConfigError(
                f"unknown {field.replace('_', ' ')} {config[field]!r}; valid: {', '.join(valid)}."
            )
    if config.optimizer == "reuse" and config.reuse.inner not in REUSABLE:
        raise ConfigError(
            f"unknown config.reuse.inner {config.reuse.inner!r}; valid: {', '.join(REUSABLE)}."
        )
    for field in ("batch_size", "eval_batch_size", "num_epochs"):
        if config[field] < 1:
            raise ConfigError(f"config.{field} must be a positive integer, got {config[field]}.")
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
) -> TrainState:
    """Initial parameters, BatchNorm statistics and optimizer state (one compiled program),
    placed with ``sharding`` (e.g. replicated over a mesh)."""

    @functools.partial(jax.jit, out_shardings=sharding)
    def init(rng):
        variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
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
    config: ml_collections.ConfigDict,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    axis_name: str | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch of uint8 images: augment, g0, ``tx.update``, apply.

    With ``axis_name`` it is one device's part of a data-parallel step (inside ``jax.pmap``
    or ``jax.shard_map``): ``g0`` is this device's gradient, averaged over devices here for
    sgd and adamw, and by ``tx`` (made with ``axis_name``) for gam, sam and gsam.
    """
    images = input_pipeline.augment(rng, batch["image"], mean, std, **config.augment)
    labels = batch["label"]

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, new_vars = model.apply(variables, images, train=True, mutable=["batch_stats"])
        loss = smoothed_cross_entropy(logits, labels, config.label_smoothing).mean()
        return loss, (new_vars["batch_stats"], logits)

    # Under shard_map, the gradient with respect to replicated parameters would already be
    # summed over devices; marked per-device, it is this device's own.
    params = (
        state.params if axis_name is None else jax.lax.pcast(state.params, axis_name, to="varying")
    )
    (loss, (batch_stats, logits)), g0 = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if axis_name is not None and config.optimizer in BASE_OPTIMIZERS:
        g0 = jax.lax.pmean(g0, axis_name)  # the gam_optax transformations average it themselves
    # gam/sam/gsam evaluate their extra gradients with loss_fn; sgd/adamw ignore it. Only the
    # g0 pass updates the BatchNorm statistics.
    updates, opt_state = tx.update(g0, state.opt_state, state.params, loss_fn=loss_fn)
    state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {"loss": loss, "accuracy": accuracy}


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: flax.linen.Module,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, jax.Array]:
    """Sums of the plain cross entropy and of the correct predictions over ``batch['mask']``."""
    images = input_pipeline.normalize(batch["image"], mean, std)
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


def _checkpoint_steps(checkpoint_dir: pathlib.Path) -> list[int]:
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())


def _read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_workdir(workdir: pathlib.Path, resume: bool, overwrite: bool) -> None:
    """Refuses to start a fresh run over an old one, unless told to resume or overwrite."""
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in the workdir, --overwrite deletes it: "
            "pass only one of them."
        )
    steps = _checkpoint_steps(workdir / "checkpoints")
    if resume or overwrite or not (steps or (workdir / "metrics.jsonl").exists()):
        return
    held = f"checkpoints of epochs {steps}" if steps else "a metrics.jsonl"
    raise ConfigError(
        f"workdir {workdir} already holds a run ({held}); nothing was changed. Pass --resume "
        f"to continue it, --overwrite to delete it and start over, or choose another --workdir."
    )


def _resumable_epoch(manager: ocp.CheckpointManager, config: ml_collections.ConfigDict) -> int:
    """The epoch of the latest checkpoint, after checking that ``config`` may continue it."""
    step = manager.latest_step()
    where = manager.directory / str(step)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        written, epoch = meta["config"], int(meta["epoch"])
    except Exception as e:
        raise ConfigError(
            f"cannot read the checkpoint {where} ({type(e).__name__}: {e}); it is corrupt or "
            f"not a checkpoint of this trainer. Nothing was changed: delete it, choose another "
            f"--workdir, or pass --overwrite instead of --resume to start over."
        ) from None
    wanted = json.loads(config.to_json_best_effort())
    differ = {k: (written.get(k), wanted[k]) for k in RESUME_KEYS if written.get(k) != wanted[k]}
    if differ:
        diffs = ", ".join(
            f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in differ.items()
        )
        raise ConfigError(
            f"cannot resume {where}: it was written with a different configuration ({diffs}). "
            f"Nothing was changed: resume with the checkpoint's settings, choose another "
            f"--workdir, or pass --overwrite instead of --resume to start over."
        )
    return epoch


def _restore_state(manager: ocp.CheckpointManager, epoch: int, state: TrainState) -> TrainState:
    """The training state of the checkpoint of ``epoch``, with the structure of ``state``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        return manager.restore(epoch, args=args)["state"]
    except Exception as e:
        raise ConfigError(
            f"cannot restore the training state from {manager.directory / str(epoch)} "
            f"({type(e).__name__}: {e}); the checkpoint is corrupt or does not fit this model "
            f"and optimizer. Nothing was changed: choose another --workdir, or pass --overwrite "
            f"instead of --resume to start over."
        ) from None


def restore_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> dict[str, Any]:
    """The raw training state (a dict of arrays) of the checkpoint of epoch ``step`` (latest),
    on this process's first device, whatever devices and processes wrote it."""
    checkpoint_dir = pathlib.Path(workdir).absolute() / "checkpoints"
    step = max(_checkpoint_steps(checkpoint_dir), default=None) if step is None else step
    if step is None:
        raise ConfigError(f"no checkpoint in {workdir}.")
    with ocp.StandardCheckpointer() as checkpointer:
        path = checkpoint_dir / str(step) / "state"
        written = checkpointer.metadata(path).item_metadata
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), written
        )
        return checkpointer.restore(path, abstract)


def training_objective(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, num_examples: int | None = None
) -> tuple[Callable[[Any], jax.Array], Any]:
    """The training loss around the final parameters of the run in ``workdir``.

    The loss is the training objective (label smoothing included) on the un-augmented
    training set (its first ``num_examples``), with BatchNorm in inference mode so that it
    depends on the parameters only: what ``gam_optax.flatness`` measures.

    Returns:
      ``(loss_fn, params)``. ``loss_fn`` is a ``jax.tree_util.Partial`` (its data are
      arguments of a jitted measure, not constants); beyond ``WHOLE_BATCH_LIMIT`` examples it
      averages batches of ``config.eval_batch_size`` (``gam_optax.flatness.dataset_loss``).
    """
    ds = input_pipeline.load(config.dataset, config.data_dir, num_examples)
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
) -> dict[str, Any]:
    """Trains and evaluates every epoch; returns the final metrics (best and final accuracy).

    Every process of a multi-process job (:func:`experiments.parallel.initialize`) calls it
    with the same arguments; process 0 writes the metrics, and checkpoints are written once,
    as one replicated state that resumes on any number of devices and processes.

    Args:
      config: see ``experiments/configs/default.py``.
      workdir: where ``metrics.jsonl`` and ``checkpoints/`` are written.
      resume: continue from the latest checkpoint in ``workdir`` (or start if there is none).
      overwrite: delete a previous run in ``workdir`` first; without it (or ``resume``) a
        workdir that already holds a run is refused.

    Returns:
      The last epoch's record of ``metrics.jsonl`` plus ``best_test_accuracy``, ``best_epoch``
      and ``train_time`` (seconds spent in training steps, all epochs).
    """
    start = time.perf_counter()
    check_config(config)
    dp = parallel.DataParallel.create(config.parallel, config.average)
    check_config(config, num_devices=dp.num_devices)
    main_process = parallel.is_main_process()
    workdir = pathlib.Path(workdir).absolute()
    _check_workdir(workdir, resume, overwrite)
    checkpoint_dir = workdir / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
    start_epoch = 0
    if resume and _checkpoint_steps(checkpoint_dir):
        manager = ocp.CheckpointManager(checkpoint_dir, options=options)
        start_epoch = _resumable_epoch(manager, config)
    ds = input_pipeline.load(
        config.dataset, config.data_dir, config.num_train_examples, config.num_test_examples
    )
    ds = input_pipeline.hold_out(ds, config.get("validation_examples"))  # "test" = validation
    num_train, batch_size = len(ds.train_labels), config.batch_size
    steps_per_epoch = min(num_train // batch_size, config.steps_per_epoch or num_train)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"batch size {batch_size} exceeds the {num_train} training examples of "
            f"{config.dataset!r}; lower config.batch_size."
        )

    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    model = models.create_model(
        config.model, ds.num_classes, dtype, axis_name=dp.batch_norm_axis, **config.model_kwargs
    )
    schedule = epoch_cosine_schedule(config.learning_rate, config.num_epochs, steps_per_epoch)
    tx = create_optimizer(config, schedule, axis_name=dp.axis_name)
    init_rng, shuffle_rng, augment_rng = jax.random.split(jax.random.key(config.seed), 3)
    state = create_train_state(init_rng, model, tx, ds.train_images.shape[1:], dp.replicated)

    metrics_path = workdir / "metrics.jsonl"
    if start_epoch:
        state = _restore_state(manager, start_epoch, state)
        logging.info("Resumed %s from epoch %d.", workdir, start_epoch)
    else:
        parallel.sync("checked workdir")
        if overwrite and main_process:  # only now that config, data and model passed checks
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
        workdir.mkdir(parents=True, exist_ok=True)
        parallel.sync("cleared workdir")
        manager = ocp.CheckpointManager(checkpoint_dir, options=options)
    # Drop records of epochs after the checkpoint (written before a crash, redone now).
    records = [r for r in _read_metrics(metrics_path) if r["epoch"] <= start_epoch]
    parallel.sync("read metrics")
    if main_process:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    test_data = dp.put_global(
        _eval_batches(ds.test_images, ds.test_labels, config.eval_batch_size, dp.num_devices),
        jax.sharding.PartitionSpec(None, parallel.AXIS),
    )
    step_fn = functools.partial(
        train_step,
        model=model,
        tx=tx,
        config=config,
        mean=ds.mean,
        std=ds.std,
        axis_name=dp.axis_name,
    )
    # The augmentation key of a step derives from (seed, step): resumed runs repeat it.
    train_batch = dp.compile_step(
        lambda state, batch, rng: step_fn(state, batch, jax.random.fold_in(rng, state.step))
    )

    @jax.jit
    def evaluate(state, batches):
        sums = jax.lax.map(
            lambda b: eval_step(state, b, model=model, mean=ds.mean, std=ds.std), batches
        )
        count = jnp.sum(batches["mask"])
        return {"loss": jnp.sum(sums["loss"]) / count, "accuracy": jnp.sum(sums["correct"]) / count}

    epoch_order = jax.jit(
        lambda epoch: jax.random.permutation(jax.random.fold_in(shuffle_rng, epoch), num_train)
    )
    learning_rate = jax.jit(schedule)
    rows = dp.process_rows(batch_size)  # each process reads its own rows of every batch
    read_batch = lambda indices: dp.put_batch(
        {"image": ds.train_images[indices[rows]], "label": ds.train_labels[indices[rows]]}
    )

    # Compiled ahead of time, with XLA's faster convolutions on CPUs that support them.
    # (Not a multi-process pmap: its ahead-of-time executable expects the global shapes.)
    state = dp.from_global(state)
    if dp.mode != "pmap" or jax.process_count() == 1:
        train_batch = xla_options.compile_fast(
            train_batch, state, read_batch(np.arange(batch_size)), augment_rng
        )
    evaluate = xla_options.compile_fast(evaluate, dp.to_global(state), test_data)

    bar = tqdm(
        total=config.num_epochs * steps_per_epoch,
        initial=start_epoch * steps_per_epoch,
        desc=f"{config.optimizer} {config.model} {config.dataset}",
        unit="step",
        disable=not (config.progress_bar and main_process),
        dynamic_ncols=True,
    )
    train_time = sum(r["train_time"] for r in records)
    for epoch in range(start_epoch, config.num_epochs):
        batches = np.asarray(epoch_order(epoch))[: steps_per_epoch * batch_size]
        batches = batches.reshape(steps_per_epoch, batch_size)
        epoch_start, step_metrics = time.perf_counter(), []
        for i in range(steps_per_epoch):
            state, metrics = train_batch(state, read_batch(batches[i]), augment_rng)
            step_metrics.append(metrics)
            if (i + 1) % config.log_every_steps == 0 or i + 1 == steps_per_epoch:
                metrics = dp.metrics(metrics)
                rate = (i + 1) * batch_size / (time.perf_counter() - epoch_start)
                bar.set_postfix(
                    epoch=epoch + 1,
                    loss=f"{metrics['loss']:.4f}",
                    acc=f"{metrics['accuracy']:.3f}",
                    img_s=f"{rate:.0f}",
                    test_acc=f"{records[-1]['test_accuracy']:.4f}" if records else "-",
                    refresh=False,
                )
            bar.update(1)
        step_metrics = [dp.metrics(m) for m in step_metrics]
        train_metrics = jax.tree.map(lambda *x: float(np.mean(x)), *step_metrics)
        epoch_time = time.perf_counter() - epoch_start
        train_time += epoch_time
        global_state = dp.to_global(state)
        test_metrics = jax.device_get(evaluate(global_state, test_data))
        record = {
            "epoch": epoch + 1,
            "step": (epoch + 1) * steps_per_epoch,
            "learning_rate": float(learning_rate(epoch * steps_per_epoch)),
            "train_loss": train_metrics["loss"],
            "train_accuracy": train_metrics["accuracy"],
            "test_loss": float(test_metrics["loss"]),
            "test_accuracy": float(test_metrics["accuracy"]),
            "train_time": epoch_time,
            "images_per_second": steps_per_epoch * batch_size / epoch_time,
        }
        records.append(record)
        if main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
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
        meta = {"epoch": epoch + 1, "config": json.loads(config.to_json_best_effort())}
        manager.save(  # every process takes part; the replicated state is written once
            epoch + 1,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(global_state), meta=ocp.args.JsonSave(meta)
            ),
        )
    manager.wait_until_finished()
    manager.close()
    bar.close()

    if not records:
        raise ConfigError(f"{metrics_path} records no epoch: nothing was trained or recorded.")
    best = max(records, key=lambda r: r["test_accuracy"])
    return {
        **records[-1],
        "final_test_accuracy": records[-1]["test_accuracy"],
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "train_time": train_time,
        "wall_time": time.perf_counter() - start,
    }


if __name__ == "__main__":
    from experiments import main

    main.run()
