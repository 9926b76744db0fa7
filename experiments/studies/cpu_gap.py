"""Closing the per-gradient CPU gap: one gradient and one GAM step, several ways.

The network is the one of the PyTorch comparison in RESULTS.md: six 3x3 convolutions without
bias, each followed by BatchNorm (training mode, batch statistics) and ReLU, widths
32-32-64-64-128-128, a 2x2 max-pool after each pair, global average pool, linear to 10
classes; batch 64 of 32x32x3, cross-entropy. For every variant this prints the median time
of one gradient (``value_and_grad`` of the loss, with the new BatchNorm statistics as aux)
and of one GAM step (g0, ``gam_optax.gam`` + SGD momentum, apply), both compiled with the
variant's ``compiler_options``, all in ONE process, measured in interleaved rounds; ``x
default`` is the gradient's time over the gradient of flax + jaxlib defaults measured in the
same rounds. ``grad diff`` is ||g - g_default|| / ||g_default|| on the same parameters and
batch: the variants compute the same maths (float32 rounding; bfloat16 aside).

    python -m experiments.studies.cpu_gap                     # all variants
    python -m experiments.studies.cpu_gap --only reshape hand # variants naming a word, + default

Variants: compiler options (each probed on a trivial program; one this jaxlib does not
know is skipped), the hand-written network (``lax.conv_general_dilated``) in NHWC or NCHW,
BatchNorm formulations, max-pool written as reshape + max (whose gradient is elementwise,
not XLA's select-and-scatter), and bfloat16 compute.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import gam_optax
from experiments import cli, tables, xla_options

WIDTHS = (32, 32, 64, 64, 128, 128)
BATCH, CLASSES, EPS, MOMENTUM = 64, 10, 1e-5, 0.9
CPU = xla_options.CPU_CONVOLUTIONS_IN_XLA  # XLA's (Eigen) convolutions, not YNNPACK's


def max_pool_2x2(x, spatial):
    """2x2 max-pool as reshape + max: its gradient is elementwise (compare and select), not
    XLA's select-and-scatter. After a ReLU both gradients are equal: ties are zeros, where
    the ReLU's gradient is 0 anyway (ties of equal positive values aside)."""
    split, pooled = [], []
    for a, size in enumerate(x.shape):
        split += [size // 2, 2] if a in spatial else [size]
        pooled += [len(split) - 1] if a in spatial else []
    return jnp.max(x.reshape(split), axis=tuple(pooled))


class IssueCNN(nn.Module):
    """The issue's network in flax (NHWC); ``fast_variance``: flax's E[x^2] - E[x]^2;
    ``reshape_pool``: max-pool as :func:`max_pool_2x2` instead of ``nn.max_pool``."""

    dtype: Any = jnp.float32
    fast_variance: bool = True
    reshape_pool: bool = False

    @nn.compact
    def __call__(self, x):
        x = x.astype(self.dtype)
        for i, width in enumerate(WIDTHS):
            x = nn.Conv(width, (3, 3), padding=1, use_bias=False, dtype=self.dtype)(x)
            x = nn.BatchNorm(
                use_running_average=False,
                momentum=MOMENTUM,
                epsilon=EPS,
                dtype=self.dtype,
                use_fast_variance=self.fast_variance,
            )(x)
            x = nn.relu(x)
            if i % 2 and self.reshape_pool:
                x = max_pool_2x2(x, spatial=(1, 2))
            elif i % 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(CLASSES, dtype=self.dtype)(x).astype(jnp.float32)


def lax_apply(variables, x, *, layout="NHWC", one_pass=True, reshape_pool=False):
    """The same network by hand on flax's parameters (kernels HWIO) in ``layout``.

    ``one_pass``: BatchNorm from E[x] and E[x^2] folded into one scale and shift, else the
    two-pass variance E[(x - E[x])^2]. ``reshape_pool``: max-pool by :func:`max_pool_2x2`.
    """
    params, stats = variables["params"], variables["batch_stats"]
    c = layout.index("C")
    axes = tuple(a for a in range(4) if a != c)  # batch and spatial axes
    spatial = axes[1:]
    shape = lambda v: v.reshape([-1 if a == c else 1 for a in range(4)])
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)  # the input arrives NHWC: one transpose of the batch
    new_stats = {}
    for i in range(len(WIDTHS)):
        kernel = params[f"Conv_{i}"]["kernel"]
        x = jax.lax.conv_general_dilated(
            x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=(layout, "HWIO", layout)
        )
        bn = params[f"BatchNorm_{i}"]
        mean = jnp.mean(x, axes)
        if one_pass:
            var = jnp.maximum(jnp.mean(x * x, axes) - mean * mean, 0.0)
            scale = bn["scale"] * jax.lax.rsqrt(var + EPS)
            x = x * shape(scale) + shape(bn["bias"] - mean * scale)
        else:
            var = jnp.mean(jnp.square(x - shape(mean)), axes)
            x = (x - shape(mean)) * shape(bn["scale"] * jax.lax.rsqrt(var + EPS))
            x = x + shape(bn["bias"])
        old = stats[f"BatchNorm_{i}"]
        new_stats[f"BatchNorm_{i}"] = {
            "mean": MOMENTUM * old["mean"] + (1 - MOMENTUM) * mean,
            "var": MOMENTUM * old["var"] + (1 - MOMENTUM) * var,
        }
        x = jax.nn.relu(x)
        if i % 2 and reshape_pool:
            x = max_pool_2x2(x, spatial)
        elif i % 2:
            window = [2 if a in spatial else 1 for a in range(4)]
            x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "VALID")
    x = jnp.mean(x, axis=spatial)
    dense = params["Dense_0"]
    return x @ dense["kernel"] + dense["bias"], {"batch_stats": new_stats}


