"""Data loading (digits, mock CIFAR through tfds) and the on-device augmentation."""

import functools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import ConfigError, input_pipeline


@pytest.fixture(scope="module")
def digits():
    return input_pipeline.load("digits")


def test_digits_split_is_fixed_stratified_and_complete(digits):
    assert digits.train_images.shape == (898, 8, 8, 1) and digits.train_images.dtype == np.uint8
    assert digits.test_images.shape == (899, 8, 8, 1) and digits.test_labels.dtype == np.int32
    assert digits.num_classes == 10 and digits.train_images.max() == 255
    # Stratified: every class is split in half (to one example).
    train_counts = np.bincount(digits.train_labels, minlength=10)
    test_counts = np.bincount(digits.test_labels, minlength=10)
    assert np.all(np.abs(train_counts - test_counts) <= 1)
    # Seeded: loading again gives the same split; capping keeps the first examples.
    again = input_pipeline.load("digits", num_train_examples=100, num_test_examples=50)
    np.testing.assert_array_equal(again.train_images, digits.train_images[:100])
    np.testing.assert_array_equal(again.test_labels, digits.test_labels[:50])
    # Its statistics normalise the training images.
    x = np.asarray(input_pipeline.normalize(digits.train_images, digits.mean, digits.std))
    assert abs(x.mean()) < 1e-4 and abs(x.std() - 1) < 1e-4


