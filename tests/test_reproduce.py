"""The reproduction script trains, measures flatness, summarises over seeds and reuses runs."""

import json
import math

import numpy as np
import pytest

from experiments import ConfigError, reproduce
from experiments.configs import default


def test_reproduction_summarises_runs_and_reuses_them(tmp_path, capsys):
    argv = [
        "--workdir",
        str(tmp_path),
        "--optimizers",
        "sgd",
        "gam",
        "--seeds",
        "2",
        "--epochs",
        "1",
        "--train-examples",
        "128",
        "--flatness-examples",
        "64",
    ]
    table = reproduce.main(argv)
    assert list(table) == ["sgd", "gam"]
    results = {
        (r["optimizer"], r["seed"]): r
        for r in (json.loads(p.read_text()) for p in tmp_path.glob("*/result.json"))
    }
    assert sorted(results) == [("gam", 0), ("gam", 1), ("sgd", 0), ("sgd", 1)]
    for optimizer in ("sgd", "gam"):
        for key in reproduce.COLUMNS:
            values = [results[optimizer, seed][key] for seed in (0, 1)]
            assert all(math.isfinite(v) for v in values)
            mean, std = table[optimizer][key]
            assert mean == np.mean(values) and std == np.std(values)
    assert all(r["top_eigenvalue"] > 0 and r["trace"] != 0 for r in results.values())
    assert (tmp_path / "reproduction.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "| gam |" in out and "mean ± std over 2 seeds" in out

    # Finished runs are reused: nothing is retrained or re-measured.
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/result.json")}
    assert reproduce.main(argv) == table
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/result.json")} == stamps


def test_optimizer_overrides_are_parsed_and_checked():
    assert reproduce.parse_optimizer("gam") == ("gam", {})
    assert reproduce.parse_optimizer("reuse:inner=sam,every=5,alpha=0.2,rescale=False") == (
        "reuse",
        {"inner": "sam", "every": 5, "alpha": 0.2, "rescale": False},
    )
    with pytest.raises(ConfigError, match=r"'evry=5'.*config\.reuse \(alpha, every, inner"):
        reproduce.parse_optimizer("reuse:evry=5")
    with pytest.raises(ConfigError, match="unknown optimizer 'lookSAM'"):
        reproduce.parse_optimizer("lookSAM")
    with pytest.raises(ConfigError, match=r"bad override .rho=1.*config\.sgd \(none\)"):
        reproduce.parse_optimizer("sgd:rho=1")


def test_a_finished_run_of_other_settings_is_refused_not_reused(tmp_path):
    """The cache's key is the run's whole config (as a resume's): any field that changes the
    computation, e.g. the epochs, the validation split, the label noise or a radius."""
    config = default.get_config()
    config.update(optimizer="gam", seed=0, num_epochs=30, label_noise_seed=0, progress_bar=False)
    probe = {"rho": 0.05, "examples": None}
    result = {"config": json.loads(config.to_json_best_effort()), "flatness_probe": probe}
    (tmp_path / "result.json").write_text(json.dumps({**result, "final_test_accuracy": 0.9}))
    assert reproduce.run_one("gam", 0, 30, tmp_path, 0.05)["final_test_accuracy"] == 0.9
    with pytest.raises(ConfigError, match=r"other settings \(num_epochs: 30 there, 15 here\)"):
        reproduce.run_one("gam", 0, 15, tmp_path, 0.05)  # not silently the 30-epoch result
    with pytest.raises(ConfigError, match="validation_examples: None there, 200 here"):
        reproduce.run_one("gam", 0, 30, tmp_path, 0.05, validation_examples=200)
    with pytest.raises(ConfigError, match=r"gam\.rho: 0\.2 there, 0\.5 here"):
        reproduce.run_one("gam:rho=0.5", 0, 30, tmp_path, 0.05)
    noisy = default.get_config()
    noisy.label_noise = 0.4
    with pytest.raises(ConfigError, match=r"label_noise: 0\.0 there, 0\.4 here"):
        reproduce.run_one("gam", 0, 30, tmp_path, 0.05, base=noisy)
    (tmp_path / "result.json").write_text(json.dumps({"final_test_accuracy": 0.9}))
    with pytest.raises(ConfigError, match=r"records no config .*delete it to rerun"):
        reproduce.run_one("gam", 0, 30, tmp_path, 0.05)
