"""A run's workdir: one run at a time, checkpoints that are verified when read back.

``workdir/`` holds ``metrics.jsonl`` (one JSON record per epoch), ``checkpoints/<epoch>/``
(Orbax: the training state and a JSON ``meta`` item) and ``.lock``. The guarantees:

- **One run per workdir.** :func:`locked` holds an exclusive ``flock`` on ``.lock`` for the
  whole run; a second run is refused at once with the holder's pid, host and start time. The
  operating system releases the lock when the holder dies, even by SIGKILL, so a killed run
  always resumes. A refused command leaves the workdir as it was, ``.lock`` included.
- **No damaged state is used.** Once Orbax has finished writing a checkpoint,
  ``checkpoints/<epoch>/files.json`` records the size and CRC-32 of each of its files;
  :meth:`Checkpoints.meta` checks them *before* Orbax reads anything (a truncated or
  flipped file is reported without a failed TensorStore read, whose unfinished reads would
  print tracebacks long after the error). Each checkpoint's ``meta`` also holds a CRC-32 of
  every array of the state; :meth:`Checkpoints.restore` recomputes them and checks that
  every value is finite before anything in the workdir changes. A non-finite state is
  never written.
- **The metrics follow the checkpoint.** ``meta`` also holds every epoch's record up to that
  checkpoint; a resume rewrites ``metrics.jsonl`` from it (atomically) where the file holds
  anything else, and logs the first line that differed, so an interrupted or crashed run
  never leaves duplicated or out-of-order epochs behind.
- **A resume computes what the run computed.** :func:`check_resumable` refuses a config that
  differs from the checkpoint's in any field that changes the computation, unless named in
  ``allow_changes``.

The trainer reaches all of it through :func:`claimed` (the lock, held by process 0 for the
whole job) and :func:`opened` (the fresh or resumed start); :func:`restore_checkpoint` reads a
finished run's state.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import math
import os
import pathlib
import shutil
import socket
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from experiments import ConfigError, parallel
from experiments.configs import default as default_config

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"
CHECKPOINTS_NAME = "checkpoints"
FILES_NAME = "files.json"  # checkpoints/<epoch>/files.json: {path: [size, crc32]}
ITEMS = ("state", "meta")  # the Orbax items of a checkpoint, folders of checkpoints/<epoch>/


# ---------------------------------------------------------------------------
# The workdir lock.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def locked(workdir: pathlib.Path) -> Iterator[None]:
    """Holds the workdir's lock for the duration of the block.

    Creates ``workdir`` if needed. If the block fails (a refused resume, a bad config found
    after the lock), ``.lock`` is left as it was found: its bytes and times restored, or
    removed if this call created it, and so is a workdir created here that holds nothing
    else; a refused command leaves the workdir exactly as it was.
    """
    created = not workdir.exists()
    handle, before = _acquire(workdir)
    try:
        handle.seek(0)
        handle.truncate()
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode())
        handle.flush()
        yield
    except BaseException:
        _put_back(workdir, handle, before, created)
        raise
    finally:
        handle.close()  # releases the lock


class _Found(NamedTuple):
    """What :func:`locked` found: the lock file's bytes and (atime, mtime) in nanoseconds
    (None for both when it created the lock file), and the workdir's times and entries."""

    content: bytes | None
    times: tuple[int, int] | None
    workdir: tuple[tuple[int, int], frozenset[str]]


def _acquire(workdir: pathlib.Path) -> tuple[Any, _Found]:
    """The open lock file, locked, and what it held before. A lock file that is no longer
    ``workdir/.lock`` once locked (removed by the failed run that held it) is tried again."""
    path = workdir / LOCK_NAME
    while True:
        handle, fresh, found_workdir = _open_lock(workdir)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = path.read_text().strip() if path.exists() else ""
            raise ConfigError(
                f"workdir {workdir} is in use by another run ({holder or 'another process'}); "
                f"nothing was changed. Wait for it to finish, or choose another --workdir."
            ) from None
        if _same_file(handle, path):
            if fresh:
                return handle, _Found(None, None, found_workdir)
            stat = os.fstat(handle.fileno())
            times = (stat.st_atime_ns, stat.st_mtime_ns)
            return handle, _Found(handle.read(), times, found_workdir)
        handle.close()


