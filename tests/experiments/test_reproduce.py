"""The reproduction script trains, measures flatness, summarises over seeds and reuses runs."""

import json
import math
import pathlib

import numpy as np
import pytest

from experiments import ConfigError, compare, configs, reproduce
from experiments.configs import default

LOWDATA = pathlib.Path(configs.__file__).parent / "digits_lowdata.py"


def test_reproduction_summarises_runs_and_reuses_them(tmp_path, capsys):
    argv = [
        "--workdir",
        str(tmp_path),
        f"--config={LOWDATA}",  # every run starts from it, with its fields changed
        "--config.batch_size=64",
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
    for (optimizer, seed), result in results.items():
        config = result["config"]
        assert (config["optimizer"], config["seed"], config["num_epochs"]) == (optimizer, seed, 1)
        assert (config["batch_size"], config["num_train_examples"]) == (64, 128)  # both asked
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


def test_methods_are_config_overrides_checked_against_the_config():
    assert reproduce.parse_method("gam") == {"optimizer": "gam"}
    method = reproduce.parse_method("reuse:inner=sam,every=5,alpha=0.2,rescale=False,gam.rho=1")
    assert method == {
        "optimizer": "reuse",
        "reuse.inner": "sam",
        "reuse.every": 5,
        "reuse.alpha": 0.2,
        "reuse.rescale": False,
        "gam.rho": 1,
    }
    config = configs.override(default.get_config(), method)
    assert (config.optimizer, config.reuse.inner, config.reuse.every) == ("reuse", "sam", 5)
    assert config.gam.rho == 1.0 and isinstance(config.gam.rho, float)  # ConfigDict's types
    assert reproduce.describe(method) == "reuse:inner=sam,every=5,alpha=0.2,rescale=False,gam.rho=1"
    with pytest.raises(ConfigError, match=r"'evry=5'.*config\.reuse has no field 'evry' \(its "):
        reproduce.parse_method("reuse:evry=5")
    with pytest.raises(ConfigError, match="unknown optimizer 'lookSAM'"):
        reproduce.parse_method("lookSAM")
    with pytest.raises(ConfigError, match=r"bad override .rho=1.*config has no section 'sgd'"):
        reproduce.parse_method("sgd:rho=1")
    with pytest.raises(ConfigError, match=r"bad override 'every' in 'reuse:every': write KEY="):
        reproduce.parse_method("reuse:every")
    with pytest.raises(ConfigError, match=r"'every=x'.*'reuse.every'='x': Could not override"):
        reproduce.parse_method("reuse:every=x")  # an int field


def test_an_override_names_an_existing_field_of_the_right_type(capsys):
    base = default.get_config()
    config = configs.override(base, {"optimizer": "sam", "sam.rho": 0.1, "num_epochs": 3})
    assert (config.optimizer, config.sam.rho, config.num_epochs) == ("sam", 0.1, 3)
    assert (base.optimizer, base.sam.rho, base.num_epochs) == ("gam", 0.05, 30)  # a copy
    refused = {
        "sam.rhoo": r"config\.sam has no field 'rhoo' \(its fields: adaptive, rho\); name a",
        "samm.rho": r"config has no section 'samm' \(its fields: augment, ",
        "augment.flip.x": r"config\.augment has no section 'flip'",
        "num_epochs": r"=2\.5: Could not override field 'num_epochs'",  # an int field
    }
    for key, message in refused.items():
        with pytest.raises(ConfigError, match=rf"^override '{key}'.*{message}"):
            configs.override(base, {key: 2.5})
    with pytest.raises(ConfigError, match=r"override: overrides is a mapping of dotted config"):
        configs.override(base, "sam:rho=0.1")
    for main in (reproduce.main, compare.main):  # a field of configs/default.py
        with pytest.raises(SystemExit):
            main(["--config.gam.rhoo=0.3"])
        assert "--config.gam.rhoo=0.3: the config has no field 'gam.rhoo' (closest: 'gam.rho'" in (
            capsys.readouterr().err
        )
    with pytest.raises(SystemExit):
        reproduce.main([f"--config={LOWDATA}", "--config.gam.rhoo=0.3"])
    with pytest.raises(ConfigError, match=r"'rhoo'.*Did you mean \"rho\""):
        configs.from_flags(str(LOWDATA), ["--config.gam.rhoo=0.3"])
    with pytest.raises(ConfigError, match=r"unknown recipe 'cifar10,x'"):
        configs.from_flags(f"{LOWDATA.parent / 'cifar.py'}:cifar10,x")
    assert configs.from_flags(f"{LOWDATA.parent / 'mnist1d.py'}:0.4").label_noise == 0.4


def test_a_finished_run_of_other_settings_is_refused_not_reused(tmp_path):
    """The cache's key is the run's whole config, compared as a resume compares it: any
    field that changes the computation, e.g. the epochs, the validation split, the label
    noise or a radius; a field newer than the run counts as its default."""
    config = default.get_config()
    config.update(optimizer="gam", seed=0, num_epochs=30, label_noise_seed=0, progress_bar=False)
    written = json.loads(config.to_json_best_effort())
    del written["skip_nonfinite_steps"]  # a run from before that field: its default
    probe = {"rho": 0.05, "examples": None}  # as older versions wrote it
    result = {"config": written, "flatness_probe": probe, "final_test_accuracy": 0.9}
    (tmp_path / "result.json").write_text(json.dumps(result))
    gam = {"optimizer": "gam"}
    assert reproduce.run_one(gam, 0, 30, tmp_path, 0.05)["final_test_accuracy"] == 0.9
    assert json.loads((tmp_path / "result.json").read_text()) == result  # not measured again
    with pytest.raises(ConfigError, match=r"other settings \(num_epochs: 30 there, 15 here\)"):
        reproduce.run_one(gam, 0, 15, tmp_path, 0.05)  # not silently the 30-epoch result
    with pytest.raises(ConfigError, match="validation_examples: None there, 200 here"):
        reproduce.run_one(gam, 0, 30, tmp_path, 0.05, validation_examples=200)
    with pytest.raises(ConfigError, match=r"gam\.rho: 0\.2 there, 0\.5 here"):
        reproduce.run_one({"optimizer": "gam", "gam.rho": 0.5}, 0, 30, tmp_path, 0.05)
    noisy = default.get_config()
    noisy.label_noise = 0.4
    with pytest.raises(ConfigError, match=r"label_noise: 0\.0 there, 0\.4 here"):
        reproduce.run_one(gam, 0, 30, tmp_path, 0.05, base=noisy)
    with pytest.raises(ConfigError, match=r"override 'gam.rhoo': config\.gam has no field"):
        reproduce.run_one({"optimizer": "gam", "gam.rhoo": 0.5}, 0, 30, tmp_path, 0.05)
    (tmp_path / "result.json").write_text(json.dumps({"final_test_accuracy": 0.9}))
    with pytest.raises(ConfigError, match=r"records no config .*delete it to rerun"):
        reproduce.run_one(gam, 0, 30, tmp_path, 0.05)
