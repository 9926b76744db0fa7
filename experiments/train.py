"""The training loop: ``train_and_evaluate(config, workdir)`` -> final metrics.

Every epoch runs the step of ``experiments.step`` over the shuffled training set, then
evaluates on the test set, appends a line to ``workdir/metrics.jsonl`` (and TensorBoard
scalars) and writes an Orbax checkpoint; ``resume=True`` continues from the last checkpoint
and, since the shuffle and augmentation keys derive from (seed, epoch, step), ends with the
same parameters, bit for bit, as an uninterrupted run.

The same step runs on one device or data-parallel over every device of every process
(``config.parallel``: ``jax.jit`` over a mesh or ``jax.pmap``; see ``experiments.parallel``).

The command line, ``python -m experiments.train --workdir=DIR [--config=FILE] ...`` (its
examples and flags: ``--help``), is ``experiments.cli`` run with :func:`train_and_evaluate`.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import ConfigError, checkpoints, input_pipeline, parallel, xla_options
from experiments.report import SUMMARIES_NAME, SUMMARY_TAGS, Report  # noqa: F401
from experiments.step import (  # noqa: F401 (the step's names, also importable from here)
    DTYPES,
    Program,
    TrainState,
    build,
    check_batch_split,
    check_config,
    create_optimizer,
    create_train_state,
    epoch_cosine_schedule,
    eval_step,
    refresh_period,
    smoothed_cross_entropy,
    train_step,
)

restore_checkpoint = checkpoints.restore_checkpoint  # a finished run's state, verified


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
      The last epoch's record of ``metrics.jsonl`` plus ``best_test_accuracy``, ``best_epoch``,
      ``train_time`` (seconds spent in training steps, all epochs), ``compile_time``
      (seconds compiling the step and the evaluation ahead of time, this call; a
      multi-process pmap job compiles its step in the first step instead),
      ``epochs_trained`` (by this call: 0 if the resumed run was finished) and ``wall_time``
      (this call's seconds).
    """
    start = time.perf_counter()
    check_config(config)
    dp = parallel.DataParallel.create(config.parallel, config.average, config.param_sharding)
    check_batch_split(config, dp.num_devices)
    workdir = pathlib.Path(workdir).expanduser().absolute()
    with checkpoints.claimed(workdir, resume, overwrite, allow_changes):
        ds = input_pipeline.for_run(config)  # label noise, validation hold-out ("test" = it)
        program = build(config, ds, dp, steps_per_epoch(config, ds))
        # Resume (verified), or clear the workdir for a fresh run: only now that config, data
        # and model passed their checks.
        run = checkpoints.opened(workdir, config, program.state, resume, overwrite, allow_changes)
        with run as (store, first_epoch, state, records):
            records, compile_time = _epochs(
                config, dp, ds, program, store, first_epoch, state, records
            )
        if not records:
            where = workdir / checkpoints.METRICS_NAME
            raise ConfigError(f"{where} records no epoch: nothing was trained or recorded.")
    return _summary(records, first_epoch, compile_time, time.perf_counter() - start)


def _summary(records, first_epoch: int, compile_time: float, wall_time: float) -> dict:
    """What :func:`train_and_evaluate` returns, from every epoch's record."""
    best = max(records, key=lambda r: r["test_accuracy"])
    return {
        **records[-1],
        "final_test_accuracy": records[-1]["test_accuracy"],
        "best_test_accuracy": best["test_accuracy"],
        "best_epoch": best["epoch"],
        "train_time": sum(r["train_time"] for r in records),
        "compile_time": compile_time,
        "epochs_trained": records[-1]["epoch"] - first_epoch,
        "wall_time": wall_time,
    }


