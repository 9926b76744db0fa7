"""Data: whole data sets as uint8 arrays, and augmentation as pure JAX functions.

A data set is small enough to live in host memory (CIFAR: 150 MB of uint8): each step the
training loop gathers this process's rows of the batch with NumPy, moves them to the devices,
and augments and normalises them inside its jitted step, so the input pipeline is never the
bottleneck. CIFAR-10/100 come from tensorflow-datasets through
``tfds.data_source`` (array_record files, no TensorFlow needed); the offline default is
scikit-learn's 8x8 digits, which ships inside the package. MNIST-1D (Greydanus & Kobak,
ICML 2024) is generated offline from the ``mnist1d`` package's templates
(:func:`make_mnist1d`; its downloading ``get_dataset`` is never called).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import random
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments import ConfigError

# The released code's normalisation (main_cifar.py), per channel.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "mnist1d": 10}
DATASETS = tuple(NUM_CLASSES)
DIGITS_TEST_SIZE = 899  # a fixed, seeded, stratified half of the 1,797 digits
# MNIST-1D: the package's standard training set (make_dataset's defaults: 5,000 samples from
# seed 42, the first 80% = 4,000 to train), and a test set of 10,000 generated apart from it
# (its own seed; the standard set's 1,000 test examples are not used). Same generator
# arguments otherwise: 40-sample signals, 10 balanced classes.
MNIST1D_TRAIN = {"num_samples": 5000, "seed": 42, "train_split": 0.8}
MNIST1D_TEST = {"num_samples": 10_000, "seed": 20_240_000, "train_split": 0.0}


class Dataset(NamedTuple):
    """A whole data set in host memory.

    Attributes:
      train_images, test_images: uint8 arrays of shape (N, H, W, C); for MNIST-1D float32
        signals of shape (N, 40, 1) (see :func:`_load_mnist1d` for their scale).
      train_labels, test_labels: int32 arrays of shape (N,).
      num_classes: the number of classes.
      mean, std: per-channel normalisation on the [0, 1] scale.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load(
    name: str,
    data_dir: str | None = None,
    num_train_examples: int | None = None,
    num_test_examples: int | None = None,
) -> Dataset:
    """Loads ``name`` ('digits', 'mnist1d', 'cifar10' or 'cifar100'), optionally only its
    first examples."""
    if name == "digits":
        ds = _load_digits()
    elif name == "mnist1d":
        ds = _load_mnist1d(data_dir)
    elif name in CIFAR_STATS:
        ds = _load_cifar(name, data_dir)
    else:
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}.")
    return ds._replace(
        train_images=ds.train_images[:num_train_examples],
        train_labels=ds.train_labels[:num_train_examples],
        test_images=ds.test_images[:num_test_examples],
        test_labels=ds.test_labels[:num_test_examples],
    )


def hold_out(ds: Dataset, num_examples: int | None) -> Dataset:
    """The last ``num_examples`` training examples as the evaluation set, the rest to train.

    For choosing hyperparameters without looking at the test set: the returned data set's
    ``test_*`` arrays are the held-out training examples, and the real test set is dropped.
    ``None`` (or 0) returns ``ds`` unchanged.
    """
    if not num_examples:
        return ds
    n = len(ds.train_labels)
    if not 0 < num_examples < n:
        raise ConfigError(
            f"config.validation_examples={num_examples} must be between 1 and the {n - 1} "
            f"training examples less one; lower it."
        )
    cut = n - num_examples
    return ds._replace(
        train_images=ds.train_images[:cut],
        train_labels=ds.train_labels[:cut],
        test_images=ds.train_images[cut:],
        test_labels=ds.train_labels[cut:],
    )


