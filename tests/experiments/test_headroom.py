"""The headroom benchmark's protocol: radii chosen on validation, paired test runs."""

import json
import re
import shutil
import threading
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
import scipy.stats

from experiments import configs, headroom, reproduce


def fake_accuracy(spec: str, seed: int, validation: int | None) -> float:
    """A made-up landscape: sam is best at rho=0.1, gam at rho_prime=0.05 (on validation)."""
    best = {"sam:rho=0.1": 0.9, "gam:rho_prime=0.05": 0.92}.get(spec, 0.8)
    return best - 0.01 * (seed % 100) + (0.0 if validation else 0.05)


@pytest.fixture
def runs(monkeypatch):
    calls = []

    def run_one(overrides, seed, epochs, workdir, probe_radius, **kwargs):
        assert kwargs["measure"] == (kwargs["validation_examples"] is None)
        configs.override(kwargs["base"], overrides)  # a valid override of the setting's config
        spec = reproduce.describe(overrides)
        calls.append((spec, seed, kwargs["validation_examples"], overrides))
        accuracy = fake_accuracy(spec, seed, kwargs["validation_examples"])
        keys = ("best_test_accuracy", "train_loss", "trace", "first_order_flatness", "wall_time")
        return {
            "optimizer": spec,
            "seed": seed,
            "final_test_accuracy": accuracy,
            "top_eigenvalue": 10.0 + seed + (spec != "sgd"),
            **dict.fromkeys(keys, 1.0),
        }

    monkeypatch.setattr(reproduce, "run_one", run_one)
    return calls


def test_radii_are_chosen_on_validation_and_tested_paired_by_seed(tmp_path, runs, capsys):
    argv = ["--setting", "noise40", "--workdir", str(tmp_path), "--seeds", "3"]
    argv += ["--tune-seeds", "2", "--optimizers", "sgd", "sam", "gam", "reuse"]
    [summary] = headroom.main(argv)
    assert summary["choices"] == {
        "sgd": "",
        "sam": "rho=0.1",
        "gam": "rho_prime=0.05",
        "reuse": "rho_prime=0.05",  # reuse takes gam's radius
    }
    tuning = [(spec, seed) for spec, seed, validation, _ in runs if validation]
    testing = [(spec, seed) for spec, seed, validation, _ in runs if not validation]
    # Every grid value on validation (200 examples held out), with seeds no test run uses.
    assert {v for _, _, v, _ in runs if v} == {200}
    assert sorted(tuning) == sorted(
        (reproduce.describe(headroom.overrides(o, v)), s)
        for o in ("sam", "gam")
        for v in headroom.AXES[o].values
        for s in (100, 101)
    )
    reuse = "reuse:every=5,alpha=1.0,rescale=False,gam.rho_prime=0.05"
    chosen = ["sgd", "sam:rho=0.1", "gam:rho_prime=0.05", reuse]
    assert sorted(testing) == sorted((spec, s) for spec in chosen for s in range(3))
    # Each run is the config overrides it applies: reuse's rule around gam's choice.
    reuse_runs = [o for spec, _, validation, o in runs if spec == reuse and not validation]
    assert len(reuse_runs) == 3 and all(
        o
        == {
            "optimizer": "reuse",
            "reuse.every": 5,
            "reuse.alpha": 1.0,
            "reuse.rescale": False,
            "gam.rho_prime": 0.05,
        }
        for o in reuse_runs
    )
    out = capsys.readouterr().out
    # Paired differences to sgd: sam's test accuracy is 0.1 above sgd's on every seed.
    assert "| sam | +0.1000 [+0.1000, +0.1000] | +1.00 [+1.00, +1.00] |" in out
    assert "| sam | rho=0.1 | 0.8950 ± 0.0050 | chosen |" in out  # seeds 100, 101
    saved = json.loads((tmp_path / "noise40" / "summary.json").read_text())
    assert saved["choices"] == summary["choices"] and len(saved["results"]) == 12


