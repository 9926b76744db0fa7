"""Digits with symmetric label noise on the training split (test labels clean).

A fraction of the training labels, chosen with ``config.label_noise_seed``, is replaced by
a uniformly drawn wrong class (``input_pipeline.add_label_noise``); the fraction is the
config string (default 0.4). The default's 30 epochs: late in the run SGD fits the wrong
labels and its test accuracy falls, which is where sharpness-aware methods can help (at 15
epochs SGD stopped before that and led SAM)::

    python -m experiments.train --config=experiments/configs/digits_noisy.py:0.2 --workdir=DIR
"""

import ml_collections

from experiments.configs import default


def get_config(label_noise: str = "0.4") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.label_noise = float(label_noise)
    return config


if __name__ == "__main__":
    from experiments import not_a_program

    config = "--config=experiments/configs/digits_noisy.py"
    not_a_program(__spec__, f"python -m experiments.train {config} --workdir=DIR", "a config")
