"""What one training step costs, each optimizer's against sgd's, measured in ONE process.

Every optimizer runs the training program's own step (``experiments.step.train_step``:
on-device augmentation, g0 with BatchNorm, ``tx.update(..., loss_fn=...)``, apply) on the
same synthetic batch, jitted with the state donated. For each it prints the compile time,
the median step time over repetitions, the ratio to sgd's step measured in the same
process (timings on shared machines are noisy; ratios are not), and the peak memory that
XLA's memory analysis of the compiled step reports. Accelerated GAM takes 4 gradient
evaluations, so 4x sgd is its floor; SAM's is 2x. The amortised ones (``looksam``,
``reuse_gam_K``: GAM every K steps) are timed over whole cycles of K steps, divided by K.

    python -m experiments.benchmark                       # CIFAR-shaped ResNet-18, batch 128
    python -m experiments.benchmark --setting cpu         # a 6-conv BatchNorm CNN, batch 64
    python -m experiments.benchmark --setting cpu --compare-cpu-options

``--costs`` prints two parts, each figure also as a ratio to sgd's in the same process, and
the load average before and after (a warning above 1.5: its times are not to be published).

1. The optimizer's arithmetic alone: one update of each transformation (``sgd``
   alone, ``sam``, ``gsam``, ``gam``, each of ``sam`` and ``gam`` with the other
   arithmetic (``flat``), ``gam(unroll=False)``, ``gam(hessian=True)``,
   ``gam_penalty(hvp_step=...)``, ``sam_gam(...)``) chained with ``optax.sgd(0.1,
   momentum=0.9)`` on the setting's model parameters (shapes only), with a stand-in
   gradient (``g = sin(p)``, ``grad_fn = lambda q, i: cos(q)``) so that no model is in the
   program, jitted with donation: its fusions, kernels per step and optimised HLO lines
   (``program_counts`` says what is counted), and its compile time (median of
   ``--compile-rounds`` interleaved compiles; it depends on the machine's load). Then the
   same on N leaves of 64 floats (``--leaves``, default 8 32 128), with the fusions per leaf.
2. Every transformation's training step (``sgd``, ``sam``, ``gsam``, ``gam``, the other
   arithmetic of ``sam`` and ``gam`` (``flat``), ``gam``'s ``unroll=False`` and
   ``hessian=True`` forms, ``gam_penalty``, ``reuse(gam)``'s refresh,
   skip and in-step-conditional programs): compile time, optimised HLO lines, fusions,
   kernels per step, temporary memory (and the extra in parameter copies) and step time.
   ``--arithmetic-only`` leaves this part out.

``--m-sharpness`` prints part 2 alone for sgd, sam and gam, and sam and gam with
micro-batches of m = 32 and 8 examples (``config.micro_batch``: each micro-batch perturbed on
its own), run side by side (``parallel``: ``jax.vmap``) or one after another
(``sequential``: ``jax.lax.map``)::

    python -m experiments.benchmark --m-sharpness --setting cpu --rounds 10

``--accelerator`` is its GPU setting (part 1 on ResNet-18's parameters; part 2 on ResNet-18
and WRN-28-10 at CIFAR shapes, float32 and bfloat16, by default within a 240 s compile
budget): on a GPU, "kernels/step" is the number of kernel launches of one step. ``--smoke``
is the same on tiny shapes (it runs on CPU):

    python -m experiments.benchmark --costs --arithmetic-only      # ResNet-18's 62 leaves
    python -m experiments.benchmark --costs --setting cpu
    python -m experiments.benchmark --accelerator --json gpu_costs.json

``--compare-cpu-options`` also compiles every step with the CPU options of
``experiments.xla_options`` (XLA's convolutions instead of YNNPACK's) and reports both.
``--parallel`` times the data-parallel steps of ``experiments.parallel`` on every device, for
the same global batch, against the one-device step (column ``x none``):

    python -m experiments.benchmark --parallel none jit pmap --average gradients direction
    python -m experiments.benchmark --setting cpu --parallel none jit --cpu-devices 2

``--sharded`` compiles each row's training step with the parameters sharded (FSDP, tensor
parallel, both; Explicit and Auto meshes) on 8 devices (8 fake CPU devices where there are
fewer accelerators) and prints what each compiled program moves between devices and holds
in memory, against SGD's (``experiments.sharded``; compile only, about 15 minutes on 2
cores; ``--float64`` also runs 3 float64 steps against one device):

    python -m experiments.benchmark --sharded
    python -m experiments.benchmark --sharded --layouts tp --meshes explicit --rows sgd gam
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import textwrap
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gam_optax
from experiments import (
    cli,
    input_pipeline,
    models,
    optimizers,
    parallel,
    tables,
    train,
    xla_options,
)
from experiments.configs import default
from experiments.hlo import program_counts
from gam_optax._reuse import CPU_CONDITIONAL_WARNING

SETTINGS = {
    # name: (model, model_kwargs, batch size, image shape, classes)
    "resnet18": ("resnet18", {}, 128, (32, 32, 3), 10),
    "cpu": ("small_cnn", {"widths": (32, 32, 64, 64, 128, 128)}, 64, (32, 32, 3), 10),
    "tiny": ("small_cnn", {"widths": (8, 16)}, 16, (8, 8, 1), 10),
    "wrn28_10": ("wrn28_10", {}, 128, (32, 32, 3), 10),
}
# name -> (config.optimizer, overrides of that optimizer's section): the optimizers of
# experiments/optimizers.py (but adamw, whose step costs what sgd's does), and variants.
OPTIMIZERS = {
    **{name: (name, {}) for name in optimizers.NAMES if name not in ("adamw", "reuse")},
    "gam_exact_hvp": ("gam", {"hessian": True}),  # Algorithm 2, exact H v
    **{f"reuse_gam_{k}": ("reuse", {"inner": "gam", "every": k}) for k in (2, 5, 10)},
}


_STARTED = [time.perf_counter()]  # main() restarts the clock of the progress lines


def progress(text: str) -> None:
    """A progress line on stderr: the seconds since the command started, and ``text``."""
    print(f"  {time.perf_counter() - _STARTED[0]:6.0f} s  {text}", file=sys.stderr, flush=True)


def make_config(
    optimizer: str,
    setting: str,
    sections: dict[str, dict[str, Any]] | None = None,
    setting_values: tuple | None = None,
    dtype: str = "float32",
) -> Any:
    """The training config of ``optimizer`` on ``setting``. ``sections``: more overrides of
    config sections (``{"gam": {"unroll": False}}``); ``setting_values`` replaces
    ``SETTINGS[setting]``."""
    name, overrides = OPTIMIZERS[optimizer] if optimizer in OPTIMIZERS else (optimizer, {})
    model, model_kwargs, batch_size, _, _ = setting_values or SETTINGS[setting]
    config = default.get_config()
    config.optimizer = name
    config.model = model
    config.model_kwargs = model_kwargs
    config.batch_size = batch_size
    config.dtype = dtype
    config.augment = dict(crop_padding=4, flip=True, cutout_size=0)
    if overrides:
        config[name].update(overrides)
    for section, values in (sections or {}).items():
        if section == "config":  # top-level fields (config.micro_batch...)
            config.update(values)
        elif values.pop("replace", False):  # a new section: the fields given, no defaults
            config[section] = values
        else:
            config[section].update(values)
    return config


def build_step(
    optimizer: str,
    setting: str,
    donate: bool = True,
    dp: parallel.DataParallel | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    setting_values: tuple | None = None,
    dtype: str = "float32",
    refresh: bool | str | None = "host",
):
    """The compiled training step of ``optimizer`` on ``dp``'s devices (default: one), and
    its arguments (state, batch, rng). An amortised optimizer gives the pair (refresh step,
    reuse step) chosen on the host (``refresh="host"``), or the one step of ``refresh``
    (True, False, or None: the in-step conditional)."""
    dp = dp or parallel.DataParallel.create()
    _, _, batch_size, image_shape, num_classes = setting_values or SETTINGS[setting]
    config = make_config(optimizer, setting, sections, setting_values, dtype)
    config.average = dp.average
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (batch_size, *image_shape), dtype=np.uint8),
        "label": rng.integers(0, num_classes, batch_size, dtype=np.int32),
    }
    mean, std = (0.5,) * image_shape[-1], (0.25,) * image_shape[-1]
    data = input_pipeline.Dataset(
        batch["image"], batch["label"], batch["image"], batch["label"], num_classes, mean, std
    )
    program = train.build(config, data, dp, steps_per_epoch=1)
    args = (dp.from_global(program.state), dp.put_batch(batch), jax.random.key(1))
    if train.refresh_period(config) and refresh == "host":  # a refresh and a reuse program
        steps = (functools.partial(program.step, refresh=r) for r in (True, False))
        return tuple(dp.compile_step(step, donate=donate) for step in steps), args
    if train.refresh_period(config):
        step = functools.partial(program.step, refresh=refresh)
        return dp.compile_step(step, donate=donate), args
    return dp.compile_step(program.step, donate=donate), args


def peak_bytes(compiled: Any) -> int | None:
    """Arguments + outputs + temporaries - donated aliases, from XLA's memory analysis."""
    try:
        m = compiled.memory_analysis()
        return (
            m.argument_size_in_bytes
            + m.output_size_in_bytes
            + m.temp_size_in_bytes
            - (m.alias_size_in_bytes)
        )
    except Exception:  # not every backend reports it
        return None


