"""The headroom benchmark's wide radius grids: at least 5 values over 10x, and the choice
extended until it is interior; the AdamW methods and the paired comparisons."""

import json

import numpy as np
import pytest

from experiments import configs, headroom, reproduce
from experiments.configs import default


def test_every_grid_has_five_values_over_a_decade_and_is_a_valid_override():
    for name, axis in headroom.AXES.items():
        assert len(axis.values) >= 5 and axis.values[-1] / axis.values[0] >= 10, name
        assert list(axis.values) == sorted(axis.values)
        for value in axis.values:
            config = configs.override(default.get_config(), headroom.overrides(name, value))
            section = config[headroom.ALIASES.get(name, name)]
            assert all(section[field] == value for field in axis.fields), name
    assert headroom.overrides("gam_adamw", 0.05) == {"optimizer": "gam", "gam.rho_prime": 0.05}
    assert headroom.overrides("gam_penalty", 0.3) == {
        "optimizer": "gam_penalty",
        "gam_penalty.penalty": 0.3,
    }
    assert headroom.AXES["sam_gam"].choice(0.1) == "sam_rho=0.1,hvp_step=0.1"


def test_bracketed_and_beyond():
    assert headroom.bracketed([0.1, 0.3, 0.2]) == (1, None)
    assert headroom.bracketed([0.1, 0.2, 0.3]) == (2, -1)
    assert headroom.bracketed([0.3, 0.2, 0.1]) == (0, 0)
    assert headroom.bracketed([0.3, 0.3, 0.3]) == (1, None)  # a plateau: interior
    assert headroom.bracketed([0.3, 0.1, 0.3]) == (2, -1)  # both ends: the high one
    assert headroom.beyond([0.02, 0.05, 0.1, 0.2, 0.5], -1) == 1.2  # 0.5 * 2.5, 2 digits
    assert headroom.beyond([0.02, 0.05, 0.1, 0.2, 0.5], 0) == 0.008
    assert headroom.beyond([0.03, 0.1, 0.3, 1.0, 3.0], -1) == 9.0


def peaked(best: float):
    """Validation accuracy falling off in log-distance from ``best``, recording the calls."""
    calls = []

    def evaluate(value: float) -> list[float]:
        calls.append(value)
        return [0.9 - 0.01 * abs(np.log(value / best))] * 2

    return evaluate, calls


def test_a_grid_whose_best_is_an_end_is_extended_until_interior():
    axis = headroom.Axis(("rho",), (0.02, 0.05, 0.1, 0.2, 0.5))
    evaluate, calls = peaked(best=2.0)  # three extensions above: 1.2, 2.9, then 7.0
    accuracies, choice, interior = headroom.tune(axis, evaluate, max_extensions=3)
    assert calls[5:] == [1.2, 2.9, 7.0] and choice == 2.9 and interior
    evaluate, calls = peaked(best=2.0)  # capped at one extension: left at the end
    accuracies, choice, interior = headroom.tune(axis, evaluate, max_extensions=1)
    assert calls[5:] == [1.2] and choice == 1.2 and not interior
    evaluate, calls = peaked(best=1.5)  # 1.2 -> 2.9: 1.2 is best but 2.9 now brackets it
    accuracies, choice, interior = headroom.tune(axis, evaluate, max_extensions=3)
    assert calls[5:] == [1.2, 2.9] and choice == 1.2 and interior
    assert list(accuracies) == [0.02, 0.05, 0.1, 0.2, 0.5, 1.2, 2.9]
    evaluate, calls = peaked(best=0.001)  # below: 0.008, 0.0032, 0.0013, then the cap
    accuracies, choice, interior = headroom.tune(axis, evaluate, max_extensions=3)
    assert calls[5:] == [0.008, 0.0032, 0.0013]
    assert choice == 0.0013 and not interior and next(iter(accuracies)) == choice
    evaluate, calls = peaked(best=0.1)  # interior at once: no extension
    assert headroom.tune(axis, evaluate, max_extensions=3)[1:] == (0.1, True)
    assert len(calls) == 5


@pytest.fixture
def runs(monkeypatch):
    """A fake ``reproduce.run_one``: sam peaks at rho=1.2 (past the grid), every other
    method at a fixed accuracy; the AdamW runs are seen with AdamW's config."""
    calls = []

    def run_one(overrides, seed, epochs, workdir, probe_radius, **kwargs):
        base = kwargs["base"]
        configs.override(base, overrides)  # a valid override of the setting's config
        spec = reproduce.describe(overrides)
        calls.append((spec, seed, kwargs["validation_examples"], workdir.name, base))
        if spec.startswith("sam:"):
            value = float(spec.split("=")[1])
            accuracy = 0.9 - 0.01 * abs(np.log(value / 1.2))
        else:
            accuracy = {"sgd": 0.8, "adamw": 0.82}.get(spec, 0.85)
            accuracy += 0.01 * (base.base_optimizer == "adamw" and spec != "adamw")
        result = {
            "optimizer": spec,
            "seed": seed,
            "final_test_accuracy": accuracy + 0.001 * (seed % 100),
            "wall_time": 1.0,
        }
        for key in ("best_test_accuracy", "train_loss", "trace", "first_order_flatness"):
            result[key] = 1.0
        result["top_eigenvalue"] = 10.0 - (spec != "sgd") - 0.5 * seed * spec.startswith("gam:")
        return result

    monkeypatch.setattr(reproduce, "run_one", run_one)
    return calls


