"""The step benchmark measures the training program's real step for every optimizer."""

import re
import types
import warnings

import jax
import numpy as np
import pytest

from experiments import benchmark, xla_options
from gam_optax._reuse import CPU_CONDITIONAL_WARNING


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
    out, err = capsys.readouterr()
    assert "x sgd" in out
    # A line per row as it is measured, with the seconds since the command started.
    measured = re.findall(r"^ +(\d+) s  measured (\w+) ", err, re.M)
    assert [name for _, name in measured] == ["sgd", "gam"]
    assert int(measured[0][0]) <= int(measured[1][0])


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
    """--accelerator --smoke: ResNet-18 and WRN-28-10 code paths, float32 and bfloat16, and
    the kernels per step that a GPU run reports (here XLA:CPU's), without a GPU."""
    rows = ["sgd", "gam"]
    argv = ["--accelerator", "--smoke", "--rounds", "1", "--rows", *rows, "--leaves"]
    results = benchmark.main([*argv, "--compile-rounds", "1"])
    arithmetic = [r for r in results if r["table"] == "arithmetic"]
    assert [r["row"] for r in arithmetic] == rows  # part 1: the arithmetic of the rows asked
    assert not [r for r in results if r["table"] == "arithmetic sweep"]  # --leaves: none
    steps = [r for r in results if r["table"] == "step"]
    cases = [(r["setting"], r["dtype"]) for r in steps]
    assert cases == [case for case in benchmark.ACCELERATOR_CASES for _ in rows]
    for r in steps:
        assert r["compile_s"] > 0 and r["step_ms"] > 0 and r["hlo_lines"] > 0
        assert 0 < r["fusions"] <= r["kernels"]  # every fusion is a kernel
        if r["row"] == "sgd":
            assert r["compile_x"] == r["step_x"] == r["temp_x"] == r["kernels_x"] == 1.0
            assert r["extra_copies"] == 0.0
        else:  # GAM's program is larger than SGD's: 4 gradients, and its arithmetic (the
            # kernels less so: on XLA:CPU the augmentation's random bits are 5 threefry loops)
            assert r["hlo_x"] > 1.5 and r["kernels_x"] > 1.2
    out = capsys.readouterr().out
    assert "extra param copies" in out and "bfloat16" in out and "kernels/step" in out
    lines = out.splitlines()
    loads = [line.split() for line in lines if line.startswith("load average")]
    assert [words[2] for words in loads] == ["before:", "after:"]
    warned = any(line.startswith("WARNING") for line in lines)  # above 1.5 only
    assert warned == (max(float(words[3]) for words in loads) > benchmark.HIGH_LOAD)


def test_a_load_average_above_the_standard_warns():
    assert benchmark.load_warning(0.3, 1.5) is None
    for before, after in ((1.6, 0.2), (0.2, 1.6)):
        warning = benchmark.load_warning(before, after)
        assert warning.startswith("WARNING") and "not fit to publish" in warning
        assert f"{before:.2f} before, {after:.2f} after" in warning


