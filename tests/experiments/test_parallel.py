"""Data-parallel training: 1 device vs 4 fake CPU devices (jit and pmap), and 2 processes.

The root conftest gives this process 4 CPU devices. Each run is the real program
(``train.train_and_evaluate``) on a tiny digits setting; runs are cached per module.

Every equivalence here claims "the same computation, with the work split differently", so
it is checked in float64 (``config.dtype='float64'``): in float32 the summation order of
each device split rounds differently on different CPUs (XLA:CPU picks its kernels per
processor), and GAM's normalisations amplify it over steps (a 3.6e-6 gap on one Xeon).
In float64 the same splits agree to ~1e-14; the tolerance 1e-10 leaves four orders of
magnitude for the step-to-step amplification, and still fails on any real difference
(the modes that do differ, differ by 1e-3 or more).
"""

import functools
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import tiny

from experiments import ConfigError, input_pipeline, parallel, train

ROOT = pathlib.Path(__file__).parents[2]

# 3 steps of a global batch of 32 (8 per device); augmentation off unless a test turns it on
# (under pmap and shard_map each device draws its own, so only 'jit' keeps the global draw).
TINY = tiny.fields(num_epochs=1, steps_per_epoch=3, dtype="float64")
RTOL, ATOL = 1e-10, 1e-12  # float64; see the module docstring


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def tiny_config(**overrides):
    config = tiny.config(TINY, **overrides)
    config.model_kwargs = dict(widths=(8, 16))
    config.augment.crop_padding = 0
    return config


@functools.cache
def final_state(
    tmp_root, parallel_mode, optimizer, average="gradients", crop=0, steps=3, micro=0,
    strategy="parallel", unroll=True,
):  # fmt: skip
    """The checkpointed state after a tiny run (cached: several tests share runs).
    ``parallel_mode`` 'fsdp' is 'jit' with the state split (``param_sharding='fsdp'``);
    ``micro``: ``config.micro_batch`` (m-sharpness), with ``strategy``."""
    sharding = "fsdp" if parallel_mode == "fsdp" else "replicated"
    config = tiny_config(
        parallel="jit" if sharding == "fsdp" else parallel_mode,
        param_sharding=sharding,
        optimizer=optimizer,
        average=average,
        steps_per_epoch=steps,
        micro_batch=micro,
        micro_strategy=strategy,
    )
    config.augment.crop_padding = crop
    if not unroll:
        config[optimizer].unroll = False
    name = f"{parallel_mode}-{optimizer}-{average}-{crop}-{steps}-{micro}-{strategy}-{unroll}"
    workdir = pathlib.Path(tmp_root) / name
    train.train_and_evaluate(config, workdir)
    return train.restore_checkpoint(workdir)


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("parallel"))


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    assert jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.leaves(a)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_trees_differ(a, b, atol=1e-4):
    gap = max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    assert gap > atol, f"expected different trees, largest gap {gap}"


def test_four_devices_are_in_use():
    assert jax.device_count() == 4
    assert parallel.DataParallel.create("jit").num_devices == 4


@pytest.mark.parametrize("mode", ["jit", "pmap", "fsdp"])
@pytest.mark.parametrize("optimizer", ["sgd", "gam"])
def test_four_devices_equal_one_device_on_the_same_global_batch(tmp_root, mode, optimizer):
    one = final_state(tmp_root, "none", optimizer)
    four = final_state(tmp_root, mode, optimizer)
    assert int(four["step"]) == 3
    assert_trees_close(four["params"], one["params"])
    assert_trees_close(four["batch_stats"], one["batch_stats"])
    assert_trees_close(four["opt_state"], one["opt_state"])