def test_jobs_run_each_run_once_in_the_workers_and_change_no_result(tmp_path, runs, monkeypatch):
    """--jobs 2: the workers run every run the sequential pass then reads (cached, for real),
    each once, and the summary is --jobs 1's. The digits setting leaves out gam_penalty."""
    fake, ran = reproduce.run_one, []

    def run_one(*args, **kwargs):
        ran.append(threading.current_thread() is threading.main_thread())
        return fake(*args, **kwargs)

    pools = []

    def pool(jobs, context, initializer, initargs):
        assert context.get_start_method() == "spawn" and initargs[0].name == "compilation_cache"
        pools.append(jobs)
        return futures.ThreadPoolExecutor(jobs)  # the test's fake run_one lives in this process

    monkeypatch.setattr(reproduce, "run_one", run_one)
    monkeypatch.setattr(futures, "ProcessPoolExecutor", pool)
    argv = ["--setting", "noise40", "--seeds", "3", "--tune-seeds", "2"]
    [alone] = headroom.main([*argv, "--workdir", str(tmp_path / "alone")])
    sequential = sorted((spec, seed, v) for spec, seed, v, _ in runs)
    assert not pools and all(ran)
    runs.clear(), ran.clear()
    [parallel] = headroom.main([*argv, "--workdir", str(tmp_path / "parallel"), "--jobs", "2"])
    assert pools == [2]
    in_workers = sorted((c[0], c[1], c[2]) for c, main in zip(runs, ran, strict=True) if not main)
    in_main = sorted((c[0], c[1], c[2]) for c, main in zip(runs, ran, strict=True) if main)
    assert in_workers == in_main == sequential  # each run once in a worker, then read
    assert parallel == alone
    assert list(alone["choices"]) == list(headroom.DIGITS)  # no gam_penalty on digits
    assert len(sequential) == 4 * 5 * 2 + 7 * 3  # 4 grids of 5 values x 2 seeds, 7 x 3 tests


def test_a_worker_that_dies_is_one_line_saying_what_to_do(tmp_path, monkeypatch, capsys):
    def run_one(*args, **kwargs):
        raise BrokenProcessPool("A process in the process pool was terminated abruptly")

    monkeypatch.setattr(reproduce, "run_one", run_one)
    monkeypatch.setattr(
        futures, "ProcessPoolExecutor", lambda jobs, *_: futures.ThreadPoolExecutor(jobs)
    )
    with pytest.raises(SystemExit) as exited:
        headroom.main(["--setting", "noise40", "--workdir", str(tmp_path), "--jobs", "2"])
    assert str(exited.value).startswith("error: a --jobs worker process died (killed, or out of")
    assert "run the same command again to continue" in str(exited.value)


def test_paired_differences_and_their_interval():
    results = [
        {"optimizer": "sgd", "name": "sgd", "seed": s, "final_test_accuracy": a}
        for s, a in enumerate([0.90, 0.92, 0.91])
    ] + [
        {"optimizer": "gam:x", "name": "gam", "seed": s, "final_test_accuracy": a}
        for s, a in enumerate([0.93, 0.93, 0.95])
    ]
    diffs = headroom.paired_differences(results, "final_test_accuracy")
    np.testing.assert_allclose(diffs["gam"], [0.03, 0.01, 0.04])
    low, high = reproduce.interval(diffs["gam"])
    half = 4.302652729911275 * np.std([0.03, 0.01, 0.04], ddof=1) / np.sqrt(3)  # t(0.975, 2)
    np.testing.assert_allclose([low, high], [0.08 / 3 - half, 0.08 / 3 + half])


