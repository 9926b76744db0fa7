"""MNIST-1D: generated offline, seeded, noisy labels as for digits, and the 1-D CNN.

The tests generate a few hundred examples (the real sizes, 4,000 + 10,000, take ~7 s):
``small_mnist1d`` shrinks the generator's arguments and caches into a temporary folder.
"""

import json
import random
import socket
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import requests

from experiments import input_pipeline, models, reproduce, train
from experiments.configs import mnist1d


def no_network(*args, **kwargs):
    raise AssertionError("MNIST-1D must be generated offline, not downloaded")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test here fails on any attempt to reach the network."""
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)


@pytest.fixture
def small_mnist1d(monkeypatch, tmp_path):
    """The data set with 200 training and 300 test examples, cached in ``tmp_path``."""
    monkeypatch.setattr(
        input_pipeline, "MNIST1D_TRAIN", {"num_samples": 250, "seed": 42, "train_split": 0.8}
    )
    monkeypatch.setattr(
        input_pipeline, "MNIST1D_TEST", {"num_samples": 300, "seed": 7, "train_split": 0.0}
    )
    input_pipeline._load_mnist1d.cache_clear()
    yield str(tmp_path)
    input_pipeline._load_mnist1d.cache_clear()


def test_generation_is_offline_seeded_balanced_and_leaves_global_rngs_alone():
    legacy = np.random  # the package's (global, legacy) generator
    legacy.seed(123)
    random.seed(123)
    expected = (legacy.rand(), random.random())
    legacy.seed(123)
    random.seed(123)
    data = input_pipeline.make_mnist1d(num_samples=200, seed=3, train_split=0.8)
    # The generator seeds the global generators; their states are put back.
    assert (legacy.rand(), random.random()) == expected
    assert data["x"].shape == (160, 40) and data["x_test"].shape == (40, 40)
    assert np.bincount(np.concatenate([data["y"], data["y_test"]])).tolist() == [20] * 10
    again = input_pipeline.make_mnist1d(num_samples=200, seed=3, train_split=0.8)
    for key in data:
        np.testing.assert_array_equal(data[key], again[key])
    other = input_pipeline.make_mnist1d(num_samples=200, seed=4, train_split=0.8)
    assert not np.allclose(data["x"], other["x"])


def test_loaded_sizes_seeds_disjoint_sets_and_cache(small_mnist1d, tmp_path):
    ds = input_pipeline.load("mnist1d", data_dir=small_mnist1d)
    assert ds.train_images.shape == (200, 40, 1) and ds.train_images.dtype == np.float32
    assert ds.test_images.shape == (300, 40, 1) and ds.test_labels.dtype == np.int32
    assert ds.num_classes == 10 and np.bincount(ds.test_labels).tolist() == [30] * 10
    # The training set is the first 80% of the standard generation (seed 42), the test set
    # its own generation with another seed: no test signal is a training signal.
    standard = input_pipeline.make_mnist1d(num_samples=250, seed=42, train_split=0.8)
    np.testing.assert_allclose(ds.train_images[..., 0], standard["x"], rtol=1e-6)
    assert input_pipeline.MNIST1D_TRAIN["seed"] != input_pipeline.MNIST1D_TEST["seed"]
    distances = np.abs(ds.test_images[:, None, :, 0] - ds.train_images[None, :, :, 0]).max(-1)
    assert distances.min() > 1e-3
    # normalize() standardises the float signals with the training statistics.
    x = np.asarray(input_pipeline.normalize(ds.train_images, ds.mean, ds.std))
    assert abs(x.mean()) < 1e-5 and abs(x.std() - 1) < 1e-5
    # Cached on disk: a new process (here: a cleared memory cache) reads the same arrays.
    [cached] = (tmp_path / "mnist1d").glob("mnist1d-*.npz")
    input_pipeline._load_mnist1d.cache_clear()
    again = input_pipeline.load("mnist1d", data_dir=small_mnist1d, num_train_examples=50)
    np.testing.assert_array_equal(again.train_images, ds.train_images[:50])
    np.testing.assert_array_equal(again.test_images, ds.test_images)
    assert cached.exists() and not ds.train_images.flags.writeable  # shared, never modified


def test_label_noise_is_exact_on_training_and_validation_never_on_test(small_mnist1d):
    clean = input_pipeline.load("mnist1d", data_dir=small_mnist1d)
    config = mnist1d.get_config("0.4")
    config.data_dir, config.label_noise_seed = small_mnist1d, 5
    noisy = input_pipeline.for_run(config)
    wrong = noisy.train_labels != clean.train_labels
    assert wrong.sum() == 80  # exactly 40% of 200
    np.testing.assert_array_equal(noisy.test_labels, clean.test_labels)
    np.testing.assert_array_equal(noisy.test_images, clean.test_images)
    same = input_pipeline.for_run(config)
    np.testing.assert_array_equal(same.train_labels, noisy.train_labels)  # seeded
    config.label_noise_seed = 6
    assert (input_pipeline.for_run(config).train_labels != noisy.train_labels).any()
    # Validation (for choosing radii) holds out the last training examples, noisy as the rest.
    config.label_noise_seed, config.validation_examples = 5, 50
    held = input_pipeline.for_run(config)
    assert len(held.train_labels) == 150 and len(held.test_labels) == 50
    np.testing.assert_array_equal(held.test_labels, noisy.train_labels[150:])


def test_cnn1d_shapes_and_size():
    model = models.create_model("cnn1d", 10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 40, 1)), train=False)
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 5285
    assert variables["params"]["Dense_0"]["kernel"].shape == (125, 10)  # 25 channels x 5
    logits, new = model.apply(variables, jnp.ones((7, 40, 1)), train=True, mutable="batch_stats")
    assert logits.shape == (7, 10) and logits.dtype == jnp.float32
    assert set(new["batch_stats"]) == {"BatchNorm_0", "BatchNorm_1", "BatchNorm_2"}
    wide = models.create_model("cnn1d", 10, channels=8)
    assert wide.apply(
        wide.init(jax.random.key(0), jnp.zeros((1, 40, 1)), train=False),
        jnp.ones((2, 40, 1)),
        train=False,
    ).shape == (2, 10)


def test_a_short_run_trains_evaluates_and_measures_flatness(small_mnist1d, tmp_path):
    config = mnist1d.get_config("0.4")
    config.update(data_dir=small_mnist1d, num_epochs=2, batch_size=50, progress_bar=False)
    config.optimizer = "sgd"
    summary = train.train_and_evaluate(config, tmp_path / "run")
    assert summary["epoch"] == 2 and 0 <= summary["final_test_accuracy"] <= 1
    measures = reproduce.measure_flatness(config, tmp_path / "run", 0.05, 0, 100)
    assert all(np.isfinite(v) for v in measures.values()) and measures["top_eigenvalue"] > 0
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in records] == [1, 2]
