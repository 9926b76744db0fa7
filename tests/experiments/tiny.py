"""The tiny digits runs that the experiments' tests train: a few steps on a few examples."""

from experiments.configs import default

# Two steps of 32 examples an epoch, two epochs, 64 test images, no progress bar.
BASE = dict(
    num_epochs=2,
    steps_per_epoch=2,
    batch_size=32,
    num_train_examples=256,
    num_test_examples=64,
    eval_batch_size=64,
    progress_bar=False,
)


def fields(**changes):
    """The config fields of a tiny run: ``BASE`` with ``changes``."""
    return {**BASE, **changes}


def config(run_fields, **overrides):
    """The default config (digits, the small CNN) with ``run_fields``, then ``overrides``."""
    result = default.get_config()
    result.update({**run_fields, **overrides})
    return result