def test_seeds_needed_for_a_half_width_is_the_fewest_that_reach_it():
    half_width = lambda std, n: scipy.stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)
    for std in (0.0, 0.001, 0.003, 0.0144, 0.025):
        n = reproduce.seeds_needed(std, 0.003)
        assert half_width(std, n) <= 0.003 and (n == 2 or half_width(std, n - 1) > 0.003)
    # About (1.96 std / h)^2 for many seeds: std 1.44 points -> 89 + the t correction.
    assert 89 <= reproduce.seeds_needed(0.0144, 0.003) <= 92
    # The table's column, from an interval of 10 seeds with std 1.44 points: its seeds.
    half, needed = half_width(0.0144, 10), reproduce.seeds_needed(0.0144, 0.003)
    row = {"mean": 0.0779, "low": 0.0779 - half, "high": 0.0779 + half, "n": 10}
    table = headroom.comparison_table({"gam - sgd": {"final_test_accuracy": row}})
    assert f"| gam - sgd | 10 | +7.79 [+6.76, +8.82] | 1.03 | {needed} |" in table
    with pytest.raises(ValueError, match="half_width must be > 0, got 0"):
        reproduce.seeds_needed(0.01, 0)


def test_choice_overrides_and_bad_arguments(tmp_path, capsys):
    assert headroom.choose({"a": [0.5, 0.7], "b": [0.6, 0.6], "c": [0.1]}) == "a"  # tie: first
    assert headroom.overrides("sgd") == {"optimizer": "sgd"}
    assert headroom.overrides("sam_gam", 0.1) == {
        "optimizer": "sam_gam",
        "sam_gam.sam_rho": 0.1,
        "sam_gam.hvp_step": 0.1,
    }
    assert headroom.choice("sam_gam", 0.1) == "sam_rho=0.1,hvp_step=0.1"
    assert headroom.choice("reuse", 0.05) == "rho_prime=0.05" and headroom.choice("sgd", None) == ""
    # Every grid value of every method is a valid override of every setting's config.
    for setting in headroom.SETTINGS.values():
        for method in headroom.OPTIMIZERS:
            base = configs.override(setting.base(), headroom.BASES.get(method, {}))
            leader = headroom.FOLLOWERS.get(method, (method,))[0]
            axis = headroom.AXES.get(leader)
            for value in axis.values if axis else [None]:
                config = configs.override(base, headroom.overrides(method, value))
                assert config.optimizer == headroom.ALIASES.get(method, method)
    with pytest.raises(SystemExit):
        headroom.main(["--setting", "noise40", "--optimizers", "sam", "gam"])
    assert "must include sgd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        headroom.main(["--setting", "lowdata", "--optimizers", "sgd", "reuse"])
    assert "reuse takes gam's radius: add gam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        headroom.main(["--setting", "noise40", "--jobs", "0"])
    assert "--jobs must be >= 1 (runs at a time), got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        headroom.main(["--setting", "noise40", "--config.gam.rhoo=0.1"])
    assert "setting noise40: --config=" in capsys.readouterr().err  # checked before any run
    # The flatness probe's radius is --probe-radius; --rho would read as SAM's radius.
    for main, argv in ((headroom.main, ["--setting", "noise40"]), (reproduce.main, [])):
        with pytest.raises(SystemExit):
            main([*argv, "--rho", "0.1"])
        assert "--rho is now --probe-radius" in capsys.readouterr().err


def done_seed1(capfd) -> list[str]:
    """The lines saying a run of seed 1 is done (with its seconds) since the last read."""
    return re.findall(r"^done mnist1d/test/sgd-seed1 \(\d+ s\)$", capfd.readouterr().err, re.M)


