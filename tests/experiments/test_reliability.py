"""The training program never loses or corrupts work: divergence, damaged checkpoints, two
runs on one workdir, crashed resumes, bad config values and file-system problems."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny

from experiments import (
    ConfigError,
    TrainingDiverged,
    checkpoints,
    cli,
    input_pipeline,
    models,
    train,
    xla_options,
)
from experiments import compare as main_job

ROOT = pathlib.Path(__file__).parents[2]

TINY = tiny.fields(optimizer="sgd", num_train_examples=128)


def tiny_config(**overrides):
    config = tiny.config(TINY, **overrides)
    config.model_kwargs = dict(widths=(8, 16))
    return config


def files(workdir: pathlib.Path) -> dict[str, bytes]:
    """Every file under workdir and its content (but the lock, which names its last holder)."""
    return {
        str(p.relative_to(workdir)): p.read_bytes()
        for p in workdir.rglob("*")
        if p.is_file() and p.name != checkpoints.LOCK_NAME
    }


def snapshot(workdir: pathlib.Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file and folder under workdir, itself and the lock included: its bytes (None
    for a folder) and its mtime in nanoseconds."""
    return {
        str(p.relative_to(workdir)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in [workdir, *workdir.rglob("*")]
    }


def aged(workdir: pathlib.Path) -> dict[str, tuple[bytes | None, int]]:
    """:func:`snapshot` after dating every file and folder 2001-09-09: a rewrite within the
    file system's timestamp granularity still shows."""
    for p in [workdir, *workdir.rglob("*")]:
        os.utime(p, ns=(10**18, 10**18))
    return snapshot(workdir)


def strict_records(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl parsed as strict JSON (NaN and Infinity are not JSON)."""

    def refuse(token):
        raise AssertionError(f"metrics.jsonl holds {token}, which is not JSON")

    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def run_cli(*args, module="experiments.train"):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)


CONFIG_FILE = """
from experiments.configs import default

def get_config():
    config = default.get_config()
    config.update({overrides!r})
    config.model_kwargs = dict(widths=(8, 16))
    return config
"""


def cli_flags(workdir, **overrides):
    """The command line of ``tiny_config(**overrides)``, through a config file beside it."""
    config_file = pathlib.Path(tempfile.mkdtemp()) / "tiny.py"
    config_file.write_text(CONFIG_FILE.format(overrides={**TINY, **overrides}))
    return [f"--config={config_file}", f"--workdir={workdir}"]


def assert_one_line_error(result, message: str):
    """A non-zero exit whose stderr ends with one ``error:`` line, and no traceback."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "TensorStore" not in result.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny 3-epoch run keeping all 3 checkpoints: (workdir, files)."""
    workdir = tmp_path_factory.mktemp("reliability") / "run"
    train.train_and_evaluate(tiny_config(num_epochs=3, keep_checkpoints=3), workdir)
    return workdir, files(workdir)


def copy_of(run, tmp_path) -> pathlib.Path:
    workdir = tmp_path / "copy"
    shutil.copytree(run[0], workdir)
    return workdir


# ----------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(finished_run, tmp_path):
    """Resumed from epoch 3 with a learning rate that overflows float32 at once, and only one
    checkpoint kept: the run stops in epoch 4, and checkpoint 3 is neither replaced by a
    non-finite state nor rotated out."""
    workdir = copy_of(finished_run, tmp_path)
    diverging = tiny_config(num_epochs=6, keep_checkpoints=1, learning_rate=1e30)
    with pytest.raises(TrainingDiverged) as error:
        train.train_and_evaluate(diverging, workdir, resume=True, allow_changes=["learning_rate"])
    message = str(error.value)
    assert message.startswith("training diverged at epoch 4")
    assert f"the last good checkpoint, {workdir / 'checkpoints' / '3'} (epoch 3), is kept" in (
        message
    )
    assert "--config.skip_nonfinite_steps" in message
    assert checkpoints.checkpoint_epochs(workdir) == [1, 2, 3]  # nothing written or rotated
    state = train.restore_checkpoint(workdir)  # verified: checksums and finite
    assert int(state["step"]) == 3 * TINY["steps_per_epoch"]
    assert [r["epoch"] for r in strict_records(workdir)] == [1, 2, 3]

    # The command line: the same one line, and a non-zero exit.
    result = run_cli(
        *cli_flags(workdir, num_epochs=6, learning_rate=1e30),
        "--resume",
        "--allow_changes=learning_rate",
    )
    assert_one_line_error(result, "error: training diverged at epoch 4")
    assert "--resume --allow_changes=learning_rate" in result.stderr
    assert [r["epoch"] for r in strict_records(workdir)] == [1, 2, 3]


def test_a_fresh_run_that_diverges_at_once_says_so_and_writes_no_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step \d .*no checkpoint was written"):
        train.train_and_evaluate(tiny_config(learning_rate=1e30), workdir)
    assert checkpoints.checkpoint_epochs(workdir) == []
    assert strict_records(workdir) == []


def _step_parts(skip: int):
    """A tiny model's state and a jitted ``train_step`` with ``skip_nonfinite_steps=skip``."""
    config = tiny_config(skip_nonfinite_steps=skip)
    config.augment.crop_padding = 0
    ds = input_pipeline.load("digits", None, 64, 64)
    model = models.create_model("small_cnn", 10, widths=(8, 16))
    tx = train.create_optimizer(config, lambda count: 0.1)
    state = train.create_train_state(jax.random.key(0), model, tx, ds.train_images.shape[1:])
    batch = {"image": ds.train_images[:32], "label": ds.train_labels[:32]}

    def step(state, mean):
        kwargs = dict(model=model, tx=tx, mean=mean, std=ds.std, augment=config.augment.to_dict())
        kwargs.update(label_smoothing=config.label_smoothing)
        return jax.jit(lambda s: train.train_step(s, batch, jax.random.key(1), **kwargs))(state)

    return state, step, ds.mean


@pytest.mark.parametrize("skip", [0, 3])
def test_non_finite_steps_stop_the_run_or_are_skipped_whole(skip):
    """A batch normalised with a NaN mean gives NaN logits and gradients. Without skipping,
    the step is flagged as diverged; with ``skip_nonfinite_steps`` it is skipped whole:
    parameters, BatchNorm statistics and momentum are those before the step."""
    state, step, mean = _step_parts(skip)
    after, metrics = step(state, (float("nan"),))
    if skip:
        assert metrics["skipped"] == 1 and metrics["finite"] == 1
        for kept, before in zip(
            jax.tree.leaves((after.params, after.batch_stats, after.opt_state)),
            jax.tree.leaves((state.params, state.batch_stats, state.opt_state)),
            strict=False,
        ):
            if jnp.issubdtype(kept.dtype, jnp.floating):
                np.testing.assert_array_equal(kept, before)
    else:
        assert metrics["skipped"] == 0 and metrics["finite"] == 0
    # A normal batch is applied in both modes.
    after, metrics = step(state, mean)
    assert metrics["finite"] == 1 and metrics["skipped"] == 0
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), after.params, state.params)
    assert max(jax.tree.leaves(moved)) > 0