# A module as XLA prints it, cut down: a nested fusion (inside a fusion's body: part of that
# kernel), a while loop run 3 times, a conditional whose larger branch has 3 kernels.
HLO = """HloModule jit_f, entry_computation_layout={(f32[4]{0}, s32[])->f32[4]{0}}

FileNames
1 "/work/experiments/benchmark.py"

StackFrames
1 {file_location_id=1 parent_frame_id=1}

%fused_computation (param_0: f32[4]) -> f32[4] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %sine.0 = f32[4]{0} sine(%param_0)
}

%fused_computation.1 (param_0.1: f32[4]) -> f32[4] {
  %param_0.1 = f32[4]{0} parameter(0)
  %nested = f32[4]{0} fusion(%param_0.1), kind=kLoop, calls=%fused_computation
  ROOT %cosine.0 = f32[4]{0} cosine(%nested)
}

%body.1 (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4]{0} get-tuple-element(%p), index=1
  %f.1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_computation.1
  %c = f32[4]{0} copy(%f.1)
  %i.1 = s32[] fusion(%i), kind=kLoop, calls=%fused_computation.2
  ROOT %t = (s32[], /*index=1*/f32[4]{0}) tuple(%i.1, %c)
}

%condition.1 (p.1: (s32[], f32[4])) -> pred[] {
  %p.1 = (s32[], f32[4]{0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] fusion(%i.2), kind=kLoop, calls=%fused_computation.3
}

%branch_a (y.1: f32[4]) -> f32[4] {
  %y.1 = f32[4]{0} parameter(0)
  ROOT %a = f32[4]{0} fusion(%y.1), kind=kLoop, calls=%fused_computation.4
}

%branch_b (y.2: f32[4]) -> f32[4] {
  %y.2 = f32[4]{0} parameter(0)
  %b = f32[4]{0} fusion(%y.2), kind=kLoop, calls=%fused_computation.5
  %g = f32[4]{0} custom-call(%b), custom_call_target="__cublas$gemm"
  ROOT %b.1 = f32[4]{0} fusion(%g), kind=kCustom, calls=%fused_computation.6
}

ENTRY %main.9 (x.1: f32[4], k: s32[]) -> f32[4] {
  %x.1 = f32[4]{0} parameter(0)
  %k = s32[] parameter(1)
  %zero = s32[] constant(0)
  %f = f32[4]{0} fusion(%x.1), kind=kLoop, calls=%fused_computation
  %t.1 = (s32[], f32[4]{0}) tuple(%zero, %f)
  %w = (s32[], f32[4]{0}) while(%t.1), condition=%condition.1, body=%body.1, \
backend_config={"known_induction_variable":{"tuple_index":"0"},"known_trip_count":{"n":"3"}}
  %y = f32[4]{0} get-tuple-element(%w), index=1
  %y.3 = f32[4]{0} bitcast(%y)
  ROOT %r = f32[4]{0} conditional(%k, %y.3, %y.3), branch_computations={%branch_a, %branch_b}
}
"""


def test_program_counts_counts_fusions_once_and_kernels_per_step():
    counts = benchmark.program_counts(HLO)
    # the computations' lines: not the module's header, the 9 blank lines, the tables' 4
    assert counts["hlo_lines"] == len(HLO.splitlines()) - 1 - 9 - 4
    # fusions: ENTRY 1, the loop's body 2 and condition 1, the branches 1 and 2 (the nested
    # one is not a kernel of its own)
    assert counts["fusions"] == 7
    # kernels per step: ENTRY 1; the loop 3 x (2 fusions + a copy) and its condition 4 x 1;
    # the conditional's larger branch 3 (a custom call is a kernel); no bitcast, tuple...
    assert counts["kernels"] == 1 + 3 * 3 + 4 * 1 + 3
    # Without a known trip count the loop counts once (its condition twice).
    unknown = HLO.replace(',"known_trip_count":{"n":"3"}', "")
    assert benchmark.program_counts(unknown)["kernels"] == 1 + 3 + 2 + 3


def test_costs_measures_the_optimizers_arithmetic_alone_on_a_tiny_tree(capsys):
    """Part 1 of --costs (its CLI path: the smoke test above) on a one-conv CNN's parameters
    (5 leaves), then on 1 and 2 leaves."""
    args = benchmark.make_parser().parse_args(
        ["--costs", "--compile-rounds", "1", "--leaves", "1", "2"]
    )
    tiny = ("small_cnn", {"widths": (4,)}, 1, (4, 4, 1), 2)
    results = benchmark.run_arithmetic(args, tiny)
    table = [r for r in results if r["table"] == "arithmetic"]
    assert [r["row"] for r in table] == list(benchmark.ARITHMETIC)  # sgd first
    leaves = benchmark.model_parameters(tiny)
    assert {r["leaves"] for r in table} == {len(jax.tree.leaves(leaves))}
    sgd = table[0]
    assert sgd["fusions"] > 0 and sgd["hlo_lines"] > 0 and sgd["compile_s"] > 0
    for r in table:
        assert r["fusions_x"] == r["fusions"] / sgd["fusions"]
        assert r["hlo_x"] == r["hlo_lines"] / sgd["hlo_lines"]
        if r["row"] != "sgd":  # each does SGD's update and arithmetic of its own
            assert r["fusions"] > sgd["fusions"] and r["hlo_lines"] > sgd["hlo_lines"]
    sweep = {(r["row"], r["leaves"]): r for r in results if r["table"] == "arithmetic sweep"}
    assert sorted(sweep) == sorted((row, n) for row in benchmark.SWEEP_ROWS for n in (1, 2))
    for row in ("sgd", "gam"):  # the counts see the leaves (today's gam: ~20 fusions each)
        for key in ("fusions", "kernels", "hlo_lines"):
            assert sweep[row, 2][key] > sweep[row, 1][key]
    out = capsys.readouterr().out
    lines = out.splitlines()
    for row in benchmark.ARITHMETIC:  # a line of the table per transformation
        assert sum(line.startswith(f"{row} ") for line in lines) == 1
    assert "compile s (load-dependent)" in out and "fusions per leaf" in out