def add_label_noise(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """Symmetric label noise: ``round(fraction * N)`` labels, chosen at random, each
    replaced by one of the other ``num_classes - 1`` classes drawn uniformly.

    Exactly that many labels are wrong afterwards, and the same ``seed`` corrupts the same
    examples the same way (``numpy.random.default_rng(seed)``): every optimizer of a
    comparison sees the same noisy labels.

    >>> labels = np.zeros(10, np.int32)
    >>> int((add_label_noise(labels, 10, 0.4, seed=0) != labels).sum())
    4
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"config.label_noise={fraction} must be in [0, 1); e.g. 0.2 or 0.4.")
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    shift = rng.integers(1, num_classes, size=len(flipped))  # never 0: always a wrong class
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy


def for_run(config) -> Dataset:
    """The data set a run of ``config`` trains and evaluates on.

    Its first ``config.num_train_examples`` training examples (all if unset), their labels
    corrupted with ``config.label_noise`` (symmetric, seeded by ``config.label_noise_seed``;
    the test labels stay clean), then the last ``config.validation_examples`` of them held
    out as the evaluation set (:func:`hold_out`; they carry the same noise, as a user's own
    validation data would: under symmetric noise the expected noisy accuracy is an
    increasing affine function of the clean one, so it ranks models the same way).
    """
    ds = load(config.dataset, config.data_dir, config.num_train_examples, config.num_test_examples)
    noise = config.get("label_noise") or 0.0
    if noise:
        noisy = add_label_noise(ds.train_labels, ds.num_classes, noise, config.label_noise_seed)
        ds = ds._replace(train_labels=noisy)
    return hold_out(ds, config.get("validation_examples"))


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixel values are 0..16; rescale to uint8 0..255 like every other data set.
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=DIGITS_TEST_SIZE, random_state=0, stratify=labels
    )
    mean = float(x_train.mean() / 255)
    std = float(x_train.std() / 255)
    return Dataset(x_train, y_train, x_test, y_test, 10, (mean,), (std,))


def make_mnist1d(num_samples: int, seed: int, train_split: float) -> dict[str, np.ndarray]:
    """``mnist1d.data.make_dataset`` with these arguments (the package's defaults otherwise):
    arrays ``x`` (float64, (N, 40)), ``y``, ``x_test``, ``y_test``, offline.

    The generator builds every example from the package's ten templates (pad, dilate, scale,
    translate, correlated and iid noise, shear), seeded by ``seed``, then standardises the
    whole generated set to mean 0, std 1; ``num_samples // 10`` examples of each class, then
    shuffled, the first ``train_split`` of them as ``x``. It seeds NumPy's and Python's
    global generators (``mnist1d.utils.set_seed``); their states are restored afterwards.
    No network: ``make_dataset`` only computes (``get_dataset``, which downloads, is not used).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise ConfigError(
            "dataset 'mnist1d' needs the mnist1d package: pip install 'gam-optax[experiments]' "
            "(or pip install mnist1d)."
        ) from None
    args = get_dataset_args()
    args.num_samples, args.seed, args.train_split = num_samples, seed, train_split
    numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(python_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _mnist1d_cache_path(data_dir: str | None) -> pathlib.Path:
    """Where the generated arrays are cached: DATA_DIR/mnist1d, or ~/.cache/gam-optax/mnist1d
    ($XDG_CACHE_HOME), one file per generator version and arguments."""
    import mnist1d

    key = json.dumps([getattr(mnist1d, "__version__", "?"), MNIST1D_TRAIN, MNIST1D_TEST])
    key += np.__version__  # the generator draws from NumPy's legacy global generator
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = data_dir or os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    sub = "mnist1d" if data_dir else "gam-optax/mnist1d"
    return pathlib.Path(os.path.expanduser(root)) / sub / f"mnist1d-{digest}.npz"


@functools.lru_cache(maxsize=2)
def _load_mnist1d(data_dir: str | None = None) -> Dataset:
    """MNIST-1D: 4,000 training and 10,000 test signals (:data:`MNIST1D_TRAIN`,
    :data:`MNIST1D_TEST`), generated once (about 7 s on one core) and cached on disk.

    The signals stay float32 (already standardised by the generator, shape (N, 40, 1));
    ``mean`` and ``std`` are the training set's, divided by 255, so that :func:`normalize`
    (``(x / 255 - mean) / std``) standardises them with the training statistics exactly.
    """
    path = _mnist1d_cache_path(data_dir)
    if path.exists():
        with np.load(path) as cached:
            arrays = {k: cached[k] for k in cached.files}
    else:
        train = make_mnist1d(**MNIST1D_TRAIN)
        test = make_mnist1d(**MNIST1D_TEST)
        arrays = {
            "x_train": train["x"].astype(np.float32)[..., None],
            "y_train": train["y"].astype(np.int32),
            "x_test": test["x_test"].astype(np.float32)[..., None],
            "y_test": test["y_test"].astype(np.int32),
        }
        try:  # atomically: parallel runs may write the same file
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
                np.savez(f, **arrays)
            os.replace(f.name, path)
        except OSError:  # a read-only place: generate each time
            pass
    for array in arrays.values():  # shared by every run of this process: never modified
        array.setflags(write=False)
    x_train = arrays["x_train"]
    mean, std = float(x_train.mean()) / 255, float(x_train.std()) / 255
    return Dataset(
        x_train, arrays["y_train"], arrays["x_test"], arrays["y_test"], 10, (mean,), (std,)
    )


def _load_cifar(name: str, data_dir: str | None) -> Dataset:
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else None
    arrays = []
    for split in ("train", "test"):
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises a different error for each way of being absent
            reason = " ".join(str(e).split())[:300] or type(e).__name__
            where = data_dir or "the default tfds data_dir ($TFDS_DATA_DIR, ~/tensorflow_datasets)"
            raise ConfigError(
                f"dataset {name!r} is not prepared in {where} (tfds said: {reason}). Prepare it "
                f"once on a machine with internet and TensorFlow: `pip install tensorflow "
                f"tensorflow-datasets && tfds build {name} --file_format=array_record "
                f"--data_dir=DIR`, copy DIR here, and pass --config.data_dir=DIR (or set "
                f"TFDS_DATA_DIR)."
            ) from None
        examples = [source[i] for i in range(len(source))]
        arrays.append(np.stack([ex["image"] for ex in examples]).astype(np.uint8))
        arrays.append(np.array([ex["label"] for ex in examples], np.int32))
    mean, std = CIFAR_STATS[name]
    return Dataset(*arrays, NUM_CLASSES[name], mean, std)


def normalize(
    images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...], dtype=jnp.float32
) -> jax.Array:
    """uint8 images -> ``dtype`` (float32, or float64 for exact checks),
    ``(x / 255 - mean) / std`` per channel."""
    dtype = jnp.promote_types(dtype, jnp.float32)  # bfloat16 models still read float32
    x = images.astype(dtype) / 255.0
    return (x - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)


def random_crop(rng: jax.Array, images: jax.Array, padding: int) -> jax.Array:
    """Pads each image with ``padding`` zeros per side and crops it back at a random offset."""
    if padding == 0:
        return images
    n, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * padding + 1)
    crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (h, w, image.shape[-1]))
    return jax.vmap(crop)(padded, offsets)