def _open_lock(workdir: pathlib.Path) -> tuple[Any, bool, Any]:
    """``(binary file, created here, (the workdir's times, its entries) before)`` of
    ``workdir/.lock``."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        stat, entries = workdir.stat(), frozenset(os.listdir(workdir))
        try:
            fd, fresh = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            fd, fresh = os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT), False
    except OSError as e:
        raise ConfigError(
            f"cannot use {workdir} as the workdir ({e.strerror or e}); choose a writable "
            f"directory with --workdir."
        ) from None
    return open(fd, "rb+"), fresh, ((stat.st_atime_ns, stat.st_mtime_ns), entries)


def _same_file(handle: Any, path: pathlib.Path) -> bool:
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _put_back(workdir: pathlib.Path, handle: Any, found: _Found, created: bool) -> None:
    """Leaves ``.lock`` (still locked) as :func:`_acquire` found it, and removes a workdir
    created by :func:`locked` that holds nothing else."""
    path = workdir / LOCK_NAME
    with contextlib.suppress(OSError):  # the block's error is the one to report
        if found.content is None:
            path.unlink()
            times, entries = found.workdir
            if created and not os.listdir(workdir):
                workdir.rmdir()
            elif frozenset(os.listdir(workdir)) == entries:  # only the lock file came and went
                os.utime(workdir, ns=times)
            return
        handle.seek(0)
        handle.truncate()
        handle.write(found.content)
        handle.flush()
        os.utime(path, ns=found.times)


# ---------------------------------------------------------------------------
# A run's identity: its whole config.
# ---------------------------------------------------------------------------

# The config fields that do not change what a run computes, so a resume may change them:
# num_epochs extends (or shortens) the run; parallel and param_sharding lay the same step out
# on other devices (a checkpoint resumes on any number of devices and processes, replicated
# or sharded); the rest are bookkeeping and evaluation batching.
MAY_CHANGE_ON_RESUME = frozenset(
    {
        "num_epochs",
        "parallel",
        "param_sharding",
        "eval_batch_size",
        "log_every_steps",
        "keep_checkpoints",
        "progress_bar",
        "data_dir",
    }
)


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"gam.rho": 0.2, ...}``: a (JSON) config's leaves by dotted field name."""
    leaves: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            leaves.update(flat_config(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def changed_fields(
    written: Mapping[str, Any],
    wanted: Mapping[str, Any],
    *,
    may_change: frozenset[str] = frozenset(),
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """``{field: (written value, wanted value)}`` for every leaf of two JSON configs that
    differs, but those in ``may_change``. A field missing from ``written`` (a run from before
    the field existed) counts as its value in ``defaults``."""
    old, new, default = flat_config(written), flat_config(wanted), flat_config(defaults or {})
    return {
        key: (old.get(key, default.get(key)), new.get(key))
        for key in sorted(old.keys() | new.keys())
        if key not in may_change and old.get(key, default.get(key)) != new.get(key)
    }


# ---------------------------------------------------------------------------
# Integrity: per-array checksums and finiteness.
# ---------------------------------------------------------------------------


def _name(path) -> str:
    """``'params/Conv_0/kernel'``: the same for the state and for its raw restored dict."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def checksums(state: Any) -> dict[str, int]:
    """The CRC-32 of every array of ``state`` (its bytes on the host), by tree path."""
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
    return {_name(path): zlib.crc32(np.ascontiguousarray(leaf).tobytes()) for path, leaf in leaves}


def non_finite_paths(tree: Any) -> list[str]:
    """Tree paths of the floating-point arrays of ``tree`` that hold a NaN or an infinity."""
    leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(tree))
    return [
        _name(path)
        for path, leaf in leaves
        if np.issubdtype(np.asarray(leaf).dtype, np.inexact) and not np.all(np.isfinite(leaf))
    ]


def strict_json(record: dict[str, Any]) -> str:
    """One JSON line; a non-finite number becomes ``null`` (JSON has no NaN)."""
    clean = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }
    return json.dumps(clean, allow_nan=False)


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a damaged file is a ``ConfigError``."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            int(record["epoch"])
        except (ValueError, TypeError, KeyError):
            raise ConfigError(
                f"{path} line {number} is not a metrics record ({line[:60]!r}); the file is "
                f"damaged. Nothing was changed: repair or delete that line, or pass --overwrite "
                f"to start over."
            ) from None
        records.append(record)
    return records


def write_metrics(path: pathlib.Path, records: Sequence[dict[str, Any]]) -> None:
    """Replaces ``metrics.jsonl`` atomically (a kill leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(strict_json(r) + "\n" for r in records))
    os.replace(tmp, path)


def metrics_mismatch(
    lines: Sequence[str], records: Sequence[dict[str, Any]]
) -> tuple[bool, str] | None:
    """How the ``lines`` of a ``metrics.jsonl`` differ from ``records`` (a checkpoint's):
    None where they hold exactly those records, else ``(damaged, the first difference)``.
    Not damage: records of later epochs in order (the run stopped before their checkpoint
    was finished), or the last records missing (it stopped before writing them)."""
    expected = [json.loads(strict_json(r)) for r in records]
    previous = expected[-1]["epoch"] if expected else 0
    for number, line in enumerate(lines, 1):
        found = _record(line)
        want = expected[number - 1] if number <= len(expected) else None
        if found is None:
            return True, f"line {number} is not a metrics record: {line[:60]!r}"
        if want is None and found["epoch"] > previous:
            previous = found["epoch"]
        elif want is None or found["epoch"] != want["epoch"]:
            belongs = f"epoch {want['epoch']}'s record" if want else f"an epoch after {previous}"
            return True, f"line {number} holds epoch {found['epoch']} where {belongs} belongs"
        elif found != want:
            return True, f"line {number} differs from epoch {found['epoch']}'s record"
    if len(lines) > len(expected):
        return False, (
            f"its last {len(lines) - len(expected)} line(s) hold later epochs, whose checkpoint "
            f"was not finished when the run stopped: they are trained again"
        )
    if len(lines) < len(expected):
        return False, (
            f"it ends before epoch {expected[len(lines)]['epoch']}'s record: the run stopped "
            f"between that checkpoint and its record"
        )
    return None


def _record(line: str) -> dict[str, Any] | None:
    """The metrics record of a line of ``metrics.jsonl``, or None."""
    try:
        record = json.loads(line)
        record["epoch"] = int(record["epoch"])
    except (ValueError, TypeError, KeyError):
        return None
    return record


def match_metrics(
    path: pathlib.Path, records: Sequence[dict[str, Any]], where: pathlib.Path | None
) -> None:
    """Makes ``metrics.jsonl`` hold ``records``, those of the checkpoint ``where`` (none
    without one), and logs one line naming the first difference if it held anything else."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    mismatch = metrics_mismatch(lines, records)
    if mismatch:
        damaged, why = mismatch
        source = (
            f"the {len(records)} records of checkpoint {where} (epochs "
            f"{records[0]['epoch']}-{records[-1]['epoch']})"
            if records
            else "no record: no checkpoint was finished, the run starts from epoch 1"
        )
        state = "was damaged" if damaged else "did not match the checkpoint"
        log = logging.warning if damaged else logging.info
        log("%s %s (%s); rebuilt it from %s.", path, state, why, source)
    if mismatch or not path.exists():
        write_metrics(path, records)


def append_metrics(path: pathlib.Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(strict_json(record) + "\n")


# ---------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------


def checkpoint_epochs(workdir: pathlib.Path) -> list[int]:
    """The epochs of the finished checkpoints in ``workdir`` (Orbax's temporary folders of an
    interrupted save are not numbers and are ignored)."""
    directory = workdir / CHECKPOINTS_NAME
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def holds_a_run(workdir: pathlib.Path) -> bool:
    return bool(checkpoint_epochs(workdir)) or (workdir / METRICS_NAME).exists()


def check_workdir(
    workdir: pathlib.Path, resume: bool, overwrite: bool, allow_changes: Sequence[str] = ()
) -> None:
    """Refuses to start a fresh run over an old one, unless told to resume or overwrite."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir} is a file, not a directory; choose another.")
    if resume and overwrite:
        raise ConfigError(
            "--resume continues the run in the workdir, --overwrite deletes it: "
            "pass only one of them."
        )
    if allow_changes and not resume:
        raise ConfigError(
            f"--allow_changes={','.join(allow_changes)} applies to --resume only (the fields "
            f"that may differ from the checkpoint's); add --resume to continue the run in "
            f"--workdir, or drop --allow_changes for a fresh run."
        )
    if resume or overwrite or not holds_a_run(workdir):
        return
    epochs = checkpoint_epochs(workdir)
    held = f"checkpoints of epochs {epochs}" if epochs else f"a {METRICS_NAME}"
    raise ConfigError(
        f"workdir {workdir} already holds a run ({held}); nothing was changed. Pass --resume "
        f"to continue it, --overwrite to delete it and start over, or choose another --workdir."
    )


def _file_crc32(path: pathlib.Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_manifest(checkpoint: pathlib.Path) -> dict[str, list[int]]:
    """``{relative path: [size, CRC-32]}`` of every file of the items of ``checkpoint``."""
    found = sorted(p for item in ITEMS for p in (checkpoint / item).rglob("*") if p.is_file())
    return {str(p.relative_to(checkpoint)): [p.stat().st_size, _file_crc32(p)] for p in found}


def write_file_manifest(checkpoint: pathlib.Path) -> None:
    """Writes ``checkpoint/files.json`` atomically (a kill leaves none or all of it)."""
    tmp = checkpoint / (FILES_NAME + ".tmp")
    tmp.write_text(json.dumps(file_manifest(checkpoint), sort_keys=True))
    os.replace(tmp, checkpoint / FILES_NAME)


def damaged_files(checkpoint: pathlib.Path) -> str | None:
    """What is wrong with the files of ``checkpoint`` against its ``files.json``, or None.

    A checkpoint without ``files.json`` (written before it existed, or killed between Orbax's
    commit and the manifest) is not judged here: its arrays' checksums still are, after the
    read.
    """
    listed = checkpoint / FILES_NAME
    if not listed.exists():
        return None
    try:
        expected = json.loads(listed.read_text())
        expected = {str(k): [int(v[0]), int(v[1])] for k, v in expected.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"its {FILES_NAME} cannot be read"
    for name, (size, crc) in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if _file_crc32(path) != crc:
            return f"{name} does not match the checksum written with it"
    extra = sorted(set(file_manifest(checkpoint)) - set(expected))
    return f"{extra[0]} was not written with it" if extra else None


def _damaged(where: pathlib.Path, what: str, older: Sequence[int]) -> ConfigError:
    fallback = (
        f"move it away (e.g. `mv {where} {where}.damaged`) to resume from epoch {older[-1]}"
        if older
        else "there is no older checkpoint to resume from"
    )
    return ConfigError(
        f"checkpoint {where} is damaged ({what}). Nothing was changed: {fallback}, or pass "
        f"--overwrite instead of --resume to start over."
    )


class Checkpoints:
    """The checkpoints of one workdir: save (with checksums), read the metadata, restore
    (verified). Every process of a multi-process job takes part in ``save`` and ``restore``;
    the replicated state is written once."""

    def __init__(self, workdir: pathlib.Path, keep: int | None = None):
        self.workdir = workdir
        self.directory = workdir / CHECKPOINTS_NAME
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=keep is not None)
        handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(
            self.directory, item_handlers=handlers, options=options
        )
        self._unlisted: list[int] = []  # saved; files.json written once Orbax has finished
        self._checked: set[int] = set()  # files checked against files.json

    def epochs(self) -> list[int]:
        return checkpoint_epochs(self.workdir)

    def finish(self) -> None:
        """Waits for the pending save, then lists the files of the finished checkpoints."""
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for epoch in self._unlisted:
                if (self.directory / str(epoch)).is_dir():  # not rotated out
                    write_file_manifest(self.directory / str(epoch))
        self._unlisted = []

    def save(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
        """Writes ``state`` (replicated) and ``meta`` plus the state's checksums as ``epoch``."""
        bad = non_finite_paths(state)
        if bad:  # the training loop stops before this; a last line of defence
            raise ValueError(f"refusing to checkpoint a non-finite state (at {bad[0]}).")
        meta = {**meta, "epoch": epoch, "checksums": checksums(state)}
        self.finish()  # the previous save, which was written while this epoch trained
        self._unlisted.append(epoch)
        self.manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
        )

    def meta(self, epoch: int) -> dict[str, Any]:
        """The JSON metadata written with ``epoch``, once its files are checked against its
        ``files.json``: nothing is read from a damaged checkpoint."""
        where = self.directory / str(epoch)
        self._check_files(epoch)
        try:
            args = ocp.args.Composite(meta=ocp.args.JsonRestore())
            meta = self.manager.restore(epoch, args=args)["meta"]
            int(meta["epoch"]), dict(meta["config"])
        except Exception as e:
            raise _damaged(
                where, f"its metadata cannot be read: {type(e).__name__}", self._older(epoch)
            ) from None
        return meta

    def restore(self, epoch: int, like: Any, meta: dict[str, Any]) -> Any:
        """The state of ``epoch``, with the structure and shardings of ``like``, verified
        against the checksums of ``meta`` and checked to be finite."""
        where = self.directory / str(epoch)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        self._check_files(epoch)
        try:
            with _quiet_tensorstore():
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
                state = self.manager.restore(epoch, args=args)["state"]
        except Exception as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0].split(" See full")[0]
            raise _damaged(
                where,
                f"its state cannot be read or does not fit this model and optimizer: {reason}",
                self._older(epoch),
            ) from None
        verify(state, meta.get("checksums"), where, self._older(epoch))
        return state

    def read(self, epoch: int) -> Any:
        """The state of ``epoch`` as written (a dict of arrays on this process's first
        device), whatever model and devices wrote it; checked as :meth:`restore` checks."""
        meta = self.meta(epoch)
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        written = self._written_state(epoch)
        like = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), written
        )
        return self.restore(epoch, like, meta)

    def layout(self, epoch: int) -> dict[str, tuple[int, ...]]:
        """``{array name: shape}`` of the state written as ``epoch`` (from its metadata)."""
        self._check_files(epoch)
        return layout(self._written_state(epoch))

    def _written_state(self, epoch: int) -> Any:
        """The metadata of the state written as ``epoch``; unreadable: damaged."""
        try:
            return self.manager.item_metadata(epoch)["state"]
        except Exception as e:
            raise _damaged(
                self.directory / str(epoch),
                f"its state's metadata cannot be read: {type(e).__name__}",
                self._older(epoch),
            ) from None

    def _check_files(self, epoch: int) -> None:
        """Checks the files of ``epoch`` against its ``files.json``, once."""
        if epoch not in self._checked:
            wrong = damaged_files(self.directory / str(epoch))
            if wrong:
                raise _damaged(self.directory / str(epoch), wrong, self._older(epoch))
            self._checked.add(epoch)

    def _older(self, epoch: int) -> list[int]:
        return [e for e in self.epochs() if e < epoch]

    def close(self) -> None:
        self.finish()
        self.manager.close()