def test_jobs_train_in_spawned_processes_as_one_process_does(tmp_path, capfd):
    """--jobs 2 for real: two spawned workers train two tiny test runs; one of them, trained
    again in this process, gives the same result (a run is its config, wherever it runs)."""
    argv = ["--setting", "mnist1d", "--optimizers", "sgd", "--seeds", "2", "--epochs", "1"]
    argv += ["--flatness-examples", "32", "--config.steps_per_epoch=2", "--config.batch_size=32"]
    argv += ["--config.num_test_examples=64", "--config.eval_batch_size=64"]
    argv += ["--workdir", str(tmp_path)]
    [parallel] = headroom.main([*argv, "--jobs", "2"])
    # Each run is reported twice: by the worker that trained it, then read by the main pass.
    assert len(done_seed1(capfd)) == 2
    shutil.rmtree(tmp_path / "mnist1d" / "test" / "sgd-seed1")
    [alone] = headroom.main(argv)  # seed 0 from the cache, seed 1 trained here
    assert len(done_seed1(capfd)) == 1
    theirs, mine = parallel["results"][1], alone["results"][1]
    assert mine["seed"] == theirs["seed"] == 1 and mine["config"] == theirs["config"]
    assert mine["final_test_accuracy"] == theirs["final_test_accuracy"]
    np.testing.assert_allclose(mine["top_eigenvalue"], theirs["top_eigenvalue"], rtol=1e-5)
    assert mine["wall_time"] != theirs["wall_time"]  # trained twice, not read back


def test_micro_batches_run_the_protocol_once_per_m_in_its_own_workdir(tmp_path, capsys):
    """--micro-batches 0 8: each m's runs in WORKDIR/m<M> with config.micro_batch = m (sgd at
    m = 8: BatchNorm over 8 examples, another result), then the m-sharpness table."""
    argv = ["--setting", "mnist1d", "--optimizers", "sgd", "--seeds", "2", "--epochs", "1"]
    argv += ["--flatness-examples", "32", "--config.steps_per_epoch=2", "--config.batch_size=32"]
    argv += ["--config.num_test_examples=64", "--config.eval_batch_size=64"]
    whole, micro = headroom.main([*argv, "--workdir", str(tmp_path), "--micro-batches", "0", "8"])
    assert [r["config"]["micro_batch"] for r in whole["results"]] == [0, 0]
    assert [r["config"]["micro_batch"] for r in micro["results"]] == [8, 8]
    assert (tmp_path / "m0" / "mnist1d" / "summary.json").exists()
    assert (tmp_path / "m8" / "mnist1d" / "summary.json").exists()
    accuracy = lambda s: [r["final_test_accuracy"] for r in s["results"]]
    assert accuracy(whole) != accuracy(micro)
    out = capsys.readouterr().out
    assert "## mnist1d: m-sharpness" in out and "| sgd | 8 | 2 |" in out


def test_micro_batch_table_pairs_each_m_with_the_first_and_with_sgd():
    run = lambda name, seed, acc, eig=1.0: dict(
        name=name, seed=seed, final_test_accuracy=acc, top_eigenvalue=eig
    )
    whole = [run("sgd", 0, 0.50), run("sgd", 1, 0.60), run("sam", 0, 0.52), run("sam", 1, 0.64)]
    at_8 = [run("sgd", 0, 0.51), run("sgd", 1, 0.59), run("sam", 0, 0.55), run("sam", 1, 0.69)]
    table = headroom.micro_batch_table({0: whole, 8: at_8})
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table.splitlines()}
    # sam at 8 against sam at the whole batch: +3 and +5 points, mean +4.00; against sgd at 8:
    # +4 and +10, mean +7.00; the t interval (n = 2, t = 12.706) of +-1 point: +-12.71.
    assert "+4.00 [-8.71, +16.71]" in rows[("sam", "8")]
    assert "+7.00 [-31.12, +45.12]" in rows[("sam", "8")]
    assert rows[("sgd", "whole batch")].rstrip().endswith("|  |  |")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--micro-batches", "7"], "--micro-batches 7, setting mnist1d: config.micro_batch=7 "),
        (
            ["--micro-batches", "0", "10", "--optimizers", "sgd", "gam", "reuse"],
            "--micro-batches 10, setting mnist1d: config.micro_batch=10: reuse keeps",
        ),
        (["--micro-batches", "-2"], "micro_batch must be an integer >= 0"),
    ],
)
def test_micro_batches_that_cannot_run_fail_before_any_run(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        headroom.main(["--setting", "mnist1d", "--workdir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