def period(optimizer: str) -> int:
    """Steps in one cycle of ``optimizer``: ``every`` for the amortised ones, else 1."""
    return OPTIMIZERS[optimizer][1].get("every", 1)


def measure(
    jitted, args, compiler_options: dict, warmup: int, repeats: int, cycle: int = 1
) -> dict[str, Any]:
    """Compile time, and the median over ``repeats`` of the time of ``cycle`` consecutive
    steps divided by ``cycle`` (amortised: each cycle holds one refresh step). ``jitted`` is
    one step, or a pair (refresh step, reuse step): a cycle is then one refresh and
    ``cycle - 1`` reuse steps."""
    start = time.perf_counter()
    pair = jitted if isinstance(jitted, tuple) else (jitted, jitted)
    compiled = [j.lower(*args).compile(compiler_options=compiler_options) for j in pair]
    compile_s = time.perf_counter() - start
    schedule = [compiled[0]] + [compiled[1]] * (cycle - 1)
    state, batch, rng = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, args)
    for _ in range(warmup):
        for step in schedule:
            state, metrics = step(state, batch, rng)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for step in schedule:
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / cycle)
    return {
        "compile_s": compile_s,
        "step_ms": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "peak_mb": max(peak_bytes(c) or 0 for c in compiled) / 2**20,
        "loss": float(np.ravel(metrics["loss"])[0]),  # pmap: one copy per device
    }