REUSE_ROW = "reuse(gam) in-step cond"


def test_the_costs_say_the_expected_reuse_warning_once_in_words(monkeypatch, capsys):
    """The row reuse(gam) in-step cond measures reuse's lax.cond on purpose: gam_optax's
    UserWarning about it (on a CPU) is one line of words, said once per process, and every
    row prints progress lines with the seconds elapsed as it is compiled and timed."""
    monkeypatch.setattr(benchmark, "_SAID", set())
    argv = ["--costs", "--setting", "tiny", "--rows", "sgd", REUSE_ROW, "--rounds", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = benchmark.main([*argv, "--leaves", "--compile-rounds", "1"])
        benchmark._compile_row(REUSE_ROW, "tiny", None, "float32", None)  # once more
    assert [r["row"] for r in results if r["table"] == "step"] == ["sgd", REUSE_ROW]
    assert not [w for w in caught if str(w.message) == CPU_CONDITIONAL_WARNING]
    out, err = capsys.readouterr()
    assert out.count(benchmark.REUSE_NOTE) == (jax.default_backend() == "cpu")
    assert "UserWarning" not in out + err
    lines = re.findall(r"^ +\d+ s  (.*)$", err, re.M)
    assert lines[0] == "arithmetic sgd (8 leaves): compile 1 of 1"
    for row in ("sgd", REUSE_ROW):
        assert sum(line.startswith(f"compiled {row} ") for line in lines) == (row == REUSE_ROW) + 1
        for done in ("warm-up", "round 1 of 1"):
            assert sum(line.startswith(f"timed {row} ({done}): ") for line in lines) == 1


def test_the_warning_filter_lets_every_other_warning_through(monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "_SAID", set())

    def compile_fn():
        for message in (CPU_CONDITIONAL_WARNING, "another", CPU_CONDITIONAL_WARNING):
            warnings.warn(message, stacklevel=1)
        return 3

    with pytest.warns(UserWarning) as record:
        assert benchmark.noted(compile_fn) == 3
    assert [str(w.message) for w in record] == ["another"]
    assert capsys.readouterr().out == benchmark.REUSE_NOTE + "\n"


def test_m_sharpness_rows_cost_both_strategies_and_leave_out_an_m_that_does_not_divide(capsys):
    """--m-sharpness: part 2 alone (no arithmetic table); the tiny setting's batch of 16
    takes m = 8 in both strategies, and m = 32 is left out with the reason."""
    rows = ["sgd", "sam m=8 parallel", "sam m=8 sequential", "sam m=32 parallel"]
    results = benchmark.main(
        ["--m-sharpness", "--setting", "tiny", "--rounds", "1", "--rows", *rows]
    )
    assert [r["row"] for r in results] == rows[:3]
    assert all(r["table"] == "step" for r in results)
    assert (
        "sam m=32 parallel left out: m=32 does not divide the batch of 16"
        in capsys.readouterr().out
    )
    for r in results:
        assert r["temp_mib"] > 0 and r["step_ms"] > 0