def test_benchmark_extends_sam_and_compares_gam_adamw_with_adamw(tmp_path, runs, capsys):
    argv = ["--setting", "mnist1d_noise40", "--workdir", str(tmp_path), "--seeds", "3"]
    argv += ["--tune-seeds", "1", "--optimizers", "sgd", "sam", "gam", "adamw", "gam_adamw"]
    [summary] = headroom.main([*argv, "--config.label_smoothing=0.05"])
    assert {base.label_smoothing for *_, base in runs} == {0.05}  # every run's config changed
    assert {base.label_noise for *_, base in runs} == {0.4}  # on the setting's config
    assert summary["choices"]["sam"] == "rho=1.2" and summary["interior"]["sam"]
    assert list(summary["validation"]["sam"])[-2:] == ["rho=1.2", "rho=2.9"]
    # Validation: the last 1000 MNIST-1D training examples.
    assert {v for _, _, v, _, _ in runs if v} == {1000}
    # AdamW's recipe for adamw and gam_adamw, in folders apart from gam's.
    adamw_runs = [(spec, folder, base) for spec, _, _, folder, base in runs if "adamw" in folder]
    assert adamw_runs and all(
        base.learning_rate == headroom.ADAMW["learning_rate"] for _, _, base in adamw_runs
    )
    assert all(base.base_optimizer == "adamw" for _, folder, base in adamw_runs if "gam" in folder)
    sgd_bases = [base for spec, _, _, folder, base in runs if "adamw" not in folder]
    assert all(base.learning_rate == 0.1 and base.base_optimizer == "sgd" for base in sgd_bases)
    names = {r["name"]: r["optimizer"] for r in summary["results"]}
    assert names["gam_adamw"].startswith("gam_adamw:") and names["gam"].startswith("gam:")
    # Comparisons present for the methods that ran, paired by seed.
    comparisons = summary["comparisons"]
    assert set(comparisons) == {"gam - sgd", "gam - sam", "gam_adamw - adamw"}
    gam_adamw = comparisons["gam_adamw - adamw"]["final_test_accuracy"]
    np.testing.assert_allclose([gam_adamw["mean"], gam_adamw["low"]], [0.04, 0.04], atol=1e-9)
    eig = comparisons["gam - sgd"]["top_eigenvalue"]
    assert eig["n"] == 3 and eig["mean"] == pytest.approx(-1.5)  # -1, -1.5, -2
    assert eig["low"] < -1.5 < eig["high"]
    out = capsys.readouterr().out
    assert "| gam_adamw - adamw | 3 | +4.00 [+4.00, +4.00] | 0.00 |" in out
    assert "| sam | rho=1.2 | 0.9000 ± 0.0000 | chosen |" in out
    saved = json.loads((tmp_path / "mnist1d_noise40" / "summary.json").read_text())
    assert saved["comparisons"] == json.loads(json.dumps(comparisons))


def test_a_choice_left_at_the_grid_end_is_marked():
    table = headroom.tuning_table(
        {"sam": {"rho=0.1": [0.5], "rho=0.2": [0.6]}}, {"sam": "rho=0.2"}, 1, {"sam": False}
    )
    assert "| sam | rho=0.2 | 0.6000 ± 0.0000 | chosen (grid end) |" in table


def test_verdicts_of_the_claims():
    ci = lambda low, high: {"mean": (low + high) / 2, "low": low, "high": high, "n": 10}
    assert headroom.verdict(ci(0.001, 0.02), "improves") == "confirmed"
    assert headroom.verdict(ci(-0.004, 0.002), "improves") == "not confirmed"  # < 0.3 points
    assert headroom.verdict(ci(-0.004, 0.01), "improves") == "inconclusive"
    assert headroom.verdict(ci(-3.0, -1.0), "lowers") == "confirmed"
    assert headroom.verdict(ci(0.0, 1.0), "lowers") == "not confirmed"
    assert headroom.verdict(ci(-1.0, 1.0), "lowers") == "inconclusive"
    assert headroom.verdict(ci(-0.004, 0.003), "comparable") == "confirmed"
    assert headroom.verdict(ci(0.006, 0.02), "comparable") == "not confirmed"
    assert headroom.verdict(ci(-0.002, 0.01), "comparable") == "inconclusive"
    table = headroom.claims_table(
        {"mnist1d": {"gam - sgd": {"final_test_accuracy": ci(0.01, 0.03)}}}
    )
    assert (
        "| GAM improves SGD | mnist1d | gam - sgd | test acc, points | +2.00 [+1.00, +3.00] |"
        in table
    )
    assert table.endswith("| 10 | confirmed here |")