def steps_per_epoch(config: ml_collections.ConfigDict, ds: input_pipeline.Dataset) -> int:
    """Whole batches per epoch (at most ``config.steps_per_epoch``)."""
    num_train, batch_size = len(ds.train_labels), config.batch_size
    steps = min(num_train // batch_size, config.steps_per_epoch or num_train)
    if steps < 1:
        raise ConfigError(
            f"batch size {batch_size} exceeds the {num_train} training examples of "
            f"{config.dataset!r}; lower config.batch_size."
        )
    return steps


def _epochs(config, dp, ds, program, store, start_epoch, state, records):
    """The epochs after ``start_epoch``: train, evaluate, record, checkpoint. Returns the
    records of every epoch and the seconds spent compiling the step and the evaluation."""
    if start_epoch >= config.num_epochs:
        return records, 0.0  # a finished run: nothing to compile or train
    num_train, batch_size = len(ds.train_labels), config.batch_size
    steps = steps_per_epoch(config, ds)
    _, shuffle_rng, augment_rng = jax.random.split(jax.random.key(config.seed), 3)
    epoch_order = jax.jit(
        lambda epoch: jax.random.permutation(jax.random.fold_in(shuffle_rng, epoch), num_train)
    )
    learning_rate = jax.jit(program.schedule)
    rows = dp.process_rows(batch_size)  # each process reads its own rows of every batch
    read_batch = lambda indices: dp.put_batch(
        {"image": ds.train_images[indices[rows]], "label": ds.train_labels[indices[rows]]}
    )
    state = dp.from_global(state)
    compile_start = time.perf_counter()  # ahead of time: the epochs' times exclude it
    first = read_batch(np.arange(batch_size))
    train_batch = _compile_steps(config, dp, program, state, first, augment_rng)
    evaluate = _evaluator(config, dp, ds, program, state)
    compile_time = time.perf_counter() - compile_start
    report = Report(config, store, start_epoch, steps)
    for epoch in range(start_epoch, config.num_epochs):
        order = np.asarray(epoch_order(epoch))[: steps * batch_size].reshape(steps, batch_size)
        epoch_start, pending, step_metrics = time.perf_counter(), [], []
        for i in range(steps):
            state, metrics = train_batch(
                epoch * steps + i, state, read_batch(order[i]), augment_rng
            )
            pending.append(metrics)
            if (i + 1) % config.log_every_steps == 0 or i + 1 == steps:
                # The divergence guard reads every step's flag, once per log interval.
                step_metrics += [dp.metrics(m) for m in pending]
                pending = []
                report.stop_if_diverged(step_metrics, epoch)
                rate = (i + 1) * batch_size / (time.perf_counter() - epoch_start)
                report.progress(epoch, step_metrics[-1], rate, records)
            report.bar.update(1)
        epoch_time = time.perf_counter() - epoch_start
        global_state = dp.to_global(state)
        test_metrics = jax.device_get(evaluate(global_state))
        if not np.isfinite(test_metrics["loss"]):
            raise report.diverged(
                f"at epoch {epoch + 1} (finite parameters, but a non-finite test loss)"
            )
        lr = learning_rate(epoch * steps)
        record = report.epoch(epoch, step_metrics, test_metrics, lr, epoch_time)
        records.append(record)
        # The checkpoint first (every process takes part; the state is written once), then
        # the record: a crash in between is repaired on resume from the checkpoint's records.
        meta = {"config": json.loads(config.to_json_best_effort()), "records": records}
        store.save(epoch + 1, global_state, meta)
        report.write(record)
    report.close()
    return records, compile_time


def _compile_steps(config, dp, program, state, batch, rng) -> Callable[..., Any]:
    """``train_batch(step, state, batch, rng)``: the compiled step of global step ``step``.

    Compiled ahead of time, with XLA's faster convolutions on CPUs that support them (not a
    multi-process pmap: its ahead-of-time executable expects the global shapes). An amortised
    optimizer gets two programs, its refresh and its reuse step, chosen here."""

    def compile_train_step(refresh: bool | None):
        # The augmentation key of a step derives from (seed, step): resumed runs repeat it.
        step = functools.partial(program.step, refresh=refresh)
        fn = dp.compile_step(
            lambda state, batch, rng: step(state, batch, jax.random.fold_in(rng, state.step)),
            state=state,
        )
        if dp.mode != "pmap" or jax.process_count() == 1:
            fn = xla_options.compile_fast(fn, state, batch, rng)
        return fn

    every = refresh_period(config)
    steps = {r: compile_train_step(r) for r in ((True, False) if every else (None,))}
    return lambda step, *args: steps[every and step % every == 0](*args)


def _evaluator(config, dp, ds, program, state) -> Callable[[Any], dict[str, jax.Array]]:
    """``evaluate(global_state)``: the mean loss and accuracy on the whole test set."""
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

    evaluate = xla_options.compile_fast(evaluate, dp.to_global(state), test_data)
    return lambda state: evaluate(state, test_data)


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


if __name__ == "__main__":
    from experiments import cli

    cli.run(train_and_evaluate)