def test_fsdp_splits_the_large_leaves_of_the_state_and_the_step_keeps_them_split():
    """param_sharding='fsdp': each leaf of >= FSDP_MIN_SIZE elements (params, optimizer state,
    BatchNorm statistics) split over the 4 devices on its largest axis they divide, the rest
    replicated; the compiled step takes and returns the state so."""
    config = tiny_config(optimizer="gam", parallel="jit", param_sharding="fsdp")
    ds = input_pipeline.load("digits", None, config.num_train_examples, config.num_test_examples)
    dp = parallel.DataParallel.create("jit", "gradients", "fsdp")
    program = train.build(config, ds, dp, steps_per_epoch=1)
    state = dp.from_global(program.state)
    specs = [x.sharding.spec for x in jax.tree.leaves(state)]
    for x in jax.tree.leaves(state):
        split = [i for i, d in enumerate(x.shape) if d % 4 == 0]
        if x.size >= parallel.FSDP_MIN_SIZE and split:
            axis = max(split, key=lambda i: x.shape[i])
            assert x.sharding.spec[axis] == parallel.AXIS, (x.shape, x.sharding.spec)
            assert x.addressable_shards[0].data.size == x.size // 4
        else:
            assert x.sharding.is_fully_replicated, (x.shape, x.sharding.spec)
    assert any(spec != jax.sharding.PartitionSpec() for spec in specs)
    step = dp.compile_step(program.step, donate=False, state=state)
    batch = dp.put_batch(
        {
            "image": ds.train_images[: config.batch_size],
            "label": ds.train_labels[: config.batch_size],
        }
    )
    after, _ = step(state, batch, jax.random.key(0))
    for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(state), strict=True):
        assert x.sharding == y.sharding
    # the checkpoint's form is whole on every device
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(dp.to_global(after)))


def test_an_fsdp_run_resumes_bitwise_and_under_the_other_layout(tmp_path):
    """2 epochs straight under 'fsdp' = 1 epoch, then resumed: under 'fsdp' bitwise, and
    replicated (the same arithmetic, placed differently) to float64 round-off."""
    config = tiny_config(optimizer="gam", parallel="jit", param_sharding="fsdp", num_epochs=2)
    train.train_and_evaluate(config, tmp_path / "straight")
    straight = train.restore_checkpoint(tmp_path / "straight")
    for sharding in ("fsdp", "replicated"):
        workdir = tmp_path / sharding
        first = tiny_config(optimizer="gam", parallel="jit", param_sharding="fsdp", num_epochs=1)
        train.train_and_evaluate(first, workdir)
        config.param_sharding = sharding
        train.train_and_evaluate(config, workdir, resume=True)
        resumed = train.restore_checkpoint(workdir)
        if sharding == "fsdp":
            jax.tree.map(np.testing.assert_array_equal, resumed, straight)
        else:
            assert_trees_close(resumed, straight)


def test_jit_keeps_the_one_device_augmentation(tmp_root):
    """Under 'jit' the random crops are drawn for the global batch, as on one device."""
    one = final_state(tmp_root, "none", "gam", crop=1)
    four = final_state(tmp_root, "jit", "gam", crop=1)
    assert_trees_close(four["params"], one["params"])
    assert_trees_differ(one["params"], final_state(tmp_root, "none", "gam")["params"])


def _one_step_reference(config):
    """The program's first step, rebuilt with ``train.build``: (state, batch, jitted step)."""
    ds = input_pipeline.load("digits", None, config.num_train_examples, config.num_test_examples)
    _, shuffle_rng, augment_rng = jax.random.split(jax.random.key(config.seed), 3)
    order = jax.random.permutation(jax.random.fold_in(shuffle_rng, 0), config.num_train_examples)
    rows = np.asarray(order)[: config.batch_size]
    batch = {"image": ds.train_images[rows], "label": ds.train_labels[rows]}
    program = train.build(config, ds, parallel.DataParallel.create(), steps_per_epoch=1)
    step = jax.jit(program.step)
    return program.state, batch, lambda state, batch: step(state, batch, augment_rng)


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_per_device_mode_averages_the_per_shard_steps(tmp_root, mode):
    """average='direction': each device runs GAM (and BatchNorm) on its own 8 examples; the
    step applies the mean of the 4 directions. SGD's first step is linear in the direction,
    so the result is the mean of 4 one-device steps on the 4 shards."""
    config = tiny_config(optimizer="gam", steps_per_epoch=1)
    state, batch, step = _one_step_reference(config)
    # The rebuilt step is the program's: on the whole batch it gives the one-device run.
    assert_trees_close(
        step(state, batch)[0].params, final_state(tmp_root, "none", "gam", steps=1)["params"]
    )

    shards = [jax.tree.map(lambda x, k=k: x[8 * k : 8 * (k + 1)], batch) for k in range(4)]
    per_shard = [step(state, shard)[0] for shard in shards]
    mean = jax.tree.map(lambda *x: np.mean(x, axis=0), *per_shard)
    four = final_state(tmp_root, mode, "gam", average="direction", steps=1)
    assert_trees_close(four["params"], mean.params)
    assert_trees_close(four["batch_stats"], mean.batch_stats)
    # ... which is not the global-batch step.
    assert_trees_differ(four["params"], final_state(tmp_root, "none", "gam", steps=1)["params"])