def run(
    setting: str,
    optimizers: Sequence[str],
    warmup: int,
    repeats: int,
    compare_cpu_options: bool,
    donate: bool = True,
    parallel_modes: Sequence[str] = ("none",),
    averages: Sequence[str] = ("gradients",),
) -> list[dict[str, Any]]:
    variants = {"default": {}}
    if compare_cpu_options:
        options = xla_options.fast_compiler_options()
        if options:
            variants["xla_convolutions"] = options
        else:
            print("(this backend/jaxlib has no CPU convolution option: default only)")
    layouts = [("none", "gradients")] if "none" in parallel_modes else []
    layouts += [(m, a) for m in parallel_modes if m != "none" for a in averages]
    rows = []
    for mode, average in layouts:
        dp = parallel.DataParallel.create(mode, average)
        name = mode if mode == "none" else f"{mode}/{average}"
        for optimizer in optimizers:
            jitted, args = build_step(optimizer, setting, donate, dp)
            for variant, options in variants.items():
                result = measure(jitted, args, options, warmup, repeats, period(optimizer))
                row = {"optimizer": optimizer, "parallel": name, "variant": variant, **result}
                rows.append(row)
                progress(
                    f"measured {optimizer:12s} {name:20s} {variant:17s} {result['step_ms']:9.1f} ms"
                )
    sgd = {(r["parallel"], r["variant"]): r["step_ms"] for r in rows if r["optimizer"] == "sgd"}
    one = {(r["optimizer"], r["variant"]): r["step_ms"] for r in rows if r["parallel"] == "none"}
    for r in rows:
        r["vs_sgd"] = r["step_ms"] / sgd.get((r["parallel"], r["variant"]), np.nan)
        r["vs_none"] = r["step_ms"] / one.get((r["optimizer"], r["variant"]), np.nan)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ("optimizer", "parallel", "variant", "step ms", "x sgd", "x none", "compile s")
    cells = [
        (
            r["optimizer"],
            r["parallel"],
            r["variant"],
            f"{r['step_ms']:.1f}",
            f"{r['vs_sgd']:.2f}",
            f"{r['vs_none']:.2f}",
            f"{r['compile_s']:.1f}",
            f"{r['peak_mb']:.1f}",
        )
        for r in rows
    ]
    return tables.table((*header, "peak MB"), cells)


# ---------------------------------------------------------------------------------------
# The size of a compiled program: HLO lines, fusions and kernels, from its optimised HLO.
# ---------------------------------------------------------------------------------------


def compiled_counts(compiled: Any) -> dict[str, int | None]:
    """``program_counts`` of a compiled program (None each where the backend gives no HLO)."""
    try:
        text = compiled.as_text()
    except Exception:
        text = None
    if not text:
        return {"hlo_lines": None, "fusions": None, "kernels": None}
    return program_counts(text)


# ---------------------------------------------------------------------------------------
# --costs, part 1: the optimizer's arithmetic alone. The program is one update of
# each transformation chained with SGD momentum, on a model's parameters, with a stand-in
# gradient (g = sin(p), grad_fn(q, i) = cos(q)): no model is in it, only the tree arithmetic.
# ---------------------------------------------------------------------------------------

# row -> the transformation before optax.sgd(0.1, momentum=0.9) (None: SGD alone, the
# baseline). The penalty forms take experiments/optimizers.py's values; sam_gam shares SAM's
# point (sam_rho == hvp_step: 3 extra gradients, as gam). The values do not change the size.
ARITHMETIC: dict[str, Any] = {
    "sgd": lambda: None,
    "sam": lambda: gam_optax.sam(),
    "gsam": lambda: gam_optax.gsam(),
    "gam": lambda: gam_optax.gam(),
    "sam(flat=True)": lambda: gam_optax.sam(flat=True),
    "gam(flat=False)": lambda: gam_optax.gam(flat=False),
    "gam(unroll=False)": lambda: gam_optax.gam(unroll=False),
    "gam(unroll=False, flat=False)": lambda: gam_optax.gam(unroll=False, flat=False),
    "gam(hessian=True)": lambda: gam_optax.gam(hessian=True),
    "gam_penalty(hvp_step=0.05)": lambda: gam_optax.gam_penalty(0.1, 0.3, hvp_step=0.05),
    "sam_gam(sam_rho=hvp_step=0.05)": lambda: gam_optax.sam_gam(
        0.1, 0.3, sam_rho=0.05, hvp_step=0.05
    ),
}
SWEEP_ROWS = (
    "sgd",
    "sam",
    "sam(flat=True)",
    "gam",
    "gam(flat=False)",
    "gam(unroll=False)",
    "gam(unroll=False, flat=False)",
)
SWEEP_LEAVES = (8, 32, 128)  # leaves of 64 floats each
SWEEP_LEAF_SIZE = 64
HIGH_LOAD = 1.5  # the project's standard: timings above this load average are not published


def arithmetic_step(row: str):
    """A fresh (never traced) step of ``row``'s arithmetic: ``(params, state) -> (params,
    state)``, and its optax transformation."""
    inner = ARITHMETIC[row]()
    sgd = optax.sgd(0.1, momentum=0.9)
    tx = sgd if inner is None else optax.chain(inner, sgd)

    def grad_fn(q, i):
        return jax.tree.map(jnp.cos, q)

    def step(params, state):
        grads = jax.tree.map(jnp.sin, params)
        updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    return step, tx


def model_parameters(setting_values: tuple, dtype: str = "float32") -> Any:
    """The shapes of a setting's model parameters (``jax.eval_shape`` of its init: nothing
    is computed), in ``dtype``."""
    model, model_kwargs, _, image_shape, num_classes = setting_values
    module = models.create_model(model, num_classes, **model_kwargs)
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
    )
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), variables["params"])