def layout(state: Any) -> dict[str, tuple[int, ...]]:
    """``{array name: shape}``: the same names for a state and for its written metadata."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {_name(path): tuple(leaf.shape) for path, leaf in leaves}


def verify(
    state: Any, expected: dict[str, int] | None, where: pathlib.Path, older: Sequence[int] = ()
) -> None:
    """Raises ``ConfigError`` if ``state`` does not match its checksums or is not finite.

    Checkpoints written before checksums existed (``expected`` is None) are checked for
    finiteness only.
    """
    if expected is not None:
        actual = checksums(state)
        wrong = sorted(
            k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k)
        )
        if wrong:
            raise _damaged(
                where,
                f"{len(wrong)} of {len(expected)} arrays do not match the checksums written "
                f"with it, first {wrong[0]}",
                older,
            )
    bad = non_finite_paths(state)
    if bad:
        raise _damaged(where, f"{len(bad)} arrays hold NaN or infinity, first {bad[0]}", older)


@contextlib.contextmanager
def _quiet_tensorstore() -> Iterator[None]:
    """Silences absl's ERROR lines of a failing read (TensorStore's multi-line reports); the
    caller turns the exception into one line."""
    level = logging.get_verbosity()
    logging.set_verbosity(logging.FATAL)
    try:
        yield
    finally:
        logging.set_verbosity(level)


# ---------------------------------------------------------------------------
# A run's start: the lock, the resume (verified) or a cleared workdir.
# ---------------------------------------------------------------------------


def describe_changes(differ: Mapping[str, tuple[Any, Any]], old: str, new: str) -> str:
    """``'gam.rho: 0.1 OLD, 0.2 NEW; ...'``: the fields of :func:`changed_fields`."""
    return "; ".join(f"{k}: {a!r} {old}, {b!r} {new}" for k, (a, b) in differ.items())


def _config_changes(meta: dict[str, Any], config: Any, may_change: frozenset[str]) -> dict:
    """:func:`changed_fields` of the checkpoint's config and ``config``."""
    return changed_fields(
        meta["config"],
        json.loads(config.to_json_best_effort()),
        may_change=may_change,
        defaults=json.loads(default_config.get_config().to_json_best_effort()),
    )