# m-sharpness (config.micro_batch): each micro-batch of m examples takes its own direction.


@pytest.mark.parametrize("optimizer", ["gam", "sgd"])
def test_micro_batches_on_one_device_equal_direction_mode_over_four_devices(tmp_root, optimizer):
    """4 micro-batches of 8 on one device are the 4 devices of 'direction' mode, each holding
    one: the same directions (own g0, own perturbation, BatchNorm over its 8 examples), the
    same mean; sgd: the mean of the 4 shards' gradients, each with BatchNorm over 8."""
    four = final_state(tmp_root, "pmap", optimizer, average="direction", steps=1)
    one = final_state(tmp_root, "none", optimizer, steps=1, micro=8)
    for part in ("params", "batch_stats", "opt_state"):
        assert_trees_close(one[part], four[part])
    plain = final_state(tmp_root, "none", optimizer, steps=1)
    assert_trees_differ(one["params"], plain["params"])


def test_micro_batches_take_the_mean_of_each_micro_batchs_own_step(tmp_root):
    """The first step with micro-batches of 8 is the mean of the one-device steps on each
    micro-batch alone (SGD's first step is linear in the direction): an independent
    reference, the plain step of the program run 4 times."""
    config = tiny_config(optimizer="gam", steps_per_epoch=1)
    state, batch, step = _one_step_reference(config)
    parts = [jax.tree.map(lambda x, k=k: x[8 * k : 8 * (k + 1)], batch) for k in range(4)]
    mean = jax.tree.map(lambda *x: np.mean(x, axis=0), *[step(state, p)[0] for p in parts])
    micro = final_state(tmp_root, "none", "gam", steps=1, micro=8)
    assert_trees_close(micro["params"], mean.params)
    assert_trees_close(micro["batch_stats"], mean.batch_stats)


@pytest.mark.parametrize("optimizer", ["gam", "sgd"])
def test_one_micro_batch_of_the_whole_batch_is_the_plain_step(tmp_root, optimizer):
    whole = final_state(tmp_root, "none", optimizer, steps=1, micro=32)
    plain = final_state(tmp_root, "none", optimizer, steps=1)
    for part in ("params", "batch_stats", "opt_state"):
        assert_trees_close(whole[part], plain[part])


@pytest.mark.parametrize("optimizer", ["gam", "sgd"])
def test_sequential_micro_batches_equal_parallel_ones(tmp_root, optimizer):
    sequential = final_state(tmp_root, "none", optimizer, steps=1, micro=8, strategy="sequential")
    parallel_ = final_state(tmp_root, "none", optimizer, steps=1, micro=8)
    for part in ("params", "batch_stats", "opt_state"):
        assert_trees_close(sequential[part], parallel_[part])