def flax_apply(**fields):
    model = IssueCNN(**fields)
    return functools.partial(model.apply, mutable=["batch_stats"])


def with_cpu(**options: Any) -> dict[str, Any]:
    return {**CPU, **options}


# name -> (apply(variables, images) -> (logits, {"batch_stats": ...}), compiler options)
VARIANTS = {
    "default (flax, jaxlib defaults)": (flax_apply(), {}),
    "opt (flax, CPU option of xla_options.py)": (flax_apply(), CPU),
    "opt + enable_fast_math": (flax_apply(), with_cpu(xla_cpu_enable_fast_math=True)),
    "opt + prefer_vector_width=512": (flax_apply(), with_cpu(xla_cpu_prefer_vector_width=512)),
    "opt + concurrency_optimized_scheduler": (
        flax_apply(),
        with_cpu(xla_cpu_enable_concurrency_optimized_scheduler=True),
    ),
    "opt + use_thunk_runtime=false": (flax_apply(), with_cpu(xla_cpu_use_thunk_runtime=False)),
    "opt + multi_thread_eigen=false": (flax_apply(), with_cpu(xla_cpu_multi_thread_eigen=False)),
    "opt + onednn (use_onednn, onednn_custom_call)": (
        flax_apply(),
        with_cpu(xla_cpu_use_onednn=True, xla_cpu_experimental_onednn_custom_call=True),
    ),
    "no YNNPACK fusions at all": (flax_apply(), {"xla_cpu_experimental_ynn_fusion_type": ""}),
    "opt, flax two-pass variance": (flax_apply(fast_variance=False), CPU),
    "opt, hand NHWC, two-pass BN": (functools.partial(lax_apply, one_pass=False), CPU),
    "opt, hand NHWC, one-pass folded BN": (lax_apply, CPU),
    "opt, hand NCHW, one-pass folded BN": (functools.partial(lax_apply, layout="NCHW"), CPU),
    "default, flax, reshape max-pool": (flax_apply(reshape_pool=True), {}),
    "opt, flax, reshape max-pool": (flax_apply(reshape_pool=True), CPU),
    "opt, hand NHWC, one-pass folded BN, reshape max-pool": (
        functools.partial(lax_apply, reshape_pool=True),
        CPU,
    ),
    "opt + concurrency scheduler, hand NHWC, one-pass BN, reshape max-pool": (
        functools.partial(lax_apply, reshape_pool=True),
        with_cpu(xla_cpu_enable_concurrency_optimized_scheduler=True),
    ),
    "default, bfloat16 compute": (flax_apply(dtype=jnp.bfloat16), {}),
    "opt, bfloat16 compute": (flax_apply(dtype=jnp.bfloat16), CPU),
}


def compiles_with(options: dict[str, Any]) -> str | None:
    """None if this jaxlib compiles a trivial program with ``options``, else the error."""
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros(())).compile(compiler_options=options)
    except Exception as e:  # "No such compile option", or a value it does not parse
        return str(e).splitlines()[0]
    return None