def check_fits(
    written: Mapping[str, tuple[int, ...]], fresh: Any, meta: dict[str, Any], config: Any, where
) -> None:
    """Refuses to continue a checkpoint whose state (``written``, its :func:`layout`) does
    not fit the one ``config`` builds (``fresh``): another model, or another optimizer's
    state. The checkpoint is intact; the message names the config fields that differ."""
    wanted = layout(fresh)
    if dict(written) == wanted:
        return
    missing = sorted(wanted.keys() - written.keys())
    extra = sorted(written.keys() - wanted.keys())
    shaped = sorted(k for k in wanted.keys() & written.keys() if wanted[k] != written[k])
    what = (
        f"{missing[0]} is not in the checkpoint"
        if missing
        else f"{extra[0]} is in the checkpoint only"
        if extra
        else f"{shaped[0]} has shape {written[shaped[0]]} there, {wanted[shaped[0]]} now"
    )
    differ = _config_changes(meta, config, MAY_CHANGE_ON_RESUME)
    fields = describe_changes(differ, "in the checkpoint", "now") or "no config field differs"
    raise ConfigError(
        f"cannot resume {where}: the model and optimizer configured now need another state "
        f"than the checkpoint holds ({what}; {fields}), so no --allow_changes can continue "
        f"it. The checkpoint is intact and nothing was changed: resume with the checkpoint's "
        f"{', '.join(differ) or 'code'} to continue that run, or train this configuration in "
        f"another --workdir (or pass --overwrite instead of --resume to replace the run)."
    )