def leaf_parameters(leaves: int, size: int = SWEEP_LEAF_SIZE, dtype: str = "float32") -> Any:
    """``leaves`` parameter leaves of ``size`` floats each."""
    return {f"w{k:03d}": jax.ShapeDtypeStruct((size,), dtype) for k in range(leaves)}


def compile_arithmetic(row: str, params: Any) -> tuple[Any, float]:
    """``row``'s arithmetic-only step, jitted with donation and compiled for ``params``, and
    the seconds its trace + lower + compile took."""
    start = time.perf_counter()
    step, tx = arithmetic_step(row)
    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile()
    return compiled, time.perf_counter() - start


def measure_arithmetic(params: Any, rows: Sequence[str], rounds: int) -> list[dict[str, Any]]:
    """Fusions, kernels, HLO lines and compile time of each row's arithmetic-only program on
    ``params``, each also as a ratio to sgd's (the first row). Each round compiles every row
    once, sgd first (a fresh function each time: no cache is hit); the compile time is the
    median over ``rounds``. The counts are those of the first round's program (they do not
    change between compiles)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: compile each program at least once (rounds >= 1)")
    rows = ["sgd", *[r for r in rows if r != "sgd"]]
    leaves = len(jax.tree.leaves(params))
    counts, times = {}, {row: [] for row in rows}
    for round_ in range(1, rounds + 1):
        for row in rows:
            compiled, seconds = compile_arithmetic(row, params)
            times[row].append(seconds)
            counts.setdefault(row, compiled_counts(compiled))
            progress(f"arithmetic {row} ({leaves} leaves): compile {round_} of {rounds}")
    sgd = counts["sgd"]
    compile_sgd = statistics.median(times["sgd"])
    ratio = lambda value, base: (value or np.nan) / (base or np.nan)
    return [
        {
            "row": row,
            "leaves": leaves,
            **counts[row],
            "fusions_x": ratio(counts[row]["fusions"], sgd["fusions"]),
            "kernels_x": ratio(counts[row]["kernels"], sgd["kernels"]),
            "hlo_x": ratio(counts[row]["hlo_lines"], sgd["hlo_lines"]),
            "compile_s": statistics.median(times[row]),
            "compile_x": statistics.median(times[row]) / compile_sgd,
        }
        for row in rows
    ]


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


ARITHMETIC_COLUMNS = (  # (heading, the cell of a result)
    ("transformation", lambda r: r["row"]),
    ("fusions", lambda r: _count(r["fusions"])),
    ("x sgd", lambda r: f"{r['fusions_x']:.2f}"),
    ("kernels/step", lambda r: _count(r["kernels"])),
    ("HLO lines", lambda r: _count(r["hlo_lines"])),
    ("x sgd", lambda r: f"{r['hlo_x']:.2f}"),
    ("compile s (load-dependent)", lambda r: f"{r['compile_s']:.2f}"),
    ("x sgd", lambda r: f"{r['compile_x']:.2f}"),
)


def format_arithmetic(results: Sequence[dict[str, Any]]) -> str:
    cells = [[cell(r) for _, cell in ARITHMETIC_COLUMNS] for r in results]
    return tables.table([heading for heading, _ in ARITHMETIC_COLUMNS], cells)


def format_sweep(results: Sequence[dict[str, Any]]) -> str:
    """The leaf sweep: a row per leaf count, ``fusions / HLO lines / compile s`` for each
    transformation, and the fusions each leaf adds (the slope from the fewest leaves to the
    most)."""
    rows = list(dict.fromkeys(r["row"] for r in results))
    sizes = sorted({r["leaves"] for r in results})
    at = {(r["row"], r["leaves"]): r for r in results}
    cell = lambda r: f"{_count(r['fusions'])} / {_count(r['hlo_lines'])} / {r['compile_s']:.2f} s"
    cells = [[str(n), *(cell(at[row, n]) for row in rows)] for n in sizes]
    if len(sizes) > 1 and all(at[row, n]["fusions"] is not None for row in rows for n in sizes):
        low, high = sizes[0], sizes[-1]
        slope = lambda row: (at[row, high]["fusions"] - at[row, low]["fusions"]) / (high - low)
        cells.append(["fusions per leaf", *(f"{slope(row):.1f}" for row in rows)])
    heading = "leaves (fusions / HLO lines / compile s, load-dependent)"
    return tables.table([heading, *rows], cells)


def load_average(moment: str) -> float:
    """Print the load average (1, 5, 15 minutes) and return the 1-minute figure."""
    one, five, fifteen = os.getloadavg()
    print(f"load average {moment}: {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)")
    return one


def load_warning(before: float, after: float) -> str | None:
    """The warning to print when the 1-minute load average before or after a measurement was
    above ``HIGH_LOAD``; None when it was not."""
    if max(before, after) <= HIGH_LOAD:
        return None
    return (
        f"WARNING: the load average was above {HIGH_LOAD} ({before:.2f} before, {after:.2f} "
        f"after): the compile and step times above are not fit to publish (the fusion, kernel "
        f"and HLO-line counts do not depend on load); rerun on a quiet machine."
    )


def run_arithmetic(args: argparse.Namespace, setting_values: tuple) -> list[dict[str, Any]]:
    """Part 1 of --costs: the arithmetic-only table on the setting's parameters, then the
    sweep over leaves of 64 floats."""
    rows = [r for r in (args.rows or ARITHMETIC) if r in ARITHMETIC]
    params = model_parameters(setting_values, args.dtype)
    leaves, floats = len(jax.tree.leaves(params)), sum(x.size for x in jax.tree.leaves(params))
    results = measure_arithmetic(params, rows, args.compile_rounds)
    print(
        f"\nThe optimizer's arithmetic alone: {setting_values[0]} parameters ({leaves} leaves, "
        f"{floats:,} {args.dtype}), stand-in gradient g = sin(p), grad_fn(q, i) = cos(q), "
        f"chained with optax.sgd(0.1, momentum=0.9), jit with donation; compile: median of "
        f"{args.compile_rounds} interleaved trace + lower + compile:"
    )
    print(format_arithmetic(results), flush=True)
    sweep = []
    for n in args.leaves:
        sweep_rows = [r for r in SWEEP_ROWS if r in rows]
        params = leaf_parameters(n, dtype=args.dtype)
        sweep += measure_arithmetic(params, sweep_rows, args.compile_rounds)
    if sweep:
        print(f"\nThe same, on N leaves of {SWEEP_LEAF_SIZE} {args.dtype}:")
        print(format_sweep(sweep), flush=True)
    return [{"table": "arithmetic", **r} for r in results] + [
        {"table": "arithmetic sweep", **r} for r in sweep
    ]


# ---------------------------------------------------------------------------------------
# --costs, part 2: what each transformation's program costs beyond sgd's, in one process.
# ---------------------------------------------------------------------------------------

REUSE_GAM = {"reuse": {"inner": "gam", "every": 5}}
# row -> (optimizer, config overrides, refresh of an amortised optimizer)
COSTS: dict[str, tuple[str, dict[str, dict[str, Any]], Any]] = {
    "sgd": ("sgd", {}, None),
    "sam": ("sam", {}, None),
    "gsam": ("gsam", {}, None),
    "gam": ("gam", {}, None),
    "sam(flat=True)": ("sam", {"sam": {"flat": True}}, None),
    "gam(flat=False)": ("gam", {"gam": {"flat": False}}, None),
    "gam(unroll=False)": ("gam", {"gam": {"unroll": False}}, None),
    "gam(unroll=False, flat=False)": ("gam", {"gam": {"unroll": False, "flat": False}}, None),
    "gam(hessian=True)": ("gam", {"gam": {"hessian": True}}, None),
    "gam(hessian=True, unroll=False)": ("gam", {"gam": {"hessian": True, "unroll": False}}, None),
    "gam_penalty": ("gam_penalty", {}, None),
    "reuse(gam) refresh": ("reuse", REUSE_GAM, True),
    "reuse(gam) skip": ("reuse", REUSE_GAM, False),
    "reuse(gam) in-step cond": ("reuse", REUSE_GAM, None),
}
# m-sharpness (config.micro_batch): micro-batches of m examples, each perturbed on its own,
# run side by side (jax.vmap) or one after another (jax.lax.map); --m-sharpness picks them.
MICRO_BATCHES = (32, 8)
MICRO_ROWS = {
    f"{member} m={m} {strategy}": (
        member,
        {"config": {"micro_batch": m, "micro_strategy": strategy}},
        None,
    )
    for member in ("sam", "gam")
    for m in MICRO_BATCHES
    for strategy in ("parallel", "sequential")
}
COSTS.update(MICRO_ROWS)
ACCELERATOR_ROWS = (
    "sgd",
    "sam",
    "sam(flat=True)",
    "gam",
    "gam(flat=False)",
    "gam(unroll=False)",
    "reuse(gam) refresh",
    "reuse(gam) skip",
    "reuse(gam) in-step cond",
    "gam m=32 parallel",
    "gam m=32 sequential",
)
# The accelerator setting: CIFAR shapes, batch 128, float32 and bfloat16 (smoke: tiny shapes,
# the same code paths, for a test on CPU).
ACCELERATOR_CASES = (
    ("resnet18", "float32"),
    ("resnet18", "bfloat16"),
    ("wrn28_10", "float32"),
    ("wrn28_10", "bfloat16"),
)
SMOKE = {
    "resnet18": ("resnet18", {"stage_sizes": (1,), "num_filters": 4}, 4, (8, 8, 3), 10),
    "wrn28_10": ("wrn28_10", {"depth": 10, "width": 1}, 4, (8, 8, 3), 10),
}


def cost_cycle(row: str) -> int:
    """Steps timed together: the in-step conditional over a whole period (one refresh)."""
    optimizer, sections, refresh = COSTS[row]
    if optimizer == "reuse" and refresh is None:
        return sections["reuse"]["every"]
    return 1


def temp_bytes(compiled: Any) -> int | None:
    try:
        return compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # not every backend reports it
        return None


def measure_costs(
    setting: str,
    rows: Sequence[str],
    rounds: int,
    setting_values: tuple | None = None,
    dtype: str = "float32",
    compiler_options: dict | None = None,
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """Compile (trace + lower + compile) time, optimised HLO lines, temporary memory and step
    time of each row's program, each also as a ratio to sgd's (the first row). Steps are timed
    in ``rounds`` interleaved rounds (every program once per round); the median is reported.
    Rows not compiled by ``deadline`` (a ``time.perf_counter()`` value) are left out."""
    rows = ["sgd", *[r for r in rows if r != "sgd"]]
    batch_size = (setting_values or SETTINGS[setting])[2]
    programs = {}
    for row in rows:
        if deadline is not None and time.perf_counter() > deadline:
            print(f"  (time budget spent: {row} left out)", file=sys.stderr, flush=True)
            continue
        micro = COSTS[row][1].get("config", {}).get("micro_batch", 0)
        if micro and batch_size % micro:
            print(f"  ({row} left out: m={micro} does not divide the batch of {batch_size})")
            continue
        programs[row] = _compile_row(row, setting, setting_values, dtype, compiler_options)
    for round_ in range(rounds + 1 if rounds else 0):  # round 0: the warm-up
        for row, p in programs.items():
            seconds = _time_row(row, p)
            done = f"round {round_} of {rounds}" if round_ else "warm-up"
            progress(f"timed {row} ({done}): {1e3 * seconds:.1f} ms")
    return [_costs(row, p, programs["sgd"], dtype) for row, p in programs.items()]


def _time_row(row: str, p: dict[str, Any]) -> float:
    """Seconds per step of one round of ``row``'s program (a whole cycle of its steps),
    appended to ``p["times"]``; the state carries on to the next round."""
    cycle = cost_cycle(row)
    state, batch, rng = p["args"]
    start = time.perf_counter()
    for _ in range(cycle):
        state, metrics = p["compiled"](state, batch, rng)
    jax.block_until_ready((state, metrics))
    p["times"].append((time.perf_counter() - start) / cycle)
    p["args"][0] = state
    return p["times"][-1]


# gam_optax warns when reuse picks its refresh steps with lax.cond on a CPU; the row
# "reuse(gam) in-step cond" measures that program on purpose: said once, in words.
REUSE_NOTE = (
    "note: the row reuse(gam) in-step cond has reuse pick its refresh steps with "
    "jax.lax.cond, on purpose: XLA:CPU runs the convolutions inside it as plain loops, "
    "several times slower than GAM's own step (gam_optax warns of it). The training program "
    "picks them on the host: the rows reuse(gam) refresh and skip."
)
_SAID: set[str] = set()  # the notes said so far


def noted(compile_fn: Any) -> Any:
    """``compile_fn()``, gam_optax's warning about reuse's conditional said once as
    :data:`REUSE_NOTE`; any other warning passes on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compile_fn()
    for w in caught:
        if str(w.message) != CPU_CONDITIONAL_WARNING:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif REUSE_NOTE not in _SAID:
            _SAID.add(REUSE_NOTE)
            print(REUSE_NOTE, flush=True)
    return result


