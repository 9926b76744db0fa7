"""The step benchmark measures the training program's real step for every optimizer."""

import types

import numpy as np
import pytest

from experiments import benchmark, xla_options


def test_benchmark_times_every_optimizer_on_the_same_step(capsys):
    rows = benchmark.main(
        ["--setting", "tiny", "--optimizers", "gam", "--warmup", "0", "--repeats", "1"]
    )
    assert [r["optimizer"] for r in rows] == ["sgd", "gam"]  # sgd first: the baseline
    assert rows[0]["vs_sgd"] == 1.0
    for r in rows:
        assert r["step_ms"] > 0 and r["compile_s"] > 0
        assert r["vs_sgd"] == pytest.approx(r["step_ms"] / rows[0]["step_ms"])
        # One step from the same initial state and batch: the same g0 pass, the same loss,
        # up to float32 reassociation in another program (sums of ~100 terms per value:
        # ~100 eps = 1e-5 relative, whatever kernels the CPU gets).
        assert r["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    peak = {r["optimizer"]: r["peak_mb"] for r in rows}
    assert peak["gam"] >= peak["sgd"] > 0  # GAM holds more gradients than SGD
    assert "x sgd" in capsys.readouterr().out


def test_cpu_options_are_used_only_where_they_compile():
    options = xla_options.fast_compiler_options("cpu")
    assert options in ({}, xla_options.CPU_CONVOLUTIONS_IN_XLA)
    assert xla_options.fast_compiler_options("gpu") == {}
    assert not xla_options._compiles_with((("xla_no_such_option_at_all", "1"),))


def test_benchmark_times_the_data_parallel_steps_against_one_device():
    quick = ["--setting", "tiny", "--optimizers", "gam", "--warmup", "0", "--repeats", "1"]
    rows = benchmark.main([*quick, "--parallel", "none", "jit", "--average", "gradients"])
    layouts = ["none", "jit/gradients"]
    assert [(r["parallel"], r["optimizer"]) for r in rows] == [
        (layout, optimizer) for layout in layouts for optimizer in ("sgd", "gam")
    ]
    one = {r["optimizer"]: r for r in rows if r["parallel"] == "none"}
    for r in rows:
        assert r["vs_none"] == pytest.approx(r["step_ms"] / one[r["optimizer"]]["step_ms"])
        # The reported loss is g0's. Under jit, with the global batch's augmentation and
        # BatchNorm statistics, it is the one-device loss (float32, summed in another order
        # over the devices: the 1e-5 bound of the test above).
        if r["parallel"] == "jit/gradients":
            assert r["loss"] == pytest.approx(one[r["optimizer"]]["loss"], rel=1e-5)


def test_amortised_optimizers_are_timed_over_whole_cycles():
    assert benchmark.period("reuse_gam_5") == 5 and benchmark.period("gam") == 1
    calls = []

    class Compiled:  # stands in for the compiled step: counts the steps it runs
        def __call__(self, state, batch, rng):
            calls.append(1)
            return state, {"loss": np.zeros(())}

        def memory_analysis(self):
            raise NotImplementedError

    class Jitted:
        def lower(self, *args):
            return types.SimpleNamespace(compile=lambda compiler_options: Compiled())

    args = ({"w": np.zeros(3)}, {}, None)
    result = benchmark.measure(Jitted(), args, {}, warmup=1, repeats=3, cycle=5)
    assert len(calls) == 5 * 1 + 5 * 3  # warm-up and timed repeats are whole cycles
    assert result["step_ms"] > 0
    rows = benchmark.main(
        ["--setting", "tiny", "--optimizers", "reuse_gam_2", "--warmup", "0", "--repeats", "1"]
    )
    assert [r["optimizer"] for r in rows] == ["sgd", "reuse_gam_2"]


def test_costs_table_and_the_accelerator_setting_run_on_tiny_shapes(capsys):
    """--accelerator --smoke: ResNet-18 and WRN-28-10 code paths, float32 and bfloat16."""
    rows = ["sgd", "gam"]
    results = benchmark.main(["--accelerator", "--smoke", "--rounds", "1", "--rows", *rows])
    cases = [(r["setting"], r["dtype"]) for r in results]
    assert cases == [case for case in benchmark.ACCELERATOR_CASES for _ in rows]
    for r in results:
        assert r["compile_s"] > 0 and r["step_ms"] > 0 and r["hlo_lines"] > 0
        if r["row"] == "sgd":
            assert r["compile_x"] == r["step_x"] == r["temp_x"] == 1.0
            assert r["extra_copies"] == 0.0
        else:  # GAM's program is larger than SGD's
            assert r["hlo_x"] > 1.5
    out = capsys.readouterr().out
    assert "extra param copies" in out and "bfloat16" in out