def check_resumable(
    meta: dict[str, Any], config: Any, where: pathlib.Path, allow_changes: Sequence[str] = ()
) -> None:
    """Refuses to continue a checkpoint written with a config that computes something else:
    any field but ``MAY_CHANGE_ON_RESUME`` (``num_epochs``, bookkeeping) and the fields the
    caller deliberately changes (``allow_changes``); and a ``num_epochs`` below the epochs
    the checkpoint has done."""
    fields = flat_config(json.loads(config.to_json_best_effort()))
    unknown = sorted(set(allow_changes) - set(fields))
    if unknown:
        raise ConfigError(
            f"--allow_changes names {', '.join(unknown)}, which the config does not have; "
            f"name config fields as in --config.FIELD (e.g. learning_rate, gam.rho)."
        )
    differ = _config_changes(meta, config, MAY_CHANGE_ON_RESUME | set(allow_changes))
    if differ:
        raise ConfigError(
            f"cannot resume {where}: it was written with a different configuration "
            f"({describe_changes(differ, 'in the checkpoint', 'now')}). Nothing was changed: "
            f"resume with the checkpoint's settings (only "
            f"{', '.join(sorted(MAY_CHANGE_ON_RESUME))} may change), pass "
            f"--allow_changes={','.join(differ)} to change them deliberately from here on, "
            f"choose another --workdir, or pass --overwrite instead of --resume to start over."
        )
    done = int(meta["epoch"])
    if config.num_epochs < done:
        raise ConfigError(
            f"cannot resume {where} for num_epochs={config.num_epochs}: it has trained {done} "
            f"epochs already. Nothing was changed: pass --config.num_epochs={done} (its "
            f"result) or more to continue it, or --overwrite instead of --resume to train "
            f"{config.num_epochs} epoch{'s' * (config.num_epochs != 1)} from the start."
        )