def _compile_row(row, setting, setting_values, dtype, compiler_options) -> dict[str, Any]:
    """The compiled program of a row of ``COSTS``, its arguments and its static costs."""
    optimizer, sections, refresh = COSTS[row]
    sections = {k: dict(v) for k, v in sections.items()}
    start = time.perf_counter()
    jitted, args = build_step(
        optimizer, setting, True, None, sections, setting_values, dtype, refresh
    )
    built = time.perf_counter()
    lowered = noted(lambda: jitted.lower(*args))  # traced here: reuse's warning, if any
    compiled = lowered.compile(compiler_options=compiler_options or {})
    state = jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, args[0])
    progress(f"compiled {row:32s} {time.perf_counter() - start:7.1f} s")
    return dict(
        compiled=compiled,
        args=[state, *args[1:]],
        compile_s=time.perf_counter() - built,
        **compiled_counts(compiled),
        temp_bytes=temp_bytes(compiled),
        param_bytes=sum(x.nbytes for x in jax.tree.leaves(args[0].params)),
        times=[],
    )


def _costs(row: str, p: dict[str, Any], sgd: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A row's costs, and their ratios to sgd's (step times: the median after round 0)."""
    timed = len(p["times"]) > 1
    step = statistics.median(p["times"][1:]) if timed else float("nan")
    sgd_step = statistics.median(sgd["times"][1:]) if timed else float("nan")
    extra = (
        (p["temp_bytes"] - sgd["temp_bytes"]) / p["param_bytes"]
        if p["temp_bytes"] is not None and sgd["temp_bytes"] is not None
        else float("nan")
    )
    ratio = lambda key: (p[key] or np.nan) / (sgd[key] or np.nan)
    return {
        "row": row,
        "dtype": dtype,
        "compile_s": p["compile_s"],
        "compile_x": p["compile_s"] / sgd["compile_s"],
        "hlo_lines": p["hlo_lines"],
        "hlo_x": ratio("hlo_lines"),
        "fusions": p["fusions"],
        "kernels": p["kernels"],
        "kernels_x": ratio("kernels"),
        "temp_mib": (p["temp_bytes"] or np.nan) / 2**20,
        "temp_x": ratio("temp_bytes"),
        "extra_copies": extra,
        "param_mib": p["param_bytes"] / 2**20,
        "step_ms": 1e3 * step,
        "step_x": step / sgd_step,
    }


COST_COLUMNS = (  # (heading, the cell of a result); "x sgd": the ratio to sgd's
    ("step", "{row}"),
    ("compile s", "{compile_s:.2f}"),
    ("x sgd", "{compile_x:.2f}"),
    ("HLO lines", "{hlo_lines:,}"),
    ("x sgd", "{hlo_x:.2f}"),
    ("fusions", "{fusions:,}"),
    ("kernels/step", "{kernels:,}"),
    ("x sgd", "{kernels_x:.2f}"),
    ("temp MiB", "{temp_mib:.1f}"),
    ("extra param copies", "{extra_copies:.2f}"),
    ("step ms", "{step_ms:.1f}"),
    ("x sgd", "{step_x:.2f}"),
)


def format_costs(results: Sequence[dict[str, Any]]) -> str:
    def cell(result, form):  # "-": the backend reported no HLO
        counts = ("hlo_lines", "fusions", "kernels")
        if any(k in form for k in counts) and not result["hlo_lines"]:
            return "-"
        return form.format(**result)

    cells = [[cell(r, form) for _, form in COST_COLUMNS] for r in results]
    return tables.table([heading for heading, _ in COST_COLUMNS], cells)


def run_costs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The --costs mode: the arithmetic-only table and the leaf sweep (part 1), then (unless
    ``--arithmetic-only``) one table of training steps per (model, dtype) case (part 2).
    Every row has ``table``: "arithmetic", "arithmetic sweep" or "step"."""
    options = xla_options.fast_compiler_options() if args.compare_cpu_options else {}
    if args.accelerator:
        cases = [(m, d, (SMOKE if args.smoke else SETTINGS)[m]) for m, d in ACCELERATOR_CASES]
        rows = args.rows or list(ACCELERATOR_ROWS)
        arithmetic_setting = "resnet18"
    else:
        values = SETTINGS[args.setting]
        if args.batch_size:
            values = (*values[:2], args.batch_size, *values[3:])
        cases = [(args.setting, args.dtype, values)]
        default = ["sgd", "sam", "gam", *MICRO_ROWS] if args.m_sharpness else list(COSTS)
        rows = args.rows or [r for r in default if args.m_sharpness or r not in MICRO_ROWS]
        arithmetic_setting = args.setting
    budget = args.budget_s or (240.0 if args.accelerator and not args.smoke else None)
    deadline = time.perf_counter() + budget if budget else None
    values = (SMOKE if args.accelerator and args.smoke else SETTINGS)[arithmetic_setting]
    arithmetic = [] if args.m_sharpness else run_arithmetic(args, values)  # part 1
    everything = [{"setting": arithmetic_setting, "dtype": args.dtype, **r} for r in arithmetic]
    rows = [r for r in rows if r in COSTS]
    for setting, dtype, values in cases if rows and not args.arithmetic_only else ():
        if deadline is not None and time.perf_counter() > deadline:
            print(f"(time budget spent: {setting} {dtype} left out)")
            continue
        results = measure_costs(setting, rows, args.rounds, values, dtype, options, deadline)
        model, model_kwargs, batch_size, image_shape, _ = values
        print(
            f"\nTraining step: {model} {model_kwargs or ''} batch {batch_size} {image_shape} "
            f"{dtype}, parameters {results[0]['param_mib']:.1f} MiB, {args.rounds} rounds:"
        )
        print(format_costs(results), flush=True)
        everything += [{"table": "step", "setting": setting, **r} for r in results]
    return everything


DESCRIPTION = textwrap.fill(
    f"{__doc__.splitlines()[0]} The step-time table's optimizers (--optimizers): "
    f"{', '.join(OPTIMIZERS)}.",
    88,
    break_on_hyphens=False,
)
# How long each mode takes on the 2-core CPU: measured where it says so (the load average
# beside it: other jobs shared the cores), else the figure recorded in the place named.
HOW_LONG = """\
How long, on a 2-core x86-64 CPU (each row prints a progress line with the seconds
elapsed, on stderr; "load" is the load average while measured):
  --setting tiny                        about 50 s (measured, load 1-2.5)
  --setting cpu                         about 90 s (measured, load 2-3)
  --setting resnet18 (the default)      about 45 min, an estimate from its steps measured
                                        here (sgd 3.9 s, gam 18.8 s, load 1-2.6): use a GPU
  --costs --setting tiny                about 6 min (measured, load 3-6), mostly part 1's
                                        sweep over leaves, which --leaves alone leaves out:
  --costs --setting tiny --leaves       about 70 s (measured, load 4)
  --costs --setting cpu                 about 400 s on quiet cores (measured: 397 s), of
                                        which part 1 took 188 s alone (load 2.4-3.8)
  --costs --arithmetic-only             about 4.5 min, on ResNet-18 (measured, load 2-6)
  --m-sharpness --setting cpu --rounds 10
                                        about 160 s (measured, load 0.8-1.4)
  --costs --setting resnet18 --rounds 0 --rows sgd gam 'gam(unroll=False)'
                                        part 1 of these 3 rows, then 21 s of compiles on
                                        quiet cores, 4 min at load 20 (experiments/RESULTS.md,
                                        "Compile once")
  --accelerator                         on a GPU, within 5 min: what is not compiled after
                                        240 s is left out (--budget-s; RESULTS.md)
  --sharded                             about 15 min (compile only)
"""


def make_parser() -> argparse.ArgumentParser:
    """The command line's flags: the step-time table (default) and ``--costs``."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description=DESCRIPTION,
        epilog=HOW_LONG,
        formatter_class=cli.RawHelpFormatter,
    )
    parser.add_argument(
        "--setting",
        choices=sorted(SETTINGS),
        default="resnet18",
        help="the model and shapes (resnet18 is slow on a CPU: see below)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(OPTIMIZERS),
        default=list(OPTIMIZERS),
        help="the step-time table's rows (default: all)",
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per optimizer")
    parser.add_argument(
        "--compare-cpu-options",
        action="store_true",
        help="also time the step with the README's XLA:CPU option",
    )
    parser.add_argument("--no-donate", action="store_true", help="do not donate the state")
    parser.add_argument(
        "--parallel", nargs="+", choices=parallel.MODES, default=["none"], help="step layouts"
    )
    parser.add_argument(
        "--average",
        nargs="+",
        choices=parallel.AVERAGES,
        default=["gradients"],
        help="data-parallel modes of the jit and pmap layouts",
    )
    parser.add_argument(
        "--cpu-devices", type=int, help="split the CPU into this many devices (before JAX starts)"
    )
    parser.add_argument("--json", help="also write the rows to this file")
    _add_sharded_flags(
        parser.add_argument_group(
            "--sharded", "collective bytes and memory with the parameters sharded, 8 devices"
        )
    )
    _add_costs_flags(
        parser.add_argument_group(
            "--costs", "compile time, HLO size, memory and step time of each transformation"
        )
    )
    return parser


def _add_sharded_flags(group: argparse._ArgumentGroup) -> None:
    """The flags of ``--sharded`` (its rows: ``--rows``, default ``sharded.ROWS``)."""
    from experiments import sharded

    group.add_argument("--sharded", action="store_true", help="print the sharded table")
    group.add_argument(
        "--layouts",
        nargs="+",
        choices=list(sharded.LAYOUTS),
        default=list(sharded.LAYOUTS),
        help="how the parameters lie on the mesh",
    )
    group.add_argument(
        "--meshes",
        nargs="+",
        choices=sharded.AXIS_TYPES,
        default=list(sharded.AXIS_TYPES),
        help="the mesh axes' type",
    )
    group.add_argument(
        "--sizes",
        nargs="+",
        type=int,
        default=list(sharded.SIZES),
        help=f"the MLP's widths (default: {' '.join(map(str, sharded.SIZES))}, the 48 MiB model)",
    )
    group.add_argument("--float64", action="store_true", help="also the float64 error")


def _add_costs_flags(costs: argparse._ArgumentGroup) -> None:
    """The flags of ``--costs`` and ``--accelerator``."""
    costs.add_argument("--costs", action="store_true", help="print the costs tables")
    costs.add_argument(
        "--rows",
        nargs="+",
        help="default: all; each table shows those of its rows given (--sharded: "
        "experiments.sharded.row_names())",
    )
    costs.add_argument(
        "--arithmetic-only",
        action="store_true",
        help="only the optimizer's arithmetic (part 1), no training step (part 2)",
    )
    costs.add_argument(
        "--compile-rounds",
        type=int,
        default=3,
        help="part 1: the compile time is the median of this many interleaved compiles",
    )
    costs.add_argument(
        "--leaves",
        nargs="*",
        type=int,
        help=f"part 1's sweep: leaves of {SWEEP_LEAF_SIZE} floats (default "
        f"{' '.join(map(str, SWEEP_LEAVES))}; --smoke: 2 4; none: no sweep)",
    )
    costs.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    costs.add_argument("--batch-size", type=int, help="instead of the setting's")
    costs.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="the params' dtype"
    )
    costs.add_argument(
        "--accelerator",
        action="store_true",
        help="ResNet-18 and WRN-28-10 at CIFAR shapes, batch 128, float32 and bfloat16",
    )
    costs.add_argument(
        "--m-sharpness",
        action="store_true",
        help=f"part 2's rows: sgd, sam and gam, then sam and gam with micro-batches of m = "
        f"{' and '.join(map(str, MICRO_BATCHES))} examples (config.micro_batch), parallel "
        f"and sequential",
    )
    costs.add_argument("--smoke", action="store_true", help="--accelerator with tiny shapes")
    costs.add_argument("--budget-s", type=float, help="leave out what is not compiled by then")


def _check_rows(parser: argparse.ArgumentParser, rows: Sequence[str] | None) -> None:
    """``--rows`` of ``--costs``: rows of its tables."""
    unknown = sorted(set(rows or ()) - {*ARITHMETIC, *COSTS})
    if unknown:
        parser.error(
            f"--rows {' '.join(unknown)}: choose from "
            f"{', '.join(dict.fromkeys([*ARITHMETIC, *COSTS]))}"
        )


def _run_sharded(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--sharded``: 8 devices (before JAX starts), the rows checked, the table."""
    from experiments import sharded

    jax.config.update("jax_num_cpu_devices", args.cpu_devices or sharded.DEVICES)
    unknown = sorted(set(args.rows or ()) - set(sharded.row_names()))
    if unknown:
        parser.error(
            f"--rows {' '.join(unknown)}: not a row of --sharded; choose from "
            f"{', '.join(sharded.row_names())}"
        )
    return sharded.main(args)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = make_parser()
    args = parser.parse_args(argv)
    _STARTED[0] = time.perf_counter()
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    if args.sharded:
        return _run_sharded(parser, args)
    _check_rows(parser, args.rows)
    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    if args.costs or args.accelerator or args.m_sharpness:
        if args.rounds < 0:
            parser.error("--rounds must be >= 0")
        if args.compile_rounds < 1:
            parser.error(f"--compile-rounds {args.compile_rounds}: compile at least once (>= 1)")
        if args.leaves is None:
            args.leaves = (2, 4) if args.smoke else SWEEP_LEAVES
        if any(n < 1 for n in args.leaves):
            parser.error(f"--leaves {args.leaves}: each number of leaves must be >= 1")
        device = jax.devices()[0]
        print(f"{device.platform}: {device.device_kind}, jax {jax.__version__}")
        before = load_average("before")
        results = run_costs(args)
        after = load_average("after")
        load = {"before": before, "after": after}
        warning = load_warning(before, after)
        if warning:
            print(warning)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {"device": device.device_kind, "load_average": load, "rows": results},
                    f,
                    indent=1,
                )
        return results
    optimizers = ["sgd", *[o for o in args.optimizers if o != "sgd"]]  # sgd: the baseline
    device = jax.devices()[0]
    print(
        f"{SETTINGS[args.setting]} on {jax.device_count()} x {device.platform}: "
        f"{device.device_kind}, jax {jax.__version__}"
    )
    rows = run(
        args.setting,
        optimizers,
        args.warmup,
        args.repeats,
        args.compare_cpu_options,
        donate=not args.no_donate,
        parallel_modes=args.parallel,
        averages=args.average,
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"setting": args.setting, "device": device.device_kind, "rows": rows}, f, indent=1
            )
    return rows


if __name__ == "__main__":
    main()
