"""The reproduction script trains, measures flatness, summarises over seeds and reuses runs."""

import json
import math

import numpy as np

from experiments import reproduce


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