@contextlib.contextmanager
def claimed(
    workdir: pathlib.Path, resume: bool, overwrite: bool, allow_changes: Sequence[str] = ()
) -> Iterator[None]:
    """The workdir, checked (:func:`check_workdir`) and locked by process 0 for the whole
    job (:func:`locked`), then checked again now that no other run can change it."""
    check_workdir(workdir, resume, overwrite, allow_changes)
    with contextlib.ExitStack() as stack:
        error = None
        if parallel.is_main_process():
            try:
                stack.enter_context(locked(workdir))
            except ConfigError as e:
                error = e
        if not parallel.main_process_says(error is None):
            raise error or ConfigError(f"process 0 could not lock {workdir}: see its error.")
        check_workdir(workdir, resume, overwrite)
        yield


@contextlib.contextmanager
def opened(
    workdir: pathlib.Path,
    config: Any,
    fresh: Any,
    resume: bool,
    overwrite: bool,
    allow_changes: Sequence[str] = (),
) -> Iterator[tuple[Checkpoints, int, Any, list[dict[str, Any]]]]:
    """``(store, epoch, state, records)`` to train on from: with ``resume``, the latest
    checkpoint's epoch, its verified state (laid out like ``fresh``) and its records, else 0,
    ``fresh`` and none in a cleared workdir; ``metrics.jsonl`` made to match. The store
    closes on exit, after the last save is written, even after an error."""
    metrics_path = workdir / METRICS_NAME
    epochs = checkpoint_epochs(workdir) if resume else []
    if not epochs:
        parallel.sync("checked workdir")
        if overwrite and parallel.is_main_process():
            shutil.rmtree(workdir / CHECKPOINTS_NAME, ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
        parallel.sync("cleared workdir")
    store = Checkpoints(workdir, config.keep_checkpoints)
    try:
        epoch, state, records, where = 0, fresh, [], None
        if epochs:
            epoch, meta = epochs[-1], store.meta(epochs[-1])
            where = store.directory / str(epoch)
            check_fits(store.layout(epoch), fresh, meta, config, where)
            check_resumable(meta, config, where, allow_changes)
            state = store.restore(epoch, fresh, meta)
            records = meta.get("records") or [  # checkpoints from before records were kept
                r for r in read_metrics(metrics_path) if r["epoch"] <= epoch
            ]
            logging.info("Resumed %s from epoch %d.", workdir, epoch)
        parallel.sync("read metrics")
        if parallel.is_main_process():
            match_metrics(metrics_path, records, where)
        yield store, epoch, state, records
    finally:
        store.close()


def restore_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> dict[str, Any]:
    """The raw training state (a dict of arrays) of the checkpoint of epoch ``step`` (latest),
    on this process's first device, whatever devices and processes wrote it; verified
    against its checksums."""
    workdir = pathlib.Path(workdir).absolute()
    step = max(checkpoint_epochs(workdir), default=None) if step is None else step
    if step is None:
        raise ConfigError(f"no checkpoint in {workdir}.")
    store = Checkpoints(workdir)
    try:
        return store.read(step)
    finally:
        store.close()


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments.train", "the trainer's workdir and checkpoints")
