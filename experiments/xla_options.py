"""Compiler options that make the training step faster, where the installed jaxlib knows them.

On CPU, jaxlib 0.10 routes convolutions through YNNPACK library fusions, which on small
machines is much slower than XLA's own (Eigen) convolutions; the experimental option below
keeps YNNPACK for dots and reductions only. An unknown option would be an error, so it is
probed once per process on a trivial program and used only where it compiles. The options
are passed per compilation (``lowered.compile(compiler_options=...)``), never through
``XLA_FLAGS``, whose unknown flags abort JAX at start-up.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

CPU_CONVOLUTIONS_IN_XLA = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
}


@functools.cache
def _compiles_with(options: tuple[tuple[str, str], ...]) -> bool:
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options=dict(options))
    except Exception:  # "No such compile option" on a jaxlib that does not know it
        return False
    return True


def fast_compiler_options(backend: str | None = None) -> dict[str, str]:
    """The options for ``backend`` (default: JAX's) that this jaxlib supports; {} elsewhere."""
    backend = backend or jax.default_backend()
    if backend == "cpu" and _compiles_with(tuple(CPU_CONVOLUTIONS_IN_XLA.items())):
        return dict(CPU_CONVOLUTIONS_IN_XLA)
    return {}


def compile_fast(jitted: Any, *args: Any, **kwargs: Any) -> Any:
    """``jitted.lower(*args, **kwargs).compile(...)`` with :func:`fast_compiler_options`.

    The result runs on arguments of the same shapes, dtypes and shardings as ``args``.
    """
    return jitted.lower(*args, **kwargs).compile(compiler_options=fast_compiler_options())


def cache_compilations(directory: str | pathlib.Path) -> None:
    """Keep compiled programs in ``directory`` (JAX's persistent compilation cache).

    Programs that differ only in their arguments' values -- the same optimizer with
    another seed, the flatness measures of another run -- then load instead of compiling
    (measured: the three flatness measures of a digits run, 37 s -> 16 s).
    """
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments.train", "the trainer's compiler options")