def build(apply, options, variables, images, labels):
    """The compiled gradient and GAM step of ``apply``, as thunks on fixed arguments."""

    def loss_fn(params, stats, x, y):
        logits, new = apply({"params": params, "batch_stats": stats}, x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, new["batch_stats"]

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    tx = optax.chain(gam_optax.gam(has_aux=True), optax.sgd(0.1, momentum=0.9))

    def gam_step(params, stats, opt_state, x, y):
        (loss, new_stats), g0 = grad_fn(params, stats, x, y)
        loss_at = lambda p: loss_fn(p, stats, x, y)
        updates, opt_state = tx.update(g0, opt_state, params, loss_fn=loss_at)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    params, stats = variables["params"], variables["batch_stats"]
    grad_args = (params, stats, images, labels)
    step_args = (params, stats, tx.init(params), images, labels)
    grad = jax.jit(grad_fn).lower(*grad_args).compile(compiler_options=options)
    step = jax.jit(gam_step).lower(*step_args).compile(compiler_options=options)
    return lambda: grad(*grad_args), lambda: step(*step_args)


def timed(thunk, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(thunk())
        times.append(time.perf_counter() - start)
    return times


def rel_diff(a, b) -> float:
    """||a - b|| / ||b||, all leaves together."""
    return float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)) / optax.tree.norm(b))


def run(names, rounds: int, grad_calls: int, step_calls: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((BATCH, 32, 32, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, CLASSES, BATCH), jnp.int32)
    variables = IssueCNN().init(jax.random.key(0), images)
    programs, compile_s = {}, {}
    for name in names:
        apply, options = VARIANTS[name]
        if error := compiles_with(options):
            print(f"skipped {name}: {error}", flush=True)
            continue
        start = time.perf_counter()
        try:
            programs[name] = build(apply, options, variables, images, labels)
        except Exception as e:
            print(f"skipped {name}: {str(e).splitlines()[0]}", flush=True)
            continue
        compile_s[name] = time.perf_counter() - start
        print(f"compiled {name} in {compile_s[name]:.1f} s", flush=True)
    grads = {name: grad()[1] for name, (grad, step) in programs.items()}  # also warms up
    for _, step in programs.values():
        jax.block_until_ready(step())
    times = {name: ([], []) for name in programs}
    for r in range(rounds):  # interleaved: every variant once per round
        for name, (grad, step) in programs.items():
            times[name][0].extend(timed(grad, grad_calls))
            times[name][1].extend(timed(step, step_calls))
        print(f"round {r + 1}/{rounds} done", flush=True)
    base = next(iter(programs))
    rows = []
    for name, (grad_times, step_times) in times.items():
        grad_ms = 1e3 * statistics.median(grad_times)
        step_ms = 1e3 * statistics.median(step_times)
        rows.append(
            dict(
                variant=name,
                grad_ms=grad_ms,
                step_ms=step_ms,
                diff=rel_diff(grads[name], grads[base]),
                compile_s=compile_s[name],
            )
        )
    for row in rows:
        row["x_default"] = row["grad_ms"] / rows[0]["grad_ms"]
    return rows


def make_parser() -> argparse.ArgumentParser:
    """The study's options."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.studies.cpu_gap",
        description=__doc__.split("\n\n")[0],
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds over the variants (medians)"
    )
    parser.add_argument("--grad-calls", type=int, default=5, help="gradients per round")
    parser.add_argument("--step-calls", type=int, default=3, help="GAM steps per round")
    parser.add_argument(
        "--only", nargs="+", help="variants whose name contains one of these (and the default)"
    )
    return parser


def main(argv=None) -> list[dict[str, Any]]:
    args = make_parser().parse_args(argv)
    names = [n for n in VARIANTS if not args.only or any(w in n for w in args.only)]
    names = [next(iter(VARIANTS)), *[n for n in names if n != next(iter(VARIANTS))]]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, load {os.getloadavg()}")
    rows = run(names, args.rounds, args.grad_calls, args.step_calls)
    print(f"load average after: {os.getloadavg()}")
    header = ("variant", "gradient ms", "GAM step ms", "x default gradient", "GAM / gradient")
    cells = [
        (
            r["variant"],
            f"{r['grad_ms']:.1f}",
            f"{r['step_ms']:.1f}",
            f"{r['x_default']:.2f}",
            f"{r['step_ms'] / r['grad_ms']:.2f}",
            f"{r['diff']:.1e}",
            f"{r['compile_s']:.1f}",
        )
        for r in rows
    ]
    print(tables.table((*header, "grad diff", "compile s"), cells, markdown=True))
    return rows


if __name__ == "__main__":
    main()