def random_flip(rng: jax.Array, images: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def cutout(rng: jax.Array, images: jax.Array, size: int) -> jax.Array:
    """Zeroes a ``size`` x ``size`` square (clipped at the border) at a random centre per image."""
    n, h, w, _ = images.shape
    centres = jax.random.randint(rng, (n, 2, 1), 0, jnp.array([[h], [w]]))
    top, left = centres[:, 0] - size // 2, centres[:, 1] - size // 2  # (n, 1) each
    rows = (jnp.arange(h) >= top) & (jnp.arange(h) < top + size)  # (n, h)
    cols = (jnp.arange(w) >= left) & (jnp.arange(w) < left + size)  # (n, w)
    hole = rows[:, :, None, None] & cols[:, None, :, None]
    return jnp.where(hole, jnp.zeros((), images.dtype), images)


def augment(
    rng: jax.Array,
    images: jax.Array,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    crop_padding: int = 4,
    flip: bool = True,
    cutout_size: int = 0,
    dtype=jnp.float32,
) -> jax.Array:
    """The training transform of the released code, on device: crop, flip, normalise, Cutout.

    The zero padding of the crop is black in pixel space (as torchvision pads before
    normalising); Cutout zeroes normalised values (as the Cutout paper).
    """
    crop_rng, flip_rng, cutout_rng = jax.random.split(rng, 3)
    images = random_crop(crop_rng, images, crop_padding)
    if flip:
        images = random_flip(flip_rng, images)
    x = normalize(images, mean, std, dtype)
    if cutout_size:
        x = cutout(cutout_rng, x, cutout_size)
    return x


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments.train", "the trainer's data sets")
