"""Data-parallel training over every device of every process, on JAX's own runtime.

One step function (``step.train_step``) runs in one of three ways, ``config.parallel``:

- ``'none'``: one device.
- ``'jit'``: ``jax.jit`` over a 1-D mesh of all devices (axis ``'batch'``): the batch is
  sharded by ``NamedSharding(mesh, P('batch'))``, the state replicated, and XLA inserts the
  all-reduces. The modern path; it scales from one host to a pod unchanged.
- ``'pmap'``: ``jax.pmap`` over axis ``'batch'``, with Linen BatchNorm's ``axis_name`` and
  the ``axis_name`` of the ``gam_optax`` transformations.

``config.average`` says what the devices share:

- ``'gradients'``: every gradient (``g0`` and GAM's extra ones) and BatchNorm's batch
  statistics are averaged over devices, so the step is the one-device step on the global
  batch (up to float rounding). Under ``'jit'`` this is the one-device program itself.
- ``'direction'``: each device perturbs with its own shard (its own gradients and BatchNorm
  statistics) and only the final direction and the running statistics are averaged: the
  per-device ("m-sharpness") scheme of SAM's distributed code, with m the per-device batch.
  Under ``'jit'`` the step runs per device inside ``jax.shard_map``.

``config.param_sharding`` says where the state lives under ``'jit'`` with ``'gradients'``:

- ``'replicated'``: a full copy on each device.
- ``'fsdp'``: each leaf of the parameters, the optimizer state and the BatchNorm statistics
  with at least :data:`FSDP_MIN_SIZE` elements is split over the devices along its largest
  axis that they divide (fully sharded data parallelism); XLA gathers the parameters where
  the step needs them. Checkpoints and evaluation take the state whole, so a run resumes
  under either layout.

Several processes (GPU hosts, TPU VMs) join with :func:`initialize` before anything else
touches JAX; each process then reads its own rows of each global batch and feeds them with
``jax.make_array_from_process_local_data`` (``'jit'``) or to its local devices (``'pmap'``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from experiments import ConfigError

AXIS = "batch"
MODES = ("none", "jit", "pmap")
AVERAGES = ("gradients", "direction")
PARAM_SHARDINGS = ("replicated", "fsdp")
FSDP_MIN_SIZE = 1024  # leaves with fewer elements stay replicated under 'fsdp'
StepFn = Callable[[Any, Any, jax.Array], tuple[Any, Any]]


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to a multi-process job (``jax.distributed.initialize``).

    Call it first, in every process. Without arguments JAX finds them on Cloud TPU VMs,
    SLURM and Open MPI; elsewhere pass the address of process 0 (``host:port``), the number
    of processes and this one's index. CPU processes exchange data through gloo.
    """
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ConfigError(
            "pass all three of --coordinator_address, --num_processes and --process_id, or "
            "none of them (with --distributed, on Cloud TPU, SLURM or Open MPI)."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(
            f"could not join the multi-process job ({e}). Outside Cloud TPU, SLURM and Open "
            f"MPI pass --coordinator_address=HOST0:PORT --num_processes=N --process_id=I."
        ) from None


def sync(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (a no-op in one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def main_process_says(value: bool) -> bool:
    """Process 0's ``value``, in every process (``value`` itself in a single process)."""
    if jax.process_count() == 1:
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def is_main_process() -> bool:
    """True in the process that writes metrics and logs (process 0)."""
    return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Where the state and the batches live, and how a step is compiled: see the module doc."""

    mode: str
    average: str
    mesh: jax.sharding.Mesh | None
    param_sharding: str = "replicated"

    @classmethod
    def create(
        cls, mode: str = "none", average: str = "gradients", param_sharding: str = "replicated"
    ) -> DataParallel:
        """Checks the names; for 'jit' and 'pmap', a mesh of every device of every process."""
        if mode not in MODES:
            raise ConfigError(f"unknown parallel mode {mode!r}; valid: {', '.join(MODES)}.")
        if average not in AVERAGES:
            raise ConfigError(
                f"unknown average {average!r}; valid: 'gradients' (every gradient and "
                f"BatchNorm statistic averaged: the one-device step on the global batch) or "
                f"'direction' (per-device perturbations, only the final direction averaged)."
            )
        if param_sharding not in PARAM_SHARDINGS:
            raise ConfigError(
                f"unknown param sharding {param_sharding!r}; valid: 'replicated' (a copy on "
                f"each device) or 'fsdp' (large leaves split over the devices)."
            )
        if param_sharding == "fsdp" and (mode, average) != ("jit", "gradients"):
            raise ConfigError(
                f"param_sharding='fsdp' needs parallel='jit' and average='gradients' (the "
                f"compiler gathers the shards), got parallel={mode!r}, average={average!r}."
            )
        if mode == "none" and jax.process_count() > 1:
            raise ConfigError(
                f"parallel='none' trains on one device, but {jax.process_count()} processes "
                f"joined this job; set config.parallel to 'jit' or 'pmap'."
            )
        mesh = None
        if mode != "none":
            axis_types = (jax.sharding.AxisType.Auto,)  # GSPMD: XLA places the collectives
            mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=axis_types)
        return cls(mode, average, mesh, param_sharding)

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def axis_name(self) -> str | None:
        """The device axis of the step's own collectives; None where XLA partitions it."""
        per_device = self.mode == "pmap" or (self.mode == "jit" and self.average == "direction")
        return AXIS if per_device else None

    @property
    def batch_norm_axis(self) -> str | None:
        """The axis BatchNorm averages its batch statistics over (synchronised BatchNorm)."""
        return self.axis_name if self.average == "gradients" else None

    @property
    def replicated(self) -> jax.sharding.Sharding:
        """The sharding of the training state and of checkpoints: a full copy on each device."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return NamedSharding(self.mesh, PartitionSpec())

    def state_sharding(self, state: Any) -> Any:
        """The sharding of each leaf of the step's ``state`` (arrays or shapes): replicated,
        or under 'fsdp' split along the largest axis the devices divide."""
        if self.param_sharding == "replicated" or self.mesh is None:
            return jax.tree.map(lambda _: self.replicated, state)
        return jax.tree.map(lambda x: NamedSharding(self.mesh, self._fsdp_spec(x.shape)), state)

    def _fsdp_spec(self, shape: tuple[int, ...]) -> PartitionSpec:
        n = self.mesh.size
        splittable = [i for i, d in enumerate(shape) if d % n == 0]
        if not splittable or int(np.prod(shape)) < FSDP_MIN_SIZE:
            return PartitionSpec()
        axis = max(splittable, key=lambda i: shape[i])
        return PartitionSpec(*(AXIS if i == axis else None for i in range(len(shape))))

    def process_rows(self, batch_size: int) -> slice:
        """This process's rows of a global batch of ``batch_size``."""
        rows = batch_size // jax.process_count()
        return slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)

    def put_batch(self, local_batch: dict[str, np.ndarray]) -> Any:
        """This process's rows of a global batch (host arrays), placed for the step."""
        if self.mode == "none":
            return jax.device_put(local_batch)
        if self.mode == "pmap":  # (local devices, per-device batch, ...); pmap moves it
            n = jax.local_device_count()
            return jax.tree.map(lambda x: x.reshape(n, -1, *x.shape[1:]), local_batch)
        sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch
        )

    def put_global(self, tree: Any, spec: PartitionSpec | None = None) -> Any:
        """Host arrays that every process holds whole, on the mesh with ``spec`` (default:
        replicated)."""
        if self.mesh is None:
            return jax.device_put(tree)
        sharding = NamedSharding(self.mesh, spec or PartitionSpec())
        return jax.tree.map(
            lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: x[i]), tree
        )

    def to_global(self, state: Any) -> Any:
        """The step's state as replicated arrays (the form of checkpoints and evaluation)."""
        if self.param_sharding == "fsdp":
            return jax.device_put(state, self.replicated)
        if self.mode != "pmap":
            return state
        first_copy = lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:])
        return self.put_global(jax.tree.map(first_copy, state))

    def from_global(self, state: Any) -> Any:
        """Replicated state in the form the step takes (a copy per local device for pmap,
        split for 'fsdp')."""
        if self.param_sharding == "fsdp":
            return jax.device_put(state, self.state_sharding(state))
        if self.mode != "pmap":
            return state
        n = jax.local_device_count()
        host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
        stacked = jax.tree.map(lambda x: np.broadcast_to(x, (n, *x.shape)), host)
        return jax.pmap(lambda x: x, axis_name=AXIS)(stacked)

    def compile_step(self, step_fn: StepFn, donate: bool = True, state: Any = None) -> StepFn:
        """``step_fn(state, batch, rng)`` compiled for this mode, donating the state (placed
        as :meth:`state_sharding` says for ``state``, its example; replicated without it).

        ``step_fn`` must average its gradients over :attr:`axis_name` where that is set
        (``step.train_step`` does, given that axis and an optimizer made with it).
        """
        donate_argnums = (0,) if donate else ()
        if self.mode == "none":
            return jax.jit(step_fn, donate_argnums=donate_argnums)
        if self.axis_name is None:  # jit, average='gradients': XLA partitions the program
            batch = NamedSharding(self.mesh, PartitionSpec(AXIS))
            placed = self.replicated if state is None else self.state_sharding(state)
            return jax.jit(
                step_fn,
                in_shardings=(placed, batch, self.replicated),
                out_shardings=(placed, self.replicated),
                donate_argnums=donate_argnums,
            )
        device_step = functools.partial(_device_step, step_fn, self.average)
        if self.mode == "pmap":
            in_axes = (0, 0, None)
            return jax.pmap(device_step, AXIS, in_axes=in_axes, donate_argnums=donate_argnums)
        specs = dict(in_specs=(PartitionSpec(), PartitionSpec(AXIS), PartitionSpec()))
        sharded = jax.shard_map(device_step, mesh=self.mesh, out_specs=PartitionSpec(), **specs)
        return jax.jit(sharded, donate_argnums=donate_argnums)

    def metrics(self, metrics: Any) -> Any:
        """A step's metrics as host numbers (the first device's copy under pmap)."""
        metrics = jax.device_get(metrics)
        return jax.tree.map(lambda x: x[0], metrics) if self.mode == "pmap" else metrics


def _device_step(step_fn: StepFn, average: str, state: Any, batch: Any, rng: jax.Array):
    """One device's part of a step: its own augmentation, then the device averages."""
    rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
    state, metrics = step_fn(state, batch, rng)
    if average == "direction":  # BatchNorm ran on each shard alone
        state = state.replace(batch_stats=jax.lax.pmean(state.batch_stats, AXIS))
    return state, jax.lax.pmean(metrics, AXIS)


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments.train", "the trainer's data parallelism")