def test_micro_batches_compose_with_the_scan_of_unroll_false(tmp_root):
    scanned = final_state(tmp_root, "none", "gam", steps=1, micro=8, unroll=False)
    inline = final_state(tmp_root, "none", "gam", steps=1, micro=8)
    for part in ("params", "batch_stats"):
        assert_trees_close(scanned[part], inline[part])


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_micro_batches_within_each_devices_shard_equal_one_device(tmp_root, mode):
    """4 devices in 'direction' mode (jit: shard_map), each splitting its 8 examples into 2
    micro-batches of 4, are one device's 8 micro-batches of 4; and jit's global batch
    (average='gradients') cut into micro-batches is the one-device step too."""
    one = final_state(tmp_root, "none", "gam", steps=1, micro=4)
    four = final_state(tmp_root, mode, "gam", average="direction", steps=1, micro=4)
    for part in ("params", "batch_stats", "opt_state"):
        assert_trees_close(four[part], one[part])
    if mode == "jit":
        global_batch = final_state(tmp_root, "jit", "gam", steps=1, micro=4)
        assert_trees_close(global_batch["params"], one["params"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(micro_batch=5), r"micro_batch=5 does not divide the batch of 32 examples per "),
        (dict(parallel="jit", micro_batch=16), r"batch of 8 examples per device; pick one of"),
        (dict(micro_batch=-1), "micro_batch must be"),
        (dict(micro_batch=8, micro_strategy="serial"), "unknown micro strategy 'serial'"),
        (dict(micro_batch=8, optimizer="looksam"), "looksam keeps a direction from one step"),
        (dict(micro_batch=8, optimizer="reuse"), "reuse keeps a direction"),
        (dict(parallel="pmap", micro_batch=4), "set --config.average=direction"),
    ],
)
def test_bad_micro_batches_fail_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(tiny_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(parallel="spmd"), "unknown parallel 'spmd'"),
        (dict(parallel="jit", average="shards"), "unknown average 'shards'"),
        (dict(parallel="jit", param_sharding="zero3"), "unknown param sharding 'zero3'"),
        (dict(parallel="pmap", param_sharding="fsdp"), "needs parallel='jit' and average="),
        (
            dict(parallel="jit", average="direction", param_sharding="fsdp"),
            "needs parallel='jit' and average='gradients'",
        ),
        (dict(parallel="jit", batch_size=30), "not divisible by the 4 devices"),
        (dict(parallel="pmap", batch_size=6), "not divisible by the 4 devices"),
    ],
)
def test_bad_parallel_settings_fail_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(tiny_config(**overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG_FILE = """
from experiments.configs import default

def get_config():
    config = default.get_config()
    config.update({overrides!r})
    config.model_kwargs = dict(widths=(8, 16))
    config.augment.crop_padding = 0
    return config
"""


def test_two_processes_train_like_one_and_resume_on_one(tmp_path):
    """2 processes x 2 CPU devices (jax.distributed over 127.0.0.1) train 2 epochs of 2 steps
    like one process; their checkpoint, written once, resumes in one process on 4 devices."""
    overrides = {**TINY, "num_epochs": 2, "steps_per_epoch": 2, "optimizer": "gam"}
    config_file = tmp_path / "tiny.py"
    config_file.write_text(CONFIG_FILE.format(overrides={**overrides, "parallel": "jit"}))
    workdir, port = tmp_path / "two", _free_port()
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"}
    command = [
        sys.executable,
        "-m",
        "experiments.train",
        f"--config={config_file}",
        f"--workdir={workdir}",
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
    ]
    processes = [
        subprocess.Popen(
            [*command, f"--process_id={i}"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "final test accuracy" in outputs[0] and "final test accuracy" not in outputs[1]

    config = tiny_config(**overrides)
    one = train.train_and_evaluate(config, tmp_path / "one")
    two = train.restore_checkpoint(workdir)
    assert int(two["step"]) == 4
    assert_trees_close(two, train.restore_checkpoint(tmp_path / "one"))
    records = (workdir / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2  # written by process 0 alone

    # Resume epoch 2 from the 2-process checkpoint of epoch 1, in this process, with pmap.
    (workdir / "checkpoints" / "2").rename(tmp_path / "epoch2-of-two")
    config.parallel = "pmap"
    resumed = train.train_and_evaluate(config, workdir, resume=True)
    assert_trees_close(
        train.restore_checkpoint(workdir), train.restore_checkpoint(tmp_path / "one")
    )
    assert resumed["test_accuracy"] == pytest.approx(one["test_accuracy"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_processes=2"], "pass all three of --coordinator_address, --num_processes"),
        (["--distributed"], "could not join the multi-process job"),
    ],
)
def test_a_job_that_cannot_start_says_how_to_launch_it(tmp_path, flags, message):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *flags]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name in ("SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES"):
        env.pop(name, None)  # no cluster for --distributed to find
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: {message}" in result.stderr
    assert not workdir.exists()