# ----------------------------------------------------------------------------- integrity


def _data_files(checkpoint: pathlib.Path) -> list[pathlib.Path]:
    """The array data files of a checkpoint's state, largest first."""
    found = [p for p in (checkpoint / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return sorted(found, key=lambda p: -p.stat().st_size)


def test_flipped_bytes_in_a_checkpoint_are_detected_and_nothing_changes(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    target = _data_files(workdir / "checkpoints" / "3")[0]
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    target.write_bytes(bytes(data))
    before = files(workdir)
    with pytest.raises(ConfigError, match=r"checkpoint .*/3 is damaged .*resume from epoch 2"):
        train.train_and_evaluate(tiny_config(num_epochs=4), workdir, resume=True)
    with pytest.raises(ConfigError, match=r"checkpoint .*/3 is damaged"):
        train.restore_checkpoint(workdir)
    assert files(workdir) == before

    # Moved away as the message says, the run resumes from epoch 2.
    (workdir / "checkpoints" / "3").rename(workdir / "checkpoints" / "3.damaged")
    train.train_and_evaluate(tiny_config(num_epochs=3), workdir, resume=True)
    assert [r["epoch"] for r in strict_records(workdir)] == [1, 2, 3]


def _truncate(checkpoint: pathlib.Path) -> None:
    target = _data_files(checkpoint)[0]
    target.write_bytes(target.read_bytes()[:100])


def _garble_array_metadata(checkpoint: pathlib.Path) -> None:
    target = checkpoint / "state" / "_METADATA"
    target.write_text(target.read_text().replace('"', "'", 7))


@pytest.mark.parametrize("damage", [_truncate, _garble_array_metadata])
def test_a_damaged_checkpoint_is_one_line_on_the_command_line(finished_run, tmp_path, damage):
    """The damage is found from ``files.json`` before Orbax reads anything: no failed
    TensorStore read whose unfinished reads print tracebacks after the error."""
    workdir = copy_of(finished_run, tmp_path)
    damage(workdir / "checkpoints" / "3")
    before = files(workdir)
    result = run_cli(*cli_flags(workdir, num_epochs=4), "--resume")
    assert_one_line_error(result, f"checkpoint {workdir / 'checkpoints' / '3'} is damaged")
    assert "Exception ignored" not in result.stderr
    assert files(workdir) == before


def test_files_json_lists_every_file_and_names_what_changed(tmp_path):
    checkpoint = tmp_path / "7"
    for name, data in [("state/d/a", b"x" * 10), ("state/_METADATA", b"{}"), ("meta/m", b"1")]:
        (checkpoint / name).parent.mkdir(parents=True, exist_ok=True)
        (checkpoint / name).write_bytes(data)
    assert checkpoints.damaged_files(checkpoint) is None  # no files.json: not judged here
    checkpoints.write_file_manifest(checkpoint)
    listed = json.loads((checkpoint / "files.json").read_text())
    assert listed == {
        "meta/m": [1, zlib.crc32(b"1")],
        "state/_METADATA": [2, zlib.crc32(b"{}")],
        "state/d/a": [10, zlib.crc32(b"x" * 10)],
    }
    assert checkpoints.damaged_files(checkpoint) is None

    def damaged_by(change) -> str | None:
        copy = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        shutil.copytree(checkpoint, copy)
        change(copy)
        return checkpoints.damaged_files(copy)

    assert damaged_by(lambda c: (c / "state/d/a").write_bytes(b"x" * 9)) == (
        "state/d/a has 9 bytes, 10 were written"
    )
    assert damaged_by(lambda c: (c / "state/d/a").write_bytes(b"x" * 9 + b"y")) == (
        "state/d/a does not match the checksum written with it"
    )
    assert damaged_by(lambda c: (c / "meta/m").unlink()) == "meta/m is missing"
    assert damaged_by(lambda c: (c / "state/d/b").write_bytes(b"")) == (
        "state/d/b was not written with it"
    )
    assert damaged_by(lambda c: (c / "files.json").write_text("{garbled")) == (
        "its files.json cannot be read"
    )


def test_a_checkpoint_without_files_json_still_resumes_verified(finished_run, tmp_path):
    """One written before files.json existed, or killed between Orbax's commit and the
    manifest: its arrays' checksums are checked after the read, as before."""
    workdir = copy_of(finished_run, tmp_path)
    for listed in (workdir / "checkpoints").glob("*/files.json"):
        listed.unlink()
    state = train.restore_checkpoint(workdir)
    assert int(state["step"]) == 3 * TINY["steps_per_epoch"]
    train.train_and_evaluate(tiny_config(num_epochs=4), workdir, resume=True)
    assert [r["epoch"] for r in strict_records(workdir)] == [1, 2, 3, 4]
    assert (workdir / "checkpoints" / "4" / "files.json").exists()


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    "changed",
    [
        dict(label_noise=0.2),
        dict(label_noise_seed=5),
        dict(num_train_examples=96),
        dict(validation_examples=32),
        dict(learning_rate=0.05, seed=3),
        dict(augment=dict(crop_padding=0, flip=False, cutout_size=0)),
    ],
)
def test_a_resume_that_would_change_the_run_is_refused_and_changes_nothing(
    finished_run, tmp_path, changed
):
    workdir = copy_of(finished_run, tmp_path)
    before = files(workdir)
    with pytest.raises(ConfigError) as error:
        train.train_and_evaluate(tiny_config(num_epochs=4, **changed), workdir, resume=True)
    message = str(error.value)
    assert message.startswith(f"cannot resume {workdir / 'checkpoints' / '3'}")
    flat = checkpoints.flat_config(changed)
    old = checkpoints.flat_config(json.loads(tiny_config().to_json_best_effort()))
    for field, value in flat.items():
        if old[field] != value:
            assert f"{field}: {old[field]!r} in the checkpoint, {value!r} now" in message
    assert "num_epochs" not in message.split("(only")[0]  # may change: not a difference
    assert files(workdir) == before


def test_a_deliberate_change_on_resume_is_named_and_checked(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    before = files(workdir)
    lower = tiny_config(num_epochs=4, learning_rate=0.05, seed=1)
    with pytest.raises(ConfigError) as error:  # the seed is not among the allowed changes
        train.train_and_evaluate(lower, workdir, resume=True, allow_changes=["learning_rate"])
    assert "seed: 0 in the checkpoint, 1 now)" in str(error.value)
    assert "--allow_changes=seed" in str(error.value)
    with pytest.raises(ConfigError, match=r"--allow_changes names lerning_rate, which the"):
        train.train_and_evaluate(lower, workdir, resume=True, allow_changes=["lerning_rate"])
    assert files(workdir) == before
    train.train_and_evaluate(
        tiny_config(num_epochs=4, learning_rate=0.05),
        workdir,
        resume=True,
        allow_changes=["learning_rate"],
    )
    assert [r["epoch"] for r in strict_records(workdir)] == [1, 2, 3, 4]


def test_a_resume_may_extend_the_run_and_change_its_bookkeeping(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    assert "num_epochs" in checkpoints.MAY_CHANGE_ON_RESUME
    bookkeeping = dict(log_every_steps=1, keep_checkpoints=4, eval_batch_size=32)
    summary = train.train_and_evaluate(
        tiny_config(num_epochs=5, **bookkeeping), workdir, resume=True
    )
    assert summary["epoch"] == 5
    assert [r["epoch"] for r in strict_records(workdir)] == [1, 2, 3, 4, 5]
    assert checkpoints.checkpoint_epochs(workdir) == [2, 3, 4, 5]  # keep_checkpoints=4


def test_changed_fields_compares_every_leaf_and_fills_fields_a_run_predates():
    written = {"a": 1, "gam": {"rho": 0.2, "beta": 0.5}, "epochs": 3}
    wanted = {"a": 1, "gam": {"rho": 0.5, "beta": 0.5}, "epochs": 9, "new": "x", "kw": {}}
    assert checkpoints.changed_fields(written, wanted, may_change=frozenset({"epochs"})) == {
        "gam.rho": (0.2, 0.5),
        "new": (None, "x"),
    }
    assert checkpoints.changed_fields(
        written, wanted, may_change=frozenset({"epochs"}), defaults={"new": "x"}
    ) == {"gam.rho": (0.2, 0.5)}


def test_allow_changes_without_resume_is_refused_before_anything(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"--allow_changes=learning_rate applies to --resume"):
        train.train_and_evaluate(tiny_config(), workdir, allow_changes=["learning_rate"])
    result = run_cli(*cli_flags(workdir), "--allow_changes=learning_rate,seed")
    assert_one_line_error(result, "--allow_changes=learning_rate,seed applies to --resume only")
    assert "add --resume" in result.stderr and "drop --allow_changes" in result.stderr
    assert not workdir.exists()


def changed_widths(**overrides):
    config = tiny_config(**overrides)
    config.model_kwargs = dict(widths=(8, 32))
    return config


@pytest.mark.parametrize(
    "config, allow, fields",
    [
        (tiny_config(optimizer="gam"), ["optimizer"], "optimizer: 'sgd' in the checkpoint, "),
        (tiny_config(optimizer="gam"), [], "optimizer: 'sgd' in the checkpoint, 'gam' now"),
        (changed_widths(), ["model_kwargs.widths"], "model_kwargs.widths: [8, 16] in the chec"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_as_such_not_as_damage(
    finished_run, tmp_path, config, allow, fields
):
    """Another optimizer or another model, allowed or not: the checkpoint is intact, the
    message names the fields that differ and the way on, and nothing changes."""
    workdir = copy_of(finished_run, tmp_path)
    before = files(workdir)
    config.num_epochs = 4
    with pytest.raises(ConfigError) as error:
        train.train_and_evaluate(config, workdir, resume=True, allow_changes=allow)
    message = str(error.value)
    assert message.startswith(f"cannot resume {workdir / 'checkpoints' / '3'}: the model and")
    assert fields in message and "no --allow_changes can continue it" in message
    assert "The checkpoint is intact and nothing was changed" in message
    assert "another --workdir" in message and "damaged" not in message
    assert files(workdir) == before
    checkpoints.restore_checkpoint(workdir)  # verified: intact


def test_a_resume_to_fewer_epochs_than_done_is_refused_and_to_as_many_trains_nothing(
    finished_run, tmp_path
):
    workdir = copy_of(finished_run, tmp_path)
    before = files(workdir)
    with pytest.raises(ConfigError) as error:
        train.train_and_evaluate(tiny_config(num_epochs=2), workdir, resume=True)
    message = str(error.value)
    assert "for num_epochs=2: it has trained 3 epochs already" in message
    assert "--config.num_epochs=3" in message and "--overwrite" in message
    assert files(workdir) == before
    summary = train.train_and_evaluate(tiny_config(num_epochs=3), workdir, resume=True)
    assert (summary["epoch"], summary["epochs_trained"], summary["compile_time"]) == (3, 0, 0.0)
    assert files(workdir) == before
    notice, line = cli.summary_line(summary, str(workdir)).splitlines()  # what the CLI prints
    assert notice.startswith(f"nothing was trained: {workdir} already holds all 3 epochs")
    assert "--config.num_epochs" in notice and line.startswith("final test accuracy")
    assert "nothing" not in cli.summary_line({**summary, "epochs_trained": 1}, str(workdir))


def test_compilation_is_timed_apart_from_the_training_steps(tmp_path, monkeypatch):
    """Every compilation made 1 s slower: compile_time grows by that, train_time does not."""
    delay = 1.0
    compile_fast = xla_options.compile_fast

    def slow_compile(*args, **kwargs):
        time.sleep(delay)
        return compile_fast(*args, **kwargs)

    monkeypatch.setattr(xla_options, "compile_fast", slow_compile)
    summary = train.train_and_evaluate(tiny_config(num_epochs=1), tmp_path / "run")
    assert summary["compile_time"] >= 2 * delay  # the step and the evaluation
    assert summary["train_time"] < delay
    assert summary["compile_time"] + summary["train_time"] < summary["wall_time"]


def test_the_command_line_refuses_a_resume_with_another_radius(finished_run, tmp_path):
    """Refused after the lock: the workdir is as it was, the lock's bytes and times too."""
    workdir = copy_of(finished_run, tmp_path)
    before = aged(workdir)
    result = run_cli(*cli_flags(workdir, num_epochs=4), "--resume", "--config.gam.rho=0.5")
    assert_one_line_error(result, "gam.rho: 0.2 in the checkpoint, 0.5 now")
    assert snapshot(workdir) == before
    stray = run_cli(*cli_flags(workdir), "extra")
    assert_one_line_error(stray, "error: unexpected arguments: extra;")
    assert snapshot(workdir) == before


def test_checksums_catch_a_changed_value_and_non_finite_values():
    state = {"params": {"w": np.arange(6.0, dtype=np.float32)}, "step": np.int32(3)}
    written = checkpoints.checksums(state)
    checkpoints.verify(state, written, pathlib.Path("ckpt/3"))
    changed = {"params": {"w": state["params"]["w"] + np.float32(1e-6)}, "step": np.int32(3)}
    with pytest.raises(ConfigError, match=r"1 of 2 arrays do not match .*first params/w"):
        checkpoints.verify(changed, written, pathlib.Path("ckpt/3"), older=[2])
    nan = {"params": {"w": np.full(6, np.nan, np.float32)}, "step": np.int32(3)}
    with pytest.raises(ConfigError, match=r"1 arrays hold NaN or infinity, first params/w"):
        checkpoints.verify(nan, checkpoints.checksums(nan), pathlib.Path("ckpt/3"))


# ----------------------------------------------------------------------------- one run


HOLD_LOCK = """
import pathlib, sys, time
from experiments import checkpoints
with checkpoints.locked(pathlib.Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_workdir_is_refused_until_the_first_dies(finished_run, tmp_path):
    workdir = copy_of(finished_run, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(workdir)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = aged(workdir)
        for flag in ("resume", "overwrite"):
            with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on"):
                train.train_and_evaluate(tiny_config(num_epochs=4), workdir, **{flag: True})
        assert snapshot(workdir) == before  # the holder's lock file too
        holder.send_signal(signal.SIGKILL)  # the OS releases its lock
        holder.wait()
        train.train_and_evaluate(tiny_config(num_epochs=4), workdir, resume=True)
        assert [r["epoch"] for r in strict_records(workdir)] == [1, 2, 3, 4]
    finally:
        holder.kill()
        holder.wait()


def _damage_the_latest(workdir: pathlib.Path) -> None:
    _truncate(workdir / "checkpoints" / "3")


# Each way train_and_evaluate (and so the command line) refuses a workdir that holds a run:
# config overrides (on num_epochs=4), its arguments, a change made first, the message.
REFUSALS = {
    "a run without --resume": ({}, {}, None, "already holds a run"),
    "--resume --overwrite": ({}, dict(resume=True, overwrite=True), None, "only one of them"),
    "--allow_changes alone": ({}, dict(allow_changes=["seed"]), None, "applies to --resume"),
    "a bad value": (dict(momentum=1.5), dict(resume=True), None, "config.momentum must be"),
    "a batch too large": (dict(batch_size=512), dict(resume=True), None, "batch size 512"),
    "another config": (dict(seed=3), dict(resume=True), None, "a different configuration"),
    "an unknown field": ({}, dict(resume=True, allow_changes=["sed"]), None, "names sed,"),
    "another state": (
        dict(optimizer="gam"),
        dict(resume=True, allow_changes=["optimizer"]),
        None,
        "need another state",
    ),
    "fewer epochs": (dict(num_epochs=2), dict(resume=True), None, "trained 3 epochs already"),
    "a damaged checkpoint": ({}, dict(resume=True), _damage_the_latest, "3 is damaged"),
}


@pytest.mark.parametrize("lock", ["kept", "absent"])
@pytest.mark.parametrize("refusal", sorted(REFUSALS))
def test_a_refused_command_leaves_the_workdir_exactly_as_it_was(
    finished_run, tmp_path, refusal, lock
):
    """Names, bytes and mtimes of every file and folder: a refusal after the lock used to
    rewrite .lock (or create it); the lock file is put back, or removed if it was absent."""
    overrides, kwargs, change, message = REFUSALS[refusal]
    workdir = copy_of(finished_run, tmp_path)
    if change:
        change(workdir)
    if lock == "absent":
        (workdir / checkpoints.LOCK_NAME).unlink()
    config = tiny_config(**{"num_epochs": 4, **overrides})
    before = aged(workdir)
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(config, workdir, **kwargs)
    assert snapshot(workdir) == before


def test_a_failed_start_leaves_no_workdir_behind(tmp_path):
    workdir = tmp_path / "new"
    with pytest.raises(ConfigError, match="batch size 512 exceeds"):  # found after the lock
        train.train_and_evaluate(tiny_config(batch_size=512), workdir)
    assert not workdir.exists()


def test_resume_rewrites_the_metrics_from_the_checkpoint(finished_run, tmp_path, caplog):
    """A crash or a second writer can leave duplicated, out-of-order or garbled lines; the
    checkpoint's own records replace them on resume, which says so in one line (it used to
    say nothing)."""
    workdir = copy_of(finished_run, tmp_path)
    good = strict_records(workdir)
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(good[0]) + "\n" + json.dumps(good[2]) + "\n{garbled\n")
    train.train_and_evaluate(tiny_config(num_epochs=4), workdir, resume=True)
    records = strict_records(workdir)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[:3] == good
    said = [r for r in caplog.records if "metrics.jsonl" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in said] == [
        (
            "WARNING",
            f"{workdir / 'metrics.jsonl'} was damaged (line 4 holds epoch 1 where an epoch "
            f"after 3 belongs); rebuilt it from the 3 records of checkpoint "
            f"{workdir / 'checkpoints' / '3'} (epochs 1-3).",
        )
    ]


def _edited(lines: list[str], number: int, **fields) -> list[str]:
    """``lines`` with line ``number`` (from 1) holding its record with ``fields`` changed."""
    record = {**json.loads(lines[number - 1]), **fields}
    return [*lines[: number - 1], json.dumps(record), *lines[number:]]


# How a metrics.jsonl of 3 epochs (lines ls) can differ from its checkpoint's 3 records:
# (damaged, the first difference), or None.
METRICS_MISMATCHES = {
    "intact": (lambda ls: ls, None),
    "garbled": (lambda ls: [*ls, "{garbled"], (True, "line 4 is not a metrics record: '{garbled'")),
    "blank line": (lambda ls: [ls[0], "", *ls[1:]], (True, "line 2 is not a metrics record: ''")),
    "out of order": (
        lambda ls: [ls[0], ls[2], ls[1]],
        (True, "line 2 holds epoch 3 where epoch 2's record belongs"),
    ),
    "repeated": (lambda ls: [*ls, ls[2]], (True, "line 4 holds epoch 3 where an epoch after 3")),
    "changed": (
        lambda ls: _edited(ls, 2, test_accuracy=2.0),
        (True, "line 2 differs from epoch 2's record"),
    ),
    "stopped before a checkpoint": (
        lambda ls: [*ls, *_edited(ls, 3, epoch=4)[2:], *_edited(ls, 3, epoch=5)[2:]],
        (False, "its last 2 line(s) hold later epochs, whose checkpoint was not finished"),
    ),
    "stopped before a record": (
        lambda ls: ls[:2],
        (False, "it ends before epoch 3's record: the run stopped between that checkpoint"),
    ),
}


@pytest.mark.parametrize("case", sorted(METRICS_MISMATCHES))
def test_a_metrics_file_is_compared_with_the_checkpoint_records_line_by_line(finished_run, case):
    """Against the records the checkpoint itself holds (read back by Orbax)."""
    workdir, _ = finished_run
    store = checkpoints.Checkpoints(workdir)
    try:
        records = store.meta(3)["records"]
    finally:
        store.close()
    change, expected = METRICS_MISMATCHES[case]
    lines = change((workdir / "metrics.jsonl").read_text().splitlines())
    found = checkpoints.metrics_mismatch(lines, records)
    if expected is None:
        assert found is None
    else:
        assert found[0] == expected[0] and found[1].startswith(expected[1]), found


def test_a_garbled_metrics_file_without_records_in_the_checkpoint_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\nNaN garbage\n')
    with pytest.raises(ConfigError, match=r"metrics.jsonl line 2 is not a metrics record"):
        checkpoints.read_metrics(path)
    assert checkpoints.strict_json({"loss": float("nan"), "epoch": 1}) == (
        '{"loss": null, "epoch": 1}'
    )


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(log_every_steps=0), "config.log_every_steps must be a positive integer"),
        (dict(num_test_examples=0), "config.num_test_examples must be an integer >= 1"),
        (dict(num_train_examples=-5), "config.num_train_examples must be an integer >= 1"),
        (dict(keep_checkpoints=0), "config.keep_checkpoints must be an integer >= 1"),
        (dict(steps_per_epoch=0), "config.steps_per_epoch must be an integer >= 1"),
        (dict(label_smoothing=1.0), r"config.label_smoothing must be a number in \[0, 1\)"),
        (dict(label_smoothing=-0.1), r"config.label_smoothing must be a number in \[0, 1\)"),
        (dict(learning_rate=-0.1), "config.learning_rate must be a number >= 0"),
        (dict(learning_rate=float("nan")), "config.learning_rate must be a number >= 0"),
        (dict(momentum=1.5), r"config.momentum must be a number in \[0, 1\)"),
        (dict(weight_decay=-1e-4), "config.weight_decay must be a number >= 0"),
        (dict(skip_nonfinite_steps=-1), "config.skip_nonfinite_steps must be an integer >= 0"),
        (dict(dtype="float16"), "unknown dtype 'float16'; valid: float32, bfloat16, float64"),
        (dict(dtype="float64"), "needs 64-bit JAX: set JAX_ENABLE_X64=1"),
        (dict(optimizer="gam", gam=dict(rho=-1.0)), "config.gam: gam: rho must be"),
        (dict(optimizer="sam", sam=dict(rho=-0.05)), "config.sam: sam: rho must be"),
        (dict(optimizer="gsam", gsam=dict(rho=0.05, alpha=float("inf"))), "config.gsam: gsam"),
    ],
)
def test_bad_config_values_fail_with_one_message_and_write_nothing(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(tiny_config(**overrides), workdir)
    assert not workdir.exists()


def test_file_system_problems_are_one_line_on_the_command_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert_one_line_error(run_cli(*cli_flags(a_file)), f"--workdir {a_file} is a file")
    assert_one_line_error(
        run_cli(*cli_flags(a_file / "run")), f"cannot use {a_file / 'run'} as the workdir"
    )
    missing = tmp_path / "missing.py"
    result = run_cli(f"--config={missing}", f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(result, f"the --config file {missing} does not exist")
    broken = tmp_path / "broken.py"
    broken.write_text(textwrap.dedent("def get_config(:\n    pass\n"))
    result = run_cli(f"--config={broken}", f"--workdir={tmp_path / 'w'}")
    assert_one_line_error(result, "the --config file failed to load (SyntaxError")
    assert a_file.read_text() == "not a directory" and not (tmp_path / "w").exists()


def test_the_main_job_names_flags_it_has(tmp_path, capsys):
    (tmp_path / "sgd").mkdir()
    (tmp_path / "sgd" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as error:
        main_job.main(["--workdir", str(tmp_path), "--epochs", "1"])
    message = str(error.value)
    assert "already holds a run" in message
    with pytest.raises(SystemExit):
        main_job.main(["--help"])
    usage = capsys.readouterr().out
    for flag in ("--resume", "--overwrite", "--workdir"):
        assert flag in message and flag in usage