@pytest.mark.parametrize("name, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_comes_from_tfds_data_source(name, num_classes):
    with tfds.testing.mock_data(num_examples=12):
        ds = input_pipeline.load(name, num_test_examples=5)
    assert ds.train_images.shape == (12, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (5, 32, 32, 3) and ds.train_labels.dtype == np.int32
    assert ds.num_classes == num_classes and 0 <= ds.train_labels.min() <= ds.train_labels.max()
    assert ds.train_labels.max() < num_classes
    # The released code's normalisation.
    expected = {
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    }
    assert (ds.mean, ds.std) == expected[name]


def test_unprepared_cifar_says_how_to_prepare_it(tmp_path):
    with pytest.raises(ConfigError) as error:
        input_pipeline.load("cifar100", data_dir=str(tmp_path))
    message = str(error.value)
    assert "tfds build cifar100 --file_format=array_record" in message
    assert str(tmp_path) in message and "--config.data_dir" in message
    assert list(tmp_path.iterdir()) == []  # nothing downloaded or written


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(
        ConfigError, match="unknown dataset 'mnist'; valid datasets: digits, cifar10"
    ):
        input_pipeline.load("mnist")


def test_normalize_per_channel():
    images = np.full((1, 2, 2, 3), 255, np.uint8)
    x = input_pipeline.normalize(images, (0.5, 0.0, 1.0), (0.25, 0.5, 1.0))
    np.testing.assert_allclose(x[0, 0, 0], [2.0, 2.0, 0.0])


IMAGES = np.random.default_rng(0).integers(1, 256, (64, 6, 5, 2), dtype=np.uint8)


def test_random_crop_takes_a_window_of_the_zero_padded_image():
    key = jax.random.key(0)
    crop = jax.jit(input_pipeline.random_crop, static_argnums=2)
    out = np.asarray(crop(key, IMAGES, 2))
    padded = np.pad(IMAGES, ((0, 0), (2, 2), (2, 2), (0, 0)))
    offsets = set()
    for image, result in zip(padded, out, strict=True):
        matches = [
            (i, j)
            for i in range(5)
            for j in range(5)
            if np.array_equal(image[i : i + 6, j : j + 5], result)
        ]
        assert matches, "the crop is not a window of the padded image"
        offsets.add(matches[0])
    assert len(offsets) > 10  # offsets are drawn per image, from all 25
    np.testing.assert_array_equal(crop(key, IMAGES, 2), out)  # a function of the key
    assert not np.array_equal(crop(jax.random.key(1), IMAGES, 2), out)
    np.testing.assert_array_equal(crop(key, IMAGES, 0), IMAGES)


def test_random_flip_mirrors_about_half_of_the_images():
    out = np.asarray(jax.jit(input_pipeline.random_flip)(jax.random.key(0), IMAGES))
    same = [np.array_equal(o, x) for o, x in zip(out, IMAGES, strict=True)]
    mirrored = [np.array_equal(o, x[:, ::-1]) for o, x in zip(out, IMAGES, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert 16 < sum(mirrored) < 48


def test_cutout_zeroes_one_clipped_square_per_image():
    ones = np.ones((64, 8, 8, 3), np.float32)
    out = np.asarray(jax.jit(input_pipeline.cutout, static_argnums=2)(jax.random.key(0), ones, 4))
    for image in out:
        rows, cols = np.nonzero(image[..., 0] == 0)
        assert np.all(image[rows, cols] == 0)  # every channel of a hole pixel
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert len(rows) == height * width  # one filled rectangle
        assert 2 <= height <= 4 and 2 <= width <= 4  # a 4x4 square, clipped at most by half


def test_augment_is_normalize_when_everything_is_off():
    mean, std = (0.3, 0.4), (0.2, 0.25)
    augment = functools.partial(
        input_pipeline.augment, mean=mean, std=std, crop_padding=0, flip=False, cutout_size=0
    )
    out = jax.jit(augment)(jax.random.key(0), IMAGES)
    np.testing.assert_allclose(out, input_pipeline.normalize(IMAGES, mean, std), atol=1e-6)
    # With cropping, the padding is black in pixel space: -mean / std after normalising.
    out = jax.jit(functools.partial(augment, crop_padding=3))(jax.random.key(0), IMAGES)
    black = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    assert np.any(np.all(np.isclose(out, black), axis=-1))


def test_validation_split_is_held_out_from_training_and_is_not_the_test_set(digits):
    held = input_pipeline.hold_out(digits, 200)
    n = len(digits.train_labels)
    np.testing.assert_array_equal(held.train_images, digits.train_images[: n - 200])
    np.testing.assert_array_equal(held.test_images, digits.train_images[n - 200 :])
    np.testing.assert_array_equal(held.test_labels, digits.train_labels[n - 200 :])
    assert len(held.train_labels) + len(held.test_labels) == n  # disjoint parts of train
    # No image found only in the test set reaches training or validation.
    rows = lambda images: {image.tobytes() for image in images}
    test_only = rows(digits.test_images) - rows(digits.train_images)
    assert len(test_only) > 800
    assert not (rows(held.train_images) | rows(held.test_images)) & test_only
    assert input_pipeline.hold_out(digits, None) is digits
    with pytest.raises(ConfigError, match="validation_examples=898 must be between 1"):
        input_pipeline.hold_out(digits, n)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.4, 0.95])
def test_label_noise_flips_exactly_the_fraction_to_wrong_classes(fraction):
    labels = np.random.default_rng(1).integers(0, 10, size=5000).astype(np.int32)
    noisy = input_pipeline.add_label_noise(labels, 10, fraction, seed=3)
    flipped = noisy != labels
    assert flipped.sum() == round(fraction * len(labels))  # every chosen label is now wrong
    assert noisy.dtype == labels.dtype and labels.max() < 10 and noisy.min() >= 0
    if fraction:
        # The wrong class is uniform over the other nine: each shift 1..9 about 1/9 of flips.
        shifts = np.bincount((noisy - labels)[flipped] % 10, minlength=10)
        expected = flipped.sum() / 9
        assert shifts[0] == 0
        assert np.all(np.abs(shifts[1:] - expected) < 5 * np.sqrt(expected))  # 5 sigma
    np.testing.assert_array_equal(labels, np.random.default_rng(1).integers(0, 10, size=5000))


def test_label_noise_is_set_by_its_seed():
    labels = np.arange(1000, dtype=np.int32) % 10
    a = input_pipeline.add_label_noise(labels, 10, 0.3, seed=7)
    np.testing.assert_array_equal(a, input_pipeline.add_label_noise(labels, 10, 0.3, seed=7))
    b = input_pipeline.add_label_noise(labels, 10, 0.3, seed=8)
    assert np.mean((a != labels) & (b != labels)) < 0.3 * 0.3 + 0.05  # independent choices
    with pytest.raises(ConfigError, match=r"label_noise=1.0 must be in \[0, 1\)"):
        input_pipeline.add_label_noise(labels, 10, 1.0, seed=0)


@pytest.mark.parametrize("validation", [None, 60])
def test_a_run_with_noise_and_little_data_keeps_test_labels_and_holds_out_validation(
    digits, validation
):
    from experiments.configs import digits_lowdata

    config = digits_lowdata.get_config()  # the first 180 training examples
    config.label_noise, config.label_noise_seed = 0.4, 5
    config.validation_examples = validation
    ds = input_pipeline.for_run(config)
    noisy = input_pipeline.add_label_noise(digits.train_labels[:180], 10, 0.4, seed=5)
    assert np.sum(noisy != digits.train_labels[:180]) == 72
    cut = 180 - (validation or 0)
    np.testing.assert_array_equal(ds.train_images, digits.train_images[:cut])
    np.testing.assert_array_equal(ds.train_labels, noisy[:cut])
    if validation:  # the rest of the 180, as noisy as training: disjoint from both sets
        np.testing.assert_array_equal(ds.test_images, digits.train_images[cut:180])
        np.testing.assert_array_equal(ds.test_labels, noisy[cut:])
        rows = lambda images: {image.tobytes() for image in images}
        assert not rows(ds.test_images) & rows(ds.train_images)
        assert not rows(ds.test_images) & rows(digits.test_images)
    else:  # the test set, labels untouched
        np.testing.assert_array_equal(ds.test_images, digits.test_images)
        np.testing.assert_array_equal(ds.test_labels, digits.test_labels)
